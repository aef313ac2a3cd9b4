"""What a version changed file by file, a text diff of one file, and who a token is (the console's deploy page)."""
from __future__ import annotations

from typing import Any

import pytest
from chalice.test import Client
from test_ingest import dag, deploy_and_ingest

from chalicelib import filediff
from dagcast.bootstrap import StackOutputs

MakeBundle = Any

V1 = {"dags/etl.py": dag("etl"), "dags/old.py": dag("old"), "dags/data.bin": b"\x00\x01\x02",
      "dags/big.sql": "select 1;\n" * 30_000, "dags/same.sql": "select 2;\n"}
V2 = {"dags/etl.py": dag("etl").replace("schedule=None", "schedule='@daily'"), "dags/new.py": dag("new"),
      "dags/data.bin": b"\x00\x01\x03", "dags/big.sql": "select 1;\n" * 30_001, "dags/same.sql": "select 2;\n"}


def get(client: Client, token: str, path: str) -> Any:
    return client.http.get(path, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def two_versions(client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle) -> list[str]:
    """v1 then v2 of the deployment, both through ingest; their deploy ids."""
    return [deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle(files))["deploy_id"] for files in (V1, V2)]


def test_files_lists_what_a_version_added_removed_and_changed_against_the_one_before_with_sizes(
    client: Client, deployment: str, deployer_token: str, two_versions: list[str]
) -> None:
    resp = get(client, deployer_token, f"/deployments/{deployment}/deploys/{two_versions[1]}/files")
    assert resp.status_code == 200, resp.body
    doc = resp.json_body
    assert (doc["version"], doc["base_version"], doc["base_deploy_id"]) == (2, 1, two_versions[0])
    assert doc["added"] == [{"path": "dags/new.py", "size": len(V2["dags/new.py"]), "base_size": None}]
    assert doc["removed"] == [{"path": "dags/old.py", "size": len(V1["dags/old.py"]), "base_size": None}]
    assert [(c["path"], c["size"], c["base_size"]) for c in doc["changed"]] == [
        ("dags/big.sql", len(V2["dags/big.sql"]), len(V1["dags/big.sql"])),
        ("dags/data.bin", 3, 3),
        ("dags/etl.py", len(V2["dags/etl.py"]), len(V1["dags/etl.py"])),
    ]
    assert (doc["added_total"], doc["removed_total"], doc["changed_total"], doc["truncated"]) == (1, 1, 3, False)
    assert doc["diff_max_bytes"] == filediff.DIFF_MAX_BYTES


def test_the_first_version_has_no_base_and_adds_every_file(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    first = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/a.py": dag("a")}))
    doc = get(client, deployer_token, f"/deployments/{deployment}/deploys/{first['deploy_id']}/files").json_body
    assert doc["base_version"] is None and [a["path"] for a in doc["added"]] == ["dags/a.py"]
    assert doc["removed"] == [] and doc["changed"] == []


def test_the_lists_are_capped_and_say_so_while_the_totals_stay_exact(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(filediff, "MAX_LISTED_FILES", 2)
    first = deploy_and_ingest(client, aws, deployment, deployer_token,
                              make_bundle({f"dags/q{i}.sql": f"select {i};\n" for i in range(5)}))
    doc = get(client, deployer_token, f"/deployments/{deployment}/deploys/{first['deploy_id']}/files").json_body
    assert [a["path"] for a in doc["added"]] == ["dags/q0.sql", "dags/q1.sql"]
    assert (doc["added_total"], doc["truncated"], doc["max_listed"]) == (5, True, 2)


def test_a_changed_text_file_gets_a_unified_diff_read_from_the_two_bundles(
    client: Client, deployment: str, deployer_token: str, two_versions: list[str]
) -> None:
    resp = get(client, deployer_token, f"/deployments/{deployment}/deploys/{two_versions[1]}/files/diff?path=dags/etl.py")
    assert resp.status_code == 200, resp.body
    doc = resp.json_body
    assert (doc["status"], doc["version"], doc["base_version"], doc["truncated"]) == ("changed", 2, 1, False)
    lines = doc["diff"].splitlines()
    assert lines[:2] == ["--- v1/dags/etl.py", "+++ v2/dags/etl.py"]
    assert "-with DAG('etl', start_date=datetime(2024, 1, 1), schedule=None):" in lines
    assert "+with DAG('etl', start_date=datetime(2024, 1, 1), schedule='@daily'):" in lines


def test_an_added_or_removed_file_is_diffed_against_nothing_and_an_unchanged_one_has_no_diff(
    client: Client, deployment: str, deployer_token: str, two_versions: list[str]
) -> None:
    base = f"/deployments/{deployment}/deploys/{two_versions[1]}/files/diff?path="
    added = get(client, deployer_token, base + "dags/new.py").json_body
    assert added["status"] == "added" and added["diff"].startswith("--- /dev/null\n+++ v2/dags/new.py\n")
    removed = get(client, deployer_token, base + "dags/old.py").json_body
    assert removed["status"] == "removed" and removed["diff"].startswith("--- v1/dags/old.py\n+++ /dev/null\n")
    same = get(client, deployer_token, base + "dags/same.sql").json_body
    assert (same["status"], same["diff"]) == ("unchanged", "")


@pytest.mark.parametrize(("path", "why"), [("dags/data.bin", "binary"), ("dags/big.sql", "KiB")])
def test_a_binary_or_too_large_file_is_refused_with_a_clear_400(
    client: Client, deployment: str, deployer_token: str, two_versions: list[str], path: str, why: str
) -> None:
    resp = get(client, deployer_token, f"/deployments/{deployment}/deploys/{two_versions[1]}/files/diff?path={path}")
    assert resp.status_code == 400, resp.body
    assert resp.json_body["error"]["code"] == "diff_refused" and why in resp.json_body["error"]["message"]


def test_a_diff_of_a_file_in_neither_version_is_404_and_without_a_path_400(
    client: Client, deployment: str, deployer_token: str, two_versions: list[str]
) -> None:
    base = f"/deployments/{deployment}/deploys/{two_versions[1]}/files/diff"
    missing = get(client, deployer_token, base + "?path=dags/nowhere.py")
    assert missing.status_code == 404 and missing.json_body["error"]["code"] == "not_found"
    assert get(client, deployer_token, base).status_code == 400


def test_a_deploy_that_never_went_live_has_no_files_to_compare(
    client: Client, aws: StackOutputs, deployment: str, deployer_token: str, make_bundle: MakeBundle
) -> None:
    broken = deploy_and_ingest(client, aws, deployment, deployer_token, make_bundle({"dags/b.py": "def f(:\n"}))
    resp = get(client, deployer_token, f"/deployments/{deployment}/deploys/{broken['deploy_id']}/files")
    assert resp.status_code == 409 and "REJECTED" in resp.json_body["error"]["message"]


def test_whoami_names_the_token_with_its_role_and_scope(client: Client, deployment: str, viewer_token: str) -> None:
    resp = get(client, viewer_token, "/whoami")
    assert resp.status_code == 200
    assert resp.json_body == {"name": "unit-viewer", "role": "viewer", "deployments": [deployment], "permissions": ["read"]}
