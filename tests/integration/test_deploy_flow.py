"""The walking skeleton end to end: `dagcast deploy --dags` to files under every sidecar's dags link.

Runs against `dagcast local up`: a real moto server over HTTP on 127.0.0.1, real presigned
POST uploads, S3 notifications through SQS, SNS fan-out and sidecar long polls.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from helpers import Api, dag_source, files_of, parse_json_stdout, run_dagcast, stack_env, version_of_link, write_dags


def deploy(info: dict[str, Any], dags: Path, *args: str) -> Any:
    return run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", *args], stack_env(info))


def live_version(sidecar: dict[str, str]) -> int:
    return version_of_link(sidecar["dags_path"])


def test_two_deploys_land_exactly_on_every_sidecar_and_keep_the_old_version(stack: dict[str, Any], tmp_path: Path) -> None:
    v1_files = {
        "etl.py": dag_source("etl"),
        "reports/weekly.py": dag_source("weekly"),
        "sql/q.sql": "select 1;\n",
        "old.py": dag_source("old"),
    }
    dags = write_dags(tmp_path / "dags", v1_files)
    first = deploy(stack, dags)
    assert first.returncode == 0, first.stderr
    doc1 = parse_json_stdout(first)
    assert doc1["state"] == "ACTIVE" and doc1["errors"] == []
    for sidecar in stack["sidecars"]:
        assert live_version(sidecar) == doc1["version"]
        assert files_of(Path(sidecar["dags_path"]).resolve()) == files_of(dags)

    (dags / "old.py").unlink()
    (dags / "etl.py").write_text(dag_source("etl", "# changed\n"))
    (dags / "new.py").write_text(dag_source("new"))
    second = deploy(stack, dags)
    assert second.returncode == 0, second.stderr
    doc2 = parse_json_stdout(second)
    assert doc2["version"] == doc1["version"] + 1
    for sidecar in stack["sidecars"]:
        link = Path(sidecar["dags_path"])
        assert not os.path.isabs(os.readlink(link)), "the link target must be relative"
        assert files_of(link.resolve()) == files_of(dags)
        old = link.parent / "versions" / f"{doc1['version']}-{doc1['sha256'][:16]}"
        assert old.is_dir(), "the previous version must stay for tasks still running on it"
        assert (old / "old.py").read_text() == v1_files["old.py"]
        assert "# changed" not in (old / "etl.py").read_text()


def delta_fetches(sidecar: dict[str, str]) -> float:
    text = httpx.get(sidecar["metrics_url"] + "/metrics", timeout=10).text
    [line] = [x for x in text.splitlines() if x.startswith('dagcast_sidecar_fetches_total{kind="delta"}')]
    return float(line.split()[-1])


def test_an_everyday_change_reaches_every_sidecar_as_a_delta_and_lands_exactly(stack: dict[str, Any], tmp_path: Path) -> None:
    files = {f"team_{i % 4}/dag_{i}.py": dag_source(f"dag_{i}", "# " + "x" * 2000 + "\n") for i in range(40)}
    dags = write_dags(tmp_path / "dags", files)
    assert deploy(stack, dags).returncode == 0
    before = [delta_fetches(s) for s in stack["sidecars"]]
    (dags / "team_1/dag_1.py").write_text(dag_source("dag_1", "# changed\n"))
    (dags / "team_2/dag_2.py").unlink()
    proc = deploy(stack, dags)
    assert proc.returncode == 0, proc.stderr
    version = parse_json_stdout(proc)["version"]
    for sidecar, count in zip(stack["sidecars"], before, strict=True):
        assert live_version(sidecar) == version
        assert files_of(Path(sidecar["dags_path"]).resolve()) == files_of(dags)
        assert delta_fetches(sidecar) == count + 1, "the sidecar built the version from its delta"


def test_server_rejects_a_syntax_error_and_sidecars_keep_the_live_version(stack: dict[str, Any], tmp_path: Path) -> None:
    good = write_dags(tmp_path / "good", {"ok.py": dag_source("ok")})
    assert deploy(stack, good).returncode == 0
    before = {s["name"]: live_version(s) for s in stack["sidecars"]}

    broken = write_dags(tmp_path / "broken", {"ok.py": dag_source("ok"), "pkg/broken.py": "x = 1\ndef oops(:\n    pass\n"})
    proc = deploy(stack, broken, "--skip-validation")
    assert proc.returncode == 3, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["state"] == "REJECTED"
    assert [(e["path"], e["line"], e["code"]) for e in doc["errors"]] == [("pkg/broken.py", 2, "syntax_error")]
    assert f"{broken}/pkg/broken.py:2: syntax_error:" in proc.stderr

    record = Api(stack).json("GET", f"/deployments/{stack['deployment']}/deploys/{doc['deploy_id']}")
    assert record["deploy"]["state"] == "REJECTED"
    assert record["deploy"]["errors"][0]["path"] == "pkg/broken.py"
    assert record["deploy"]["version"] is None
    assert {s["name"]: live_version(s) for s in stack["sidecars"]} == before


def test_local_validation_failure_uploads_nothing(stack: dict[str, Any], tmp_path: Path) -> None:
    api = Api(stack)
    path = f"/deployments/{stack['deployment']}/deploys?limit=100"
    count = len(api.json("GET", path)["items"])
    broken = write_dags(tmp_path / "dags", {"bad.py": "def f(:\n"})
    proc = deploy(stack, broken)
    assert proc.returncode == 3
    assert "bad.py:1: syntax_error" in proc.stderr
    assert "nothing was uploaded" in proc.stderr
    assert len(api.json("GET", path)["items"]) == count


def test_sidecar_once_syncs_the_live_version_and_exits(stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"once.py": dag_source("once")})
    assert deploy(stack, dags).returncode == 0
    root, link = tmp_path / "root", tmp_path / "airflow-dags"
    proc = run_dagcast(["sidecar", "--name", "init", "--root", str(root), "--link", str(link), "--once"], stack_env(stack))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink()
    assert files_of(link.resolve()) == files_of(dags)


def test_deploy_is_refused_while_the_deployment_accepts_only_image_deploys(stack: dict[str, Any], tmp_path: Path) -> None:
    api = Api(stack)
    api.json("POST", "/deployments", {"name": "image-only"})
    dags = write_dags(tmp_path / "dags", {"a.py": dag_source("a")})
    env = stack_env(stack, DAGCAST_DEPLOYMENT="image-only")
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--no-wait"], env)
    assert proc.returncode == 1
    assert "DAG-only deploys are disabled" in proc.stderr and "Traceback" not in proc.stderr

    api.json("PATCH", "/deployments/image-only", {"mechanism": "DAG_ONLY"})
    proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert parse_json_stdout(proc)["state"] == "ACTIVE"


def test_deploy_refuses_a_missing_or_empty_folder(stack: dict[str, Any], tmp_path: Path) -> None:
    missing = run_dagcast(["deploy", "--dags", "--dags-path", str(tmp_path / "nope")], stack_env(stack))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty" / "__pycache__").mkdir(parents=True)
    (tmp_path / "empty" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    empty = run_dagcast(["deploy", "--dags", "--dags-path", str(tmp_path / "empty")], stack_env(stack))
    assert empty.returncode == 2 and "no files to deploy" in empty.stderr
    assert "Traceback" not in missing.stderr + empty.stderr


def test_api_refuses_requests_without_a_valid_token(stack: dict[str, Any]) -> None:
    api = Api(stack)
    path = f"/deployments/{stack['deployment']}/deploys"
    for token in ("", "dgc_" + "x" * 43, "not-a-token"):
        resp = api.call("GET", path, token=token or "none")
        assert resp.status_code == 401
        assert set(resp.json()["error"]) == {"code", "message"}
    assert api.call("GET", "/openapi.json").json()["paths"]
