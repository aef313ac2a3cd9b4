"""Schemathesis against the embedded stack's own OpenAPI document: no 5xx, and every answer
matches the schema the API publishes.

The schema is loaded lazily from a fixture, because the stack's URL is known only once the
session's `stack` is up. Generation is seeded and derandomized so CI runs are reproducible.

The stack is shared with the other integration tests, so the fuzzer works on its own
deployment "fuzz" (path parameter fixed through schemathesis' `parameters` config, never "demo"),
and DELETE /tokens/{name} only ever revokes a token made for it (never the admin token).
"""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from helpers import Api, dag_source, write_dags
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.specs.openapi.checks import response_schema_conformance

from chalicelib.bundle import write_bundle

FUZZ_DEPLOYMENT = "fuzz"
VICTIM_TOKEN = "fuzz-victim"
SEED = 20240601
MAX_EXAMPLES = 20


def live_deploy(api: Api, root: Path) -> dict[str, Any]:
    """One real deploy into the fuzz deployment, waited on until ACTIVE: gives rollback and versions a target."""
    write_dags(root, {"fuzz.py": dag_source("fuzz")})
    out = io.BytesIO()
    write_bundle(root, ["fuzz.py"], out)
    data = out.getvalue()
    created = api.json("POST", f"/deployments/{FUZZ_DEPLOYMENT}/deploys", {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    form = created["upload"]
    up = httpx.post(form["url"], data=form["fields"], files={"file": ("bundle.tar.gz", data, "application/gzip")}, timeout=60)
    assert up.status_code < 300, up.text
    deploy_id = created["deploy"]["deploy_id"]
    deadline = time.monotonic() + 60
    while (deploy := api.json("GET", f"/deployments/{FUZZ_DEPLOYMENT}/deploys/{deploy_id}")["deploy"])["state"] != "ACTIVE":
        assert deploy["state"] in ("PENDING", "VALIDATING"), deploy
        assert time.monotonic() < deadline, f"setup deploy still {deploy['state']}"
        time.sleep(0.2)
    return deploy


@pytest.fixture(scope="module")
def api_schema(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    api = Api(stack)
    api.json("POST", "/deployments", {"name": FUZZ_DEPLOYMENT, "mechanism": "DAG_ONLY"})
    api.json("POST", "/tokens", {"name": VICTIM_TOKEN, "role": "viewer", "deployments": [FUZZ_DEPLOYMENT]})
    deploy = live_deploy(api, tmp_path_factory.mktemp("fuzz") / "dags")
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            # The local server (http.server under Chalice) has no TRACE/QUERY handler and answers 501 itself,
            # before the app sees the request: probe only methods it routes to the app.
            "phases": {
                "stateful": {"enabled": False},
                "coverage": {"unexpected-methods": ["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]},
            },
            "parameters": {
                "path.deployment": FUZZ_DEPLOYMENT,
                "path.deploy_id": deploy["deploy_id"],
                "path.version": str(deploy["version"]),
            },
            "operations": [
                {"include-path": "/tokens/{name}", "include-method": "DELETE", "parameters": {"path.name": VICTIM_TOKEN}},
            ],
        }
    )
    return schemathesis.openapi.from_url(stack["api_url"].rstrip("/") + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """pytest 9.2 dropped `Node._nodeid`; schemathesis 4.32.5's lazy schema still reads it to name each
    operation's subtest. Give the item one (an instance attribute: reporting only)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


# Real failures the fuzzer found, by operation: expected to fail until the app is fixed (xfail, not strict).
KNOWN_FAILURES: dict[str, str] = {}


@schema.parametrize()
def test_every_operation_answers_without_5xx_and_as_its_schema_says(case: schemathesis.Case, stack: dict[str, Any]) -> None:
    assert (case.path_parameters or {}).get("deployment", FUZZ_DEPLOYMENT) == FUZZ_DEPLOYMENT, "never the shared demo"
    try:
        case.call_and_validate(
            base_url=stack["api_url"].rstrip("/"),
            headers={"Authorization": f"Bearer {stack['token']}"},
            checks=[not_a_server_error, response_schema_conformance],
            timeout=30,
        )
    except FailureGroup as group:
        reason = KNOWN_FAILURES.get(case.operation.label)
        if reason is None or any(isinstance(f, ServerError) for f in group.exceptions):
            raise
        pytest.xfail(reason)


def test_the_fuzzer_covers_every_documented_operation_but_the_schema_endpoint(api_schema: Any, stack: dict[str, Any]) -> None:
    """schemathesis leaves out the operation that serves the schema it loaded (GET /openapi.json); nothing else."""
    doc = httpx.get(stack["api_url"].rstrip("/") + "/openapi.json", timeout=30).json()
    documented = {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}
    fuzzed = {result.ok().label for result in api_schema.get_all_operations()}
    assert fuzzed == documented - {"GET /openapi.json"}
    assert set(KNOWN_FAILURES) <= fuzzed, "a known failure names an operation that no longer exists"


def test_the_fuzzer_left_the_admin_token_and_the_demo_deployment_alone(stack: dict[str, Any]) -> None:
    api = Api(stack)
    assert api.call("GET", "/tokens").status_code == 200, "the admin token still works"
    assert api.json("GET", f"/deployments/{stack['deployment']}")["mechanism"] == "DAG_ONLY"
