"""Parse reports: a sidecar tells the API what Airflow made of a version; the deploy view merges them."""
from __future__ import annotations

import json
from typing import Any

import pytest
from chalice.test import Client
from sidecar_calls import SidecarCalls
from test_ingest import dag, deploy_and_ingest

import app as app_module
from chalicelib.models import MAX_REPORTED
from dagcast.bootstrap import StackOutputs

MakeBundle = Any


@pytest.fixture
def live(client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle) -> dict[str, Any]:
    """Version 1 of the deployment, live."""
    deploy = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/a.py": dag("a")}))
    view = client.http.get(f"/deployments/{deployment}/deploys/{deploy['deploy_id']}",
                           headers={"Authorization": f"Bearer {deployer_token}"}).json_body
    return view["deploy"]


def report(version: int, sha256: str, **fields: Any) -> dict[str, Any]:
    return {"version": version, "sha256": sha256, "status": "parsed", "files": 2, "dags": 1, **fields}


def put_report(sidecar: SidecarCalls, body: dict[str, Any], secret: str | None = "") -> Any:
    return sidecar._call("PUT", f"/deployments/{sidecar.deployment}/sidecars/{sidecar.name}/parse", body, secret)


def view_of(client: Client, deployment: str, deploy_id: str, token: str) -> dict[str, Any]:
    resp = client.http.get(f"/deployments/{deployment}/deploys/{deploy_id}", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.body
    return resp.json_body  # type: ignore[no-any-return]


MISSING = {"path": "dags/b.py", "line": 1, "type": "ModuleNotFoundError", "message": "No module named 'pandas'",
           "frames": ["dags/b.py:1 in <module>"]}


def test_reports_of_two_components_are_merged_error_by_error_with_the_sidecars_that_saw_each(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, live: dict[str, Any]
) -> None:
    scheduler = SidecarCalls(client, deployment, sidecar_token, "scheduler-0", "scheduler")
    workers = [SidecarCalls(client, deployment, sidecar_token, f"worker-{i}", "worker") for i in range(2)]
    boom = {"path": "dags/c.py", "line": 3, "type": "ValueError", "message": "boom", "frames": []}
    for s in (scheduler, *workers):
        s.report_running(1, parser="airflow 3.3.2")
    view = view_of(client, deployment, live["deploy_id"], deployer_token)
    assert view["parse"]["status"] == "pending" and view["parse"]["pending"] == ["scheduler-0", "worker-0", "worker-1"]

    assert put_report(scheduler, report(1, live["sha256"], import_errors=[boom], import_errors_total=1)).status_code == 200
    for w in workers:
        body = report(1, live["sha256"], import_errors=[MISSING, boom], import_errors_total=2, new_import_errors=["dags/b.py"],
                      new_import_errors_total=1, duplicates=[{"dag_id": "a", "paths": ["dags/a.py", "dags/a2.py"]}])
        assert put_report(w, body).status_code == 200
    parse = view_of(client, deployment, live["deploy_id"], deployer_token)["parse"]
    assert parse["status"] == "parsed" and parse["pending"] == [] and parse["reported"] == ["scheduler-0", "worker-0", "worker-1"]
    by_path = {e["path"]: e for e in parse["import_errors"]}
    assert by_path["dags/b.py"]["sidecars"] == ["worker-0", "worker-1"] and by_path["dags/b.py"]["new"]
    assert by_path["dags/c.py"]["sidecars"] == ["scheduler-0", "worker-0", "worker-1"] and not by_path["dags/c.py"]["new"]
    assert parse["import_errors_total"] == 2 and parse["new_import_errors"] == 1
    assert parse["duplicates"] == [{"dag_id": "a", "paths": ["dags/a.py", "dags/a2.py"]}]


def test_a_sidecar_without_airflow_is_not_waited_for_and_says_parse_is_unavailable(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, live: dict[str, Any]
) -> None:
    plain = SidecarCalls(client, deployment, sidecar_token, "plain")
    plain.report_running(1)  # no parser
    assert view_of(client, deployment, live["deploy_id"], deployer_token)["parse"]["status"] == "unavailable"
    assert put_report(plain, report(1, live["sha256"], status="unavailable", message="Airflow not importable",
                                    files=0, dags=0)).status_code == 200
    parse = view_of(client, deployment, live["deploy_id"], deployer_token)["parse"]
    assert parse["status"] == "unavailable" and parse["unavailable"] == ["plain"]


def test_a_held_version_settles_the_wait_without_converging(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, live: dict[str, Any],
    aws: StackOutputs, make_bundle: MakeBundle,
) -> None:
    gate = SidecarCalls(client, deployment, sidecar_token, "gatekeeper")
    gate.report_running(1, parser="airflow 3.3.2")
    second = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/a.py": dag("a"), "dags/b.py": "import nope\n"}))
    view = view_of(client, deployment, second["deploy_id"], deployer_token)
    assert not view["converged"] and view["parse"]["status"] == "none"
    stored = app_module.get_store().get_deploy(deployment, second["deploy_id"])
    held = report(2, stored.sha256, held=True, mode="gate", import_errors=[MISSING], import_errors_total=1,
                  new_import_errors=["dags/b.py"], new_import_errors_total=1)
    assert put_report(gate, held).status_code == 200
    resp = client.http.get(f"/deployments/{deployment}/deploys/{second['deploy_id']}?wait=5",
                           headers={"Authorization": f"Bearer {deployer_token}"})
    view = resp.json_body
    assert view["parse"]["held"] == ["gatekeeper"] and not view["converged"]
    assert view["sidecars"][0]["version"] == 1, "the gate kept the version it had"


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"sha256": "0" * 64}, 409, "not about it"),
    ({"version": 9}, 404, "version 9"),
    ({"import_errors": [MISSING] * (MAX_REPORTED + 1)}, 400, "import_errors"),
    ({"import_errors": [{**MISSING, "message": "x" * 5000}]}, 400, "message"),
    ({"status": "fine"}, 400, "status"),
    ({"extra": 1}, 400, "extra"),
])
def test_a_report_that_is_not_about_a_recorded_version_or_too_large_is_refused_clearly(
    client: Client, deployment: str, sidecar_token: str, live: dict[str, Any], change: dict[str, Any], status: int, words: str
) -> None:
    s = SidecarCalls(client, deployment, sidecar_token, "reporter")
    resp = put_report(s, {**report(1, live["sha256"]), **change})
    assert resp.status_code == status, resp.body
    assert words in json.loads(resp.body)["error"]["message"]


def test_only_the_sidecar_itself_can_report_for_it(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, viewer_token: str, live: dict[str, Any]
) -> None:
    s = SidecarCalls(client, deployment, sidecar_token, "victim")
    other = SidecarCalls(client, deployment, sidecar_token, "other")
    body = report(1, live["sha256"], import_errors=[MISSING], import_errors_total=1)
    assert put_report(s, body, secret=None).status_code == 403, "no secret"
    assert put_report(s, body, secret=other.secret).status_code == 403, "another sidecar's secret"
    for token in (deployer_token, viewer_token):
        resp = client.http.put(f"/deployments/{deployment}/sidecars/victim/parse", body=json.dumps(body),
                               headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                        "X-Dagcast-Sidecar-Secret": s.secret})
        assert resp.status_code == 403, (token, resp.body)
    assert app_module.get_store().list_parses(deployment, live["deploy_id"]) == []


def test_a_long_poll_answers_when_the_last_report_arrives(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, live: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = SidecarCalls(client, deployment, sidecar_token, "late")
    s.report_running(1, parser="airflow 3.3.2")
    control = app_module.get_control()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the report arrives during the poll's first pause
        sleeps.append(seconds)
        if len(sleeps) == 1:
            assert put_report(s, report(1, live["sha256"])).status_code == 200

    monkeypatch.setattr(control, "_sleep", sleep)
    view = control.get_deploy(deployment, live["deploy_id"], wait_seconds=30)
    assert view.parse.status == "parsed" and len(sleeps) == 1


def test_a_report_and_its_note_on_the_deploy_land_together_and_a_deploy_recorded_before_reports_takes_them(
    client: Client, deployment: str, sidecar_token: str, deployer_token: str, live: dict[str, Any]
) -> None:
    """The report and the deploy record's `parsed` note are one write; a deploy record from before
    parse reports existed (no `parsed` map) gets its map from the first report, and keeps the next."""
    store = app_module.get_store()
    key = {"pk": f"DEPLOYMENT#{deployment}", "sk": f"DEPLOY#{live['deploy_id']}"}
    store._table.update_item(Key=key, UpdateExpression="REMOVE parsed")
    first, second = (SidecarCalls(client, deployment, sidecar_token, n) for n in ("old-1", "old-2"))
    for s in (first, second):
        assert put_report(s, report(1, live["sha256"]), secret=s.secret).status_code == 200
    noted = store._table.get_item(Key=key, ConsistentRead=True)["Item"]["parsed"]
    assert sorted(noted) == ["old-1", "old-2"]
    assert sorted(r.sidecar for r in store.list_parses(deployment, live["deploy_id"])) == ["old-1", "old-2"]
    view = view_of(client, deployment, live["deploy_id"], deployer_token)
    assert view["parse"]["status"] != "none", view["parse"]


def test_a_wait_without_dag_ids_gets_the_same_view_but_them_and_a_bad_omit_or_until_is_refused(
    client: Client, deployment: str, deployer_token: str, live: dict[str, Any]
) -> None:
    """`dagcast deploy --wait` asks without the DAG ids (at 10,000 DAGs most of each answer): the
    rest of the view is the same, the field is left out rather than shown empty, and only that
    field can be left out."""
    assert live["dag_ids"] == ["a"]
    auth = {"Authorization": f"Bearer {deployer_token}"}
    path = f"/deployments/{deployment}/deploys/{live['deploy_id']}"
    whole = client.http.get(path, headers=auth).json_body
    for query in ("?omit=dag_ids", "?omit=dag_ids&wait=1"):
        brief = client.http.get(path + query, headers=auth)
        assert brief.status_code == 200, brief.body
        assert "dag_ids" not in brief.json_body["deploy"]
        for view in (whole, brief.json_body):
            view["deploy"].pop("dag_ids", None)
            for s in view["sidecars"]:
                s.pop("last_seen_s", None)
        assert brief.json_body == whole
    for bad in ("files", "dag_ids,errors", "x" * 100):
        resp = client.http.get(f"{path}?omit={bad}", headers=auth)
        assert resp.status_code == 400 and "'omit'" in json.loads(resp.body)["error"]["message"], resp.body
    settled = client.http.get(path + "?omit=dag_ids&wait=1&until=settled", headers=auth)
    assert settled.status_code == 200 and settled.json_body["converged"], settled.body
    for bad in ("live", "settled,parsed", "x" * 100):
        resp = client.http.get(f"{path}?wait=1&until={bad}", headers=auth)
        message = json.loads(resp.body)["error"]["message"]
        assert resp.status_code == 400 and "'until'" in message and len(message) < 120, resp.body
