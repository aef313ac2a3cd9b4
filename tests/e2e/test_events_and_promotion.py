"""Event-driven CI on the embedded stack: lifecycle events on EventBridge (a rule with an SQS target
receives them), signed webhooks delivered at least once with retries, and promotion of the identical
artifact from one deployment to another with no upload from the client."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import DAGCAST, Api, aws, dag_source, deploy_waiting, files_of, parse_json_stdout, run_dagcast, stack_env, until
from helpers import write_dags as write
from stack import local_stack

pytestmark = pytest.mark.integration

PRODUCTION = "production"
DETAIL_TYPES = {
    "deploy.created": "Deploy Created", "deploy.accepted": "Deploy Accepted", "deploy.rejected": "Deploy Rejected",
    "deploy.live": "Deploy Live", "deploy.superseded": "Deploy Superseded", "deploy.rolled_back": "Deploy Rolled Back",
    "deploy.promoted": "Deploy Promoted", "deploy.import_errors": "Import Errors", "sidecar.stale": "Sidecar Stale",
}
COMMON = {"id", "type", "schema", "time", "deployment", "deploy_id", "version", "sha256", "git", "created_by"}


class Bus:
    """An EventBridge rule on the stack's bus (every dagcast event) with an SQS queue as its target."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.events, self.sqs = aws(info, "events"), aws(info, "sqs")
        bus = info["event_bus_name"]
        assert bus, "local.json names the event bus"
        self.url = self.sqs.create_queue(QueueName="ci-events")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.events.put_rule(Name="all-dagcast", EventBusName=bus, EventPattern=json.dumps({"source": ["dagcast"]}))
        self.events.put_targets(Rule="all-dagcast", EventBusName=bus, Targets=[{"Id": "ci", "Arn": arn}])
        self.seen: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while True:
            out = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
            messages = out.get("Messages", [])
            if not messages:
                return self.seen
            for m in messages:
                self.seen.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=m["ReceiptHandle"])

    def of(self, deploy_id: str) -> list[str]:
        """The types of the events about one deploy, in the order they arrived."""
        return [e["detail"]["type"] for e in self.drain() if e["detail"].get("deploy_id") == deploy_id]

    def wait_for(self, deploy_id: str, kind: str) -> dict[str, Any]:
        until(lambda: kind in self.of(deploy_id), 30, f"{kind} of {deploy_id} on the bus")
        return next(e for e in self.seen if e["detail"].get("deploy_id") == deploy_id and e["detail"]["type"] == kind)


class Receiver:
    """A webhook receiver on 127.0.0.1: verifies each signature as a user's receiver would (README), answers
    500 to the first `fail_first` attempts of each event, and keeps what it accepted once per event id."""

    def __init__(self, fail_first: int = 0) -> None:
        self.secret = ""
        self.fail_first = fail_first
        self.attempts: list[tuple[str, str, int]] = []  # (event id, type, status answered)
        self.accepted: dict[str, dict[str, Any]] = {}  # de-duplicated by event id
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp, signature = self.headers.get("X-Dagcast-Timestamp", ""), self.headers.get("X-Dagcast-Signature-256", "")
                mac = hmac.new(receiver.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
                if not (fresh and hmac.compare_digest(f"sha256={mac}", signature)):
                    receiver.bad_signatures += 1
                    self._answer(401)
                    return
                event = json.loads(body)
                assert self.headers["X-Dagcast-Delivery"] == event["id"]
                tried = sum(1 for a in receiver.attempts if a[0] == event["id"])
                status = 500 if tried < receiver.fail_first else 200
                receiver.attempts.append((event["id"], event["type"], status))
                if status == 200:
                    receiver.accepted.setdefault(event["id"], event)
                self._answer(status)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dagcast"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def ci_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stack (one sidecar on its deployment), a production deployment with a sidecar of its own, and
    the bus rule."""
    root = tmp_path_factory.mktemp("ci")
    with local_stack(root / "state", sidecars=1, extra=["--parse", "off"]) as info:
        api = Api(info)
        api.json("POST", "/deployments", {"name": PRODUCTION, "mechanism": "DAG_ONLY"})
        token = api.json("POST", "/tokens", {"name": "prod-sidecars", "role": "sidecar", "deployments": [PRODUCTION]})["token"]
        link = root / "prod" / "dags"
        env = {**os.environ, "DAGCAST_API_URL": info["api_url"], "DAGCAST_TOKEN": token, "DAGCAST_DEPLOYMENT": PRODUCTION,
               "AWS_ENDPOINT_URL": info["aws_endpoint_url"], "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        with open(root / "prod-sidecar.log", "w") as log:
            proc = subprocess.Popen([*DAGCAST, "sidecar", "--name", "prod-1", "--root", str(root / "prod" / "root"),
                                     "--link", str(link), "--parse", "off", "--metrics-addr", "127.0.0.1:0",
                                     "--heartbeat-interval", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                until(lambda: any(s["name"] == "prod-1" for s in
                                  api.json("GET", f"/deployments/{PRODUCTION}/sidecars")["items"]), 60, "prod sidecar")
                yield {**info, "bus": Bus(info), "prod_link": link}
            finally:
                proc.terminate()
                proc.wait(timeout=30)


def deploy(info: dict[str, Any], dags: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    return deploy_waiting(info, dags, *args)


def check_schema(event: dict[str, Any]) -> None:
    assert event["source"] == "dagcast"
    detail = event["detail"]
    assert set(detail) >= COMMON, sorted(COMMON - set(detail))
    assert event["detail-type"] == DETAIL_TYPES[detail["type"]]
    assert detail["id"].startswith(detail["type"] + ":" + detail["deployment"] + ":")


def test_a_deploy_a_rejection_and_a_rollback_emit_their_events_in_order(ci_stack: dict[str, Any], tmp_path: Path) -> None:
    info, bus = ci_stack, ci_stack["bus"]
    one = write(tmp_path / "one", {"etl.py": dag_source("etl")})
    code, first, _ = deploy(info, one)
    assert code == 0 and first["converged"]
    bus.wait_for(first["deploy_id"], "deploy.live")
    two = write(tmp_path / "two", {"etl.py": dag_source("etl", "# two\n")})
    code, second, _ = deploy(info, two)
    assert code == 0
    bus.wait_for(second["deploy_id"], "deploy.live")
    broken = write(tmp_path / "broken", {"etl.py": "def broken(:\n"})
    code, rejected, _ = deploy(info, broken, "--skip-validation")
    assert code == 3 and rejected["state"] == "REJECTED"
    bus.wait_for(rejected["deploy_id"], "deploy.rejected")
    proc = run_dagcast(["rollback", first["deploy_id"], "--json"], stack_env(info))
    assert proc.returncode == 0, proc.stderr
    back = parse_json_stdout(proc)
    live = bus.wait_for(back["deploy_id"], "deploy.live")

    assert bus.of(first["deploy_id"]) == ["deploy.created", "deploy.accepted", "deploy.live", "deploy.superseded"]
    assert bus.of(second["deploy_id"]) == ["deploy.created", "deploy.accepted", "deploy.live", "deploy.superseded"]
    assert bus.of(rejected["deploy_id"]) == ["deploy.created", "deploy.rejected"]
    assert bus.of(back["deploy_id"]) == ["deploy.accepted", "deploy.rolled_back", "deploy.live"]
    mine = [e for e in bus.seen if e["detail"].get("deploy_id") in
            {first["deploy_id"], second["deploy_id"], rejected["deploy_id"], back["deploy_id"]}]
    for event in mine:
        check_schema(event)
    assert len({e["detail"]["id"] for e in mine}) == len(mine), "one id per happening"
    details = {(e["detail"]["deploy_id"], e["detail"]["type"]): e["detail"] for e in mine}
    why = details[(rejected["deploy_id"], "deploy.rejected")]
    assert why["errors"][0]["path"] == "etl.py" and why["errors"][0]["code"] == "syntax_error" and why["errors_total"] == 1
    assert details[(second["deploy_id"], "deploy.superseded")]["superseded_by"]["deploy_id"] == back["deploy_id"]
    assert details[(back["deploy_id"], "deploy.rolled_back")]["rollback_of"] == first["deploy_id"]
    assert live["detail"]["sidecars"] == ["sidecar-1"] and live["detail"]["stages"]["active_to_all_live_s"] is not None
    accepted = details[(first["deploy_id"], "deploy.accepted")]
    assert accepted["sha256"] == first["sha256"] and accepted["version"] == first["version"]
    assert accepted["created_by"] and accepted["changes"]["files_added"] == 1


def test_a_promotion_runs_the_same_bytes_with_nothing_uploaded(ci_stack: dict[str, Any], tmp_path: Path) -> None:
    info, bus = ci_stack, ci_stack["bus"]
    big = {"etl.py": dag_source("etl", "# staged\n"), "sql/big.sql": os.urandom(96 * 1024).hex()}
    code, staged, _ = deploy(info, write(tmp_path / "staged", big))
    assert code == 0 and staged["converged"]
    proc = run_dagcast(["promote", "--from", info["deployment"], "--to", PRODUCTION, "--wait", "--json"],
                       stack_env(info))
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["ok"] and doc["converged"] and doc["sha256"] == staged["sha256"]
    assert doc["upload"] == {"kind": "promotion", "bytes": 0}
    assert doc["promoted_from"] == {"deployment": info["deployment"], "version": staged["version"],
                                    "deploy_id": staged["deploy_id"], "sha256": staged["sha256"]}
    staging_files = files_of(Path(info["sidecars"][0]["dags_path"]))
    assert files_of(info["prod_link"]) == staging_files and "sql/big.sql" in staging_files
    # the bundle the production deploy records is a server-side copy: S3 has exactly the staged bytes under its key
    s3 = aws(info, "s3")
    [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"] and "log" not in b["Name"]]
    view = Api(info).json("GET", f"/deployments/{PRODUCTION}/deploys/{doc['deploy_id']}")["deploy"]
    assert view["promoted_from"]["sha256"] == staged["sha256"] and view["key"].startswith(f"bundles/{PRODUCTION}/")
    body = s3.get_object(Bucket=bucket, Key=view["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == staged["sha256"]
    assert bus.of(doc["deploy_id"]) == ["deploy.created", "deploy.accepted", "deploy.promoted", "deploy.live"]
    promoted = bus.wait_for(doc["deploy_id"], "deploy.promoted")["detail"]
    assert promoted["promoted_from"]["deploy_id"] == staged["deploy_id"] and promoted["deployment"] == PRODUCTION

    again = run_dagcast(["promote", "--from", info["deployment"], "--to", PRODUCTION, "--json"], stack_env(info))
    assert again.returncode == 0 and parse_json_stdout(again)["state"] == "UNCHANGED", again.stderr


def test_a_deployment_that_accepts_only_promotions_refuses_an_upload_with_a_hint(ci_stack: dict[str, Any],
                                                                                   tmp_path: Path) -> None:
    info = ci_stack
    api = Api(info)
    api.json("PATCH", f"/deployments/{PRODUCTION}", {"accept": "promotions"})
    try:
        dags = write(tmp_path / "direct", {"etl.py": dag_source("etl", "# direct\n")})
        proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--json", "--deployment", PRODUCTION],
                           stack_env(info))
        doc = parse_json_stdout(proc)
        assert proc.returncode == 1 and doc["error"]["code"] == "promotions_only", proc.stderr
        assert "dagcast promote" in doc["error"]["message"] and "Traceback" not in proc.stderr
        raw = api.call("POST", f"/deployments/{PRODUCTION}/deploys", {"sha256": "0" * 64, "size": 10})
        assert raw.status_code == 409 and raw.json()["error"]["code"] == "promotions_only"
        # a promotion still goes in (the version staging runs now)
        code, staged, _ = deploy(info, write(tmp_path / "staged", {"etl.py": dag_source("etl", "# next\n")}))
        assert code == 0
        proc = run_dagcast(["promote", "--from", info["deployment"], "--to", PRODUCTION, "--wait", "--json"], stack_env(info))
        assert proc.returncode == 0 and parse_json_stdout(proc)["sha256"] == staged["sha256"], proc.stderr
    finally:
        api.json("PATCH", f"/deployments/{PRODUCTION}", {"accept": "both"})


def test_a_deployment_can_require_promoted_versions_to_have_been_live_for_a_while(ci_stack: dict[str, Any]) -> None:
    info = ci_stack
    api = Api(info)
    api.json("PATCH", f"/deployments/{PRODUCTION}", {"promotion_min_live_minutes": 60})
    try:
        proc = run_dagcast(["promote", "--from", info["deployment"], "--to", PRODUCTION, "--force", "--json"], stack_env(info))
        doc = parse_json_stdout(proc)
        assert proc.returncode == 1 and doc["error"]["code"] == "promotion_refused", proc.stderr
        assert "live for 60 min" in doc["error"]["message"]
    finally:
        api.json("PATCH", f"/deployments/{PRODUCTION}", {"promotion_min_live_minutes": 0})


def test_promotion_needs_deploy_rights_on_the_target_and_read_on_the_source(ci_stack: dict[str, Any]) -> None:
    info = ci_stack
    api = Api(info)
    prod_only = api.json("POST", "/tokens", {"name": "prod-deployer", "role": "deployer", "deployments": [PRODUCTION]})["token"]
    viewer = api.json("POST", "/tokens", {"name": "viewer-both", "role": "viewer",
                                          "deployments": [PRODUCTION, info["deployment"]]})["token"]
    body = {"source": info["deployment"]}
    denied = api.call("POST", f"/deployments/{PRODUCTION}/promotions", body, token=prod_only)
    assert denied.status_code == 403 and info["deployment"] in denied.json()["error"]["message"]
    assert api.call("POST", f"/deployments/{PRODUCTION}/promotions", body, token=viewer).status_code == 403
    assert api.call("POST", f"/deployments/{PRODUCTION}/promotions", {"source": PRODUCTION}).status_code == 400


def test_webhooks_are_signed_retried_after_failures_and_carry_a_stable_id(ci_stack: dict[str, Any], tmp_path: Path) -> None:
    info = ci_stack
    receiver = Receiver(fail_first=2)
    try:
        proc = run_dagcast(["webhooks", "add", receiver.url, "--events", "deploy.accepted,deploy.live", "--json"],
                           stack_env(info))
        assert proc.returncode == 0, proc.stderr
        added = parse_json_stdout(proc)
        receiver.secret = added["secret"]
        hook_id = added["webhook"]["webhook_id"]
        listed = parse_json_stdout(run_dagcast(["webhooks", "list", "--json"], stack_env(info)))
        assert [h["webhook_id"] for h in listed["items"]] == [hook_id] and "secret" not in listed["items"][0]

        code, done, _ = deploy(info, write(tmp_path / "hooked", {"etl.py": dag_source("etl", "# hooked\n")}))
        assert code == 0
        wanted = {f"deploy.accepted:{info['deployment']}:{done['deploy_id']}", f"deploy.live:{info['deployment']}:{done['deploy_id']}"}
        until(lambda: wanted <= set(receiver.accepted), 60, "both events accepted by the receiver")
        for event_id in wanted:
            statuses = [s for i, _, s in receiver.attempts if i == event_id]
            assert statuses[:3] == [500, 500, 200], (event_id, statuses)
        assert receiver.accepted[next(iter(wanted))]["sha256"] == done["sha256"]
        assert receiver.bad_signatures == 0
        assert {t for _, t, _ in receiver.attempts} == {"deploy.accepted", "deploy.live"}, "only the types asked for"

        shown = parse_json_stdout(run_dagcast(["webhooks", "deliveries", "--json", "--limit", "50"], stack_env(info)))
        ours = sorted((d["attempt"], d["status"], d["ok"]) for d in shown["items"]
                      if d["webhook_id"] == hook_id and d["event_type"] == "deploy.live")
        assert ours[:3] == [(1, 500, False), (2, 500, False), (3, 200, True)]

        # a receiver with another secret refuses every delivery: the signature really binds the secret
        receiver.secret = "not-the-secret"
        code, _, _ = deploy(info, write(tmp_path / "hooked2", {"etl.py": dag_source("etl", "# again\n")}))
        assert code == 0
        until(lambda: receiver.bad_signatures >= 1, 30, "a delivery signed with the real secret")
        proc = run_dagcast(["webhooks", "remove", hook_id, "--json"], stack_env(info))
        assert proc.returncode == 0, proc.stderr
        log = Path(info["state_dir"], "local-up.log").read_text()
        assert "webhook delivery failed" in log and "Traceback" not in log, "a receiver that is down is no function error"
    finally:
        receiver.close()


def test_webhook_urls_and_event_types_are_checked(ci_stack: dict[str, Any]) -> None:
    info = ci_stack
    for url, events, why in [
        ("ftp://127.0.0.1/x", "deploy.live", "must be http(s)"),
        ("http://user:pw@127.0.0.1/x", "deploy.live", "credentials"),
        ("http://127.0.0.1:9/x", "deploy.nope", "unknown event type"),
    ]:
        proc = run_dagcast(["webhooks", "add", url, "--events", events, "--json"], stack_env(info))
        doc = parse_json_stdout(proc)
        assert proc.returncode == 1 and why in doc["error"]["message"], (url, doc)
