"""The authorization matrix: every route in app.ROUTES against every kind of caller.

Callers: no token, malformed headers, an unknown token, a revoked token, and each role scoped
either to the deployment in the path or to another one. The expected status follows from the
route's `permission` and ROLE_PERMISSIONS alone; a caller that is let through gets the route's
success status, because every cell gets valid path parameters and a valid body. No cell may
ever answer 5xx.

One moto account per module keeps the ~300 cells cheap; resources a cell consumes (a PENDING
deploy to cancel, a sidecar to deregister, a name to create) are made fresh for that cell.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from awsmock import clear_app_caches, fresh_session, use_fake_credentials
from chalice.test import Client
from moto import mock_aws
from pydantic import BaseModel

import app as app_module
from chalicelib.auth import ROLE_PERMISSIONS, Permission, new_token
from chalicelib.bundle import write_bundle
from chalicelib.ingest import Outcome
from chalicelib.models import (
    CreateDeploy,
    CreateDeployment,
    CreateToken,
    CreateWebhook,
    Heartbeat,
    IngestEvent,
    Mechanism,
    ParseReport,
    Promote,
    RegisterSidecar,
    Role,
    UpdateDeployment,
)
from chalicelib.openapi import RouteSpec
from chalicelib.service import ControlPlane
from dagcast.bootstrap import bootstrap

REGION = "us-east-1"
HOME = "analytics"  # the deployment every path names
OTHER = "elsewhere"  # the deployment the "other" tokens are scoped to
SOURCE = "staging"  # promotions into HOME come from here; the "home" tokens may read it too
SHA = hashlib.sha256(b"not uploaded").hexdigest()

# Every cached client and service of the app (get_publisher and get_sns too), so none outlives this module's account.


# --- the callers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    id: str
    header: str | None = None  # a literal Authorization header (or none at all)
    token: str | None = None  # the key of a token in World.tokens
    role: Role | None = None  # set for callers with a valid, live token
    scoped_home: bool = True
    all_deployments: bool = False  # a token scoped to "*"

    @property
    def authenticated(self) -> bool:
        return self.role is not None


CALLERS: list[Caller] = [
    Caller("no-token"),
    Caller("malformed-bearer-without-token", header="Bearer"),
    Caller("malformed-basic-scheme", header="Basic x"),
    Caller("malformed-bearer-not-a-token", header="Bearer not-a-token"),
    Caller("unknown-token", token="unknown"),
    Caller("revoked-admin-token", token="revoked"),
    *(Caller(f"{role.value}-scoped-to-deployment", token=f"{role.value}-home", role=role) for role in Role),
    *(Caller(f"{role.value}-scoped-to-other-deployment", token=f"{role.value}-other", role=role, scoped_home=False)
      for role in Role),
    Caller("admin-for-all-deployments", token="admin-all", role=Role.ADMIN, all_deployments=True),
]


# What each role may do, as documented; ROLE_PERMISSIONS must say the same (pinned below).
ROLE_SPEC: dict[Role, set[Permission]] = {
    Role.VIEWER: {Permission.READ},
    Role.DEPLOYER: {Permission.READ, Permission.DEPLOY},
    Role.SIDECAR: {Permission.READ, Permission.SYNC},
    Role.ADMIN: {Permission.READ, Permission.DEPLOY, Permission.SYNC, Permission.ADMIN},
}

# The permission each route needs, as documented; a new route must be added here on purpose.
ROUTE_SPEC: dict[str, str | None] = {
    "GET /healthz": None,
    "GET /openapi.json": None,
    "GET /deployments": "read",
    "POST /deployments": "admin",
    "GET /deployments/{deployment}": "read",
    "PATCH /deployments/{deployment}": "admin",
    "POST /deployments/{deployment}/deploys": "deploy",
    "GET /deployments/{deployment}/deploys": "read",
    "GET /deployments/{deployment}/deploys/{deploy_id}": "read",
    "GET /deployments/{deployment}/deploys/{deploy_id}/files": "read",
    "GET /deployments/{deployment}/deploys/{deploy_id}/files/diff": "read",
    "POST /deployments/{deployment}/deploys/{deploy_id}/upload": "deploy",
    "POST /deployments/{deployment}/deploys/{deploy_id}/cancel": "deploy",
    "POST /deployments/{deployment}/deploys/{deploy_id}/rollback": "admin",
    "POST /deployments/{deployment}/promotions": "deploy",
    "GET /deployments/{deployment}/webhooks": "admin",
    "POST /deployments/{deployment}/webhooks": "admin",
    "DELETE /deployments/{deployment}/webhooks/{webhook_id}": "admin",
    "GET /deployments/{deployment}/deliveries": "read",
    "GET /deployments/{deployment}/versions/current": "read",
    "GET /deployments/{deployment}/versions/{version}": "read",
    "GET /deployments/{deployment}/sidecars": "read",
    "POST /deployments/{deployment}/sidecars": "sync",
    "PUT /deployments/{deployment}/sidecars/{name}": "sync",
    "PUT /deployments/{deployment}/sidecars/{name}/parse": "sync",
    "DELETE /deployments/{deployment}/sidecars/{name}": "sync",
    "GET /whoami": "read",
    "GET /tokens": "admin",
    "POST /tokens": "admin",
    "DELETE /tokens/{name}": "admin",
}


def expected_status(route: RouteSpec, caller: Caller) -> int:
    if route.permission is None:
        return route.status
    if not caller.authenticated:
        return 401
    assert caller.role is not None
    if Permission(route.permission) not in ROLE_SPEC[caller.role]:
        return 403
    if "{deployment}" in route.path and not caller.scoped_home:
        return 403
    if "{deployment}" not in route.path and route.permission == "admin" and not caller.all_deployments:
        return 403  # account-wide actions (tokens, new deployments) need an admin for every deployment
    return route.status


# --- one moto account for the module ---------------------------------------------------


@dataclass
class World:
    client: Client
    control: ControlPlane
    tokens: dict[str, str]
    active_deploy_id: str
    sidecar: str
    victim_token: str
    names: Iterator[str]
    secrets: dict[str, str]  # sidecar name -> the secret its registration returned


def _session() -> boto3.session.Session:
    return fresh_session()


def _dag(dag_id: str) -> str:
    return (
        "from datetime import datetime\nfrom airflow import DAG\n\n"
        f"with DAG({dag_id!r}, start_date=datetime(2024, 1, 1), schedule=None):\n    pass\n"
    )


def _bundle(root: Path) -> bytes:
    root.mkdir(parents=True)
    (root / "etl.py").write_text(_dag("etl"))
    out = io.BytesIO()
    write_bundle(root, ["etl.py"], out)
    return out.getvalue()


def _activate_a_deploy(control: ControlPlane, bucket: str, data: bytes, deployment: str = HOME) -> str:
    """A deploy that went live as version 1, through the real ingest path."""
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(data).hexdigest(), size=len(data)), "setup")
    key = created.deploy.key
    boto3.client("s3", region_name=REGION).put_object(Bucket=bucket, Key=key, Body=data)
    outcome = app_module.get_ingest().handle(IngestEvent(bucket=bucket, key=key, size=len(data)))
    assert outcome is Outcome.ACTIVE
    assert control.get_deployment(deployment).current_version == 1
    return created.deploy.deploy_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with pytest.MonkeyPatch.context() as mp:
        use_fake_credentials(mp)
        clear_app_caches()
        try:
            with mock_aws():
                boto3.DEFAULT_SESSION = _session()
                outputs = bootstrap(_session(), "authz")
                mp.setenv("DAGCAST_TABLE_NAME", outputs.table_name)
                mp.setenv("DAGCAST_BUNDLES_BUCKET", outputs.bucket)
                mp.setenv("DAGCAST_TOPIC_ARN", outputs.topic_arn)
                mp.setenv("DAGCAST_SIGNING_KEY_ARN", outputs.signing_key_arn)
                mp.setenv("DAGCAST_WEBHOOK_ALLOW_PRIVATE_HOSTS", "true")
                control = app_module.get_control()
                for name in (HOME, OTHER, SOURCE):
                    control.create_deployment(CreateDeployment(name=name, mechanism=Mechanism.DAG_ONLY))
                tokens = {"unknown": new_token(), "revoked": control.issue_token("revoked-admin", Role.ADMIN, [HOME])}
                control.revoke_token("revoked-admin")
                for role in Role:
                    tokens[f"{role.value}-home"] = control.issue_token(f"{role.value}-home", role, [HOME, SOURCE])
                    tokens[f"{role.value}-other"] = control.issue_token(f"{role.value}-other", role, [OTHER])
                tokens["admin-all"] = control.issue_token("admin-all", Role.ADMIN, ["*"])
                control.issue_token("victim", Role.VIEWER, [HOME])
                deploy_id = _activate_a_deploy(control, outputs.bucket, _bundle(tmp_path_factory.mktemp("authz") / "dags"))
                _activate_a_deploy(control, outputs.bucket, _bundle(tmp_path_factory.mktemp("authz") / "dags"), SOURCE)
                registrar = app_module.get_store().token_by_name("sidecar-home")
                assert registrar is not None
                registered = control.register_sidecar(HOME, RegisterSidecar(name="worker-1", component="worker"), registrar, None)
                counter = itertools.count()
                yield World(
                    client=Client(app_module.app),
                    control=control,
                    tokens=tokens,
                    active_deploy_id=deploy_id,
                    sidecar="worker-1",
                    victim_token="victim",
                    names=(f"cell-{i}" for i in counter),
                    secrets={"worker-1": registered.secret},
                )
        finally:
            clear_app_caches()


# --- valid path parameters and bodies for every route -----------------------------------


def _fresh_pending_deploy(world: World) -> str:
    return world.control.create_deploy(HOME, CreateDeploy(sha256=SHA, size=1234), "setup").deploy.deploy_id


def _fresh_sidecar(world: World) -> str:
    name = next(world.names)
    registrar = app_module.get_store().token_by_name("sidecar-home")
    assert registrar is not None
    world.secrets[name] = world.control.register_sidecar(HOME, RegisterSidecar(name=name), registrar, None).secret
    return name


def path_params(route: RouteSpec, world: World) -> dict[str, str]:
    """Values naming things that exist; resources the call consumes are made fresh for it."""
    params: dict[str, str] = {}
    for param in re.findall(r"{(\w+)}", route.path):
        if param == "deployment":
            params[param] = HOME
        elif param == "deploy_id":
            # reads and rollback want a deploy that went live; the other actions (cancel, renew the upload) a PENDING one
            wants_live = route.method == "GET" or route.path.endswith("/rollback")
            params[param] = world.active_deploy_id if wants_live else _fresh_pending_deploy(world)
        elif param == "version":
            params[param] = "1"
        elif param == "webhook_id":  # each removal removes one made for it
            hook = CreateWebhook(url="http://127.0.0.1:9/hook", events=["deploy.live"])
            params[param] = world.control.add_webhook(HOME, hook, "setup").webhook.webhook_id
        elif param == "name" and route.path.startswith("/tokens/"):
            params[param] = world.victim_token  # revoking it again is idempotent
        elif param == "name" and "/sidecars/" in route.path:
            params[param] = _fresh_sidecar(world) if route.method == "DELETE" else world.sidecar
        else:
            raise AssertionError(f"no valid value for path parameter {param!r} of {route.method} {route.path}")
    return params


BODIES: dict[type[BaseModel], Callable[[World], dict[str, Any]]] = {
    CreateDeployment: lambda w: {"name": next(w.names), "mechanism": "DAG_ONLY"},
    UpdateDeployment: lambda w: {"keep_versions": 20},  # what it already is: never changes the mechanism
    CreateDeploy: lambda w: {"sha256": SHA, "size": 1234, "description": "authz matrix"},
    RegisterSidecar: lambda w: {"name": next(w.names), "component": "worker"},
    Heartbeat: lambda w: {"version": 1},
    ParseReport: lambda w: {"version": 1, "sha256": w.control._store.version_identity(HOME, 1)[1], "status": "parsed"},
    CreateToken: lambda w: {"name": next(w.names), "role": "viewer", "deployments": [HOME]},
    Promote: lambda w: {"source": SOURCE},
    CreateWebhook: lambda w: {"url": "http://127.0.0.1:9/hook", "events": ["deploy.live", "deploy.rejected"]},
}


# Query strings a route needs to succeed (the file to diff: the live deploy's only file, added in v1).
QUERIES: dict[str, str] = {
    "GET /deployments/{deployment}/deploys/{deploy_id}/files/diff": "?path=etl.py",
}


def request_body(route: RouteSpec, world: World) -> bytes:
    if route.body is None:
        return b""
    assert route.body in BODIES, f"add a valid body for {route.body.__name__} ({route.method} {route.path})"
    body = BODIES[route.body](world)
    route.body.model_validate(body)  # valid by the route's own model
    return json.dumps(body).encode()


def authorization(caller: Caller, world: World) -> dict[str, str]:
    if caller.header is not None:
        return {"Authorization": caller.header}
    if caller.token is not None:
        return {"Authorization": f"Bearer {world.tokens[caller.token]}"}
    return {}


def _route_id(route: RouteSpec) -> str:
    return f"{route.method} {route.path}"


# --- the matrix --------------------------------------------------------------------------


def test_roles_grant_exactly_the_documented_permissions() -> None:
    assert {role: set(perms) for role, perms in ROLE_PERMISSIONS.items()} == ROLE_SPEC


def test_every_route_needs_exactly_the_documented_permission() -> None:
    ids = [_route_id(r) for r in app_module.ROUTES]
    assert len(set(ids)) == len(ids), "a route is registered twice"
    assert {_route_id(r): r.permission for r in app_module.ROUTES} == ROUTE_SPEC


@pytest.mark.parametrize("caller", CALLERS, ids=[c.id for c in CALLERS])
@pytest.mark.parametrize("route", app_module.ROUTES, ids=[_route_id(r) for r in app_module.ROUTES])
def test_route_answers_the_status_its_permission_and_scope_demand(route: RouteSpec, caller: Caller, world: World) -> None:
    params = path_params(route, world)
    path = route.path.format(**params) + QUERIES.get(_route_id(route), "")
    headers = {"Content-Type": "application/json", **authorization(caller, world)}
    if "name" in params and "/sidecars/" in route.path:  # the sidecar's own secret: a sidecar acts only as itself
        headers["X-Dagcast-Sidecar-Secret"] = world.secrets[params["name"]]
    resp = world.client.http.request(route.method, path, headers=headers, body=request_body(route, world))

    assert resp.status_code < 500, f"{route.method} {path} as {caller.id}: {resp.status_code} {resp.body!r}"
    want = expected_status(route, caller)
    assert resp.status_code == want, f"{route.method} {path} as {caller.id}: {resp.body!r}"
    if want in (401, 403):
        body = resp.json_body
        assert set(body) == {"error"}
        assert set(body["error"]) == {"code", "message"}
        assert body["error"]["code"] == ("unauthorized" if want == 401 else "forbidden")
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif want == 204:
        assert not resp.body
    elif route.response is not None:
        route.response.model_validate(resp.json_body)
    else:
        assert isinstance(resp.json_body, dict)


def test_revoking_through_the_api_makes_the_token_401_everywhere_it_worked(world: World) -> None:
    secret = world.control.issue_token("short-lived", Role.ADMIN, [HOME])
    headers = {"Authorization": f"Bearer {secret}"}
    path = f"/deployments/{HOME}"
    assert world.client.http.get(path, headers=headers).status_code == 200
    admin = {"Authorization": f"Bearer {world.tokens['admin-all']}"}
    revoked = world.client.http.delete("/tokens/short-lived", headers=admin)
    assert revoked.status_code == 200 and revoked.json_body["revoked"] is True
    resp = world.client.http.get(path, headers=headers)
    assert resp.status_code == 401
    assert resp.json_body["error"]["code"] == "unauthorized"
