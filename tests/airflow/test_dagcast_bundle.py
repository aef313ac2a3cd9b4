"""The Airflow 3 DAG bundle against the real apache-airflow package and the embedded stack.

Airflow runs in subprocesses (tests/airflow/driver.py and the `airflow` command), configured
only through AIRFLOW__* variables, as it is in a pod: one sidecar folder, one bundle storage.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import distribution
from pathlib import Path
from typing import IO, Any

import boto3
import pytest
from helpers import dag_source, files_of, parse_json_stdout, run_dagcast, stack_env, version_of_link, write_dags

from dagcast.lease import claim_for_removal

pytestmark = pytest.mark.integration

DRIVER = Path(__file__).with_name("driver.py")
MARK = "@@dagcast-test "
AIRFLOW = [sys.executable, "-m", "airflow"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dags"

Env = Callable[..., dict[str, str]]


def deploy(info: dict[str, Any], dags: Path) -> dict[str, Any]:
    args = ["deploy", "--dags", "--dags-path", str(dags), "--wait", "--force", "--json", "--allow-import-errors"]
    proc = run_dagcast(args, stack_env(info))
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["state"] == "ACTIVE" and doc["converged"], doc
    return doc


def bundle_version_of(doc: dict[str, Any]) -> str:
    """The Airflow bundle version of a deploy: its version folder, number and start of the sha256."""
    return f"{doc['version']}-{doc['sha256'][:16]}"


def sidecar_root(info: dict[str, Any]) -> Path:
    return Path(info["sidecars"][0]["dags_path"]).parent


def wait_live(root: Path, version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while version_of_link(root / "current") != version:
        assert time.monotonic() < deadline, f"sidecar at {root} not on v{version}"
        time.sleep(0.05)


def digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in files_of(folder).items()}


@pytest.fixture()
def airflow_env(stack: dict[str, Any], tmp_path: Path) -> Env:
    """Environment of an Airflow process whose bundle reads `root` and keeps copies in `storage`."""
    home = tmp_path / "airflow-home"
    home.mkdir()

    def make(root: Path, storage: Path | None = None) -> dict[str, str]:
        bundles = [{"name": "dagcast", "classpath": "dagcast.airflow.DagcastDagBundle",
                    "kwargs": {"root": str(root), "refresh_interval": 1}}]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        return {
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(storage or tmp_path / "bundle-storage"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "DAGCAST_API_URL": stack["api_url"],
            "DAGCAST_DEPLOYMENT": stack["deployment"],
            "DAGCAST_TOKEN": stack["sidecar_token"],  # what a worker pod has: the sidecar's role
        }

    return make


def drive(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True, text=True, timeout=120)
    answers = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert answers, f"driver answered nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(answers[-1])
    doc["exit"] = proc.returncode
    doc["log"] = proc.stdout + proc.stderr
    return doc


def read_answer(stream: IO[str]) -> dict[str, Any]:
    for line in stream:
        if line.startswith(MARK):
            doc: dict[str, Any] = json.loads(line[len(MARK):])
            return doc
    raise AssertionError("the driver exited without answering")


def test_dag_processor_parses_the_live_version_and_records_it_on_every_dag(
    stack: dict[str, Any], airflow_env: Env, tmp_path: Path
) -> None:
    root = sidecar_root(stack)
    first = deploy(stack, EXAMPLES)
    wait_live(root, first["version"])
    env = airflow_env(root)
    migrate = subprocess.run([*AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    def process_once() -> None:
        proc = subprocess.run([*AIRFLOW, "dag-processor", "--num-runs", "1"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def parsed() -> tuple[dict[str, str | None], list[tuple[str, str | None]], str]:
        with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
            dags = dict(db.execute("SELECT dag_id, bundle_version FROM dag WHERE bundle_name = 'dagcast' AND is_stale = 0"))
            versions = list(db.execute("SELECT dag_id, bundle_version FROM dag_version WHERE bundle_name = 'dagcast'"))
            (bundle_version,) = db.execute("SELECT version FROM dag_bundle WHERE name = 'dagcast'").fetchone()
        return dags, versions, bundle_version

    process_once()
    dags, versions, bundle_version = parsed()
    want = {"customer_churn_report", "daily_sales_etl", "warehouse_maintenance"}
    assert dags == {dag_id: bundle_version_of(first) for dag_id in want}
    assert sorted(versions) == sorted((dag_id, bundle_version_of(first)) for dag_id in want)
    assert bundle_version == bundle_version_of(first)

    changed = write_dags(tmp_path / "v2", {})
    shutil.copytree(EXAMPLES, changed, dirs_exist_ok=True)
    (changed / "daily_sales_etl.py").write_text(dag_source("daily_sales_etl"))  # same DAG id, other tasks
    (changed / "fresh.py").write_text(dag_source("fresh_report"))
    second = deploy(stack, changed)
    wait_live(root, second["version"])
    process_once()
    dags, versions, bundle_version = parsed()
    assert dags == {dag_id: bundle_version_of(second) for dag_id in want | {"fresh_report"}}
    assert bundle_version == bundle_version_of(second)
    assert ("fresh_report", bundle_version_of(second)) in versions


def test_a_pinned_version_keeps_its_files_while_refresh_moves_the_processor_on(
    stack: dict[str, Any], airflow_env: Env, tmp_path: Path
) -> None:
    root = sidecar_root(stack)
    old = write_dags(tmp_path / "old", {"etl.py": dag_source("etl", "# old\n"), "sql/q.sql": "select 1;\n"})
    new = write_dags(tmp_path / "new", {"etl.py": dag_source("etl", "# new\n"), "sql/q.sql": "select 2;\n"})
    first = deploy(stack, old)
    wait_live(root, first["version"])
    env = airflow_env(root)

    processor = subprocess.Popen([sys.executable, str(DRIVER), "processor"], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert processor.stdin is not None and processor.stdout is not None
        before = read_answer(processor.stdout)
        assert before["version"] == bundle_version_of(first) and before["files"] == digests(old)
        console = f"{stack['api_url'].rstrip('/')}/#d={stack['deployment']}&tab=history&v={bundle_version_of(first)}"
        assert before["view_url"] == console
        with claim_for_removal(root, bundle_version_of(first)) as claimed:
            assert not claimed  # the processor's lease: the sidecar cannot prune the folder it parses

        second = deploy(stack, new)
        wait_live(root, second["version"])
        processor.stdin.write("refresh\n")
        processor.stdin.flush()
        after = read_answer(processor.stdout)
        assert after["version"] == bundle_version_of(second) and after["files"] == digests(new)
        with claim_for_removal(root, bundle_version_of(second)) as claimed:
            assert not claimed
        with claim_for_removal(root, bundle_version_of(first)) as claimed:
            assert claimed  # released by the refresh
    finally:
        processor.kill()
        processor.wait()

    # A task of a DAG run that started on the first version still gets the first version's bytes.
    pinned = drive(env, "versioned", bundle_version_of(first))
    assert pinned["exit"] == 0, pinned
    assert pinned["version"] == bundle_version_of(first)
    assert pinned["files"] == digests(old)
    assert Path(pinned["path"]).is_relative_to(tmp_path / "bundle-storage")  # Airflow's own copy, tracked by Airflow


def test_a_version_missing_locally_is_fetched_and_a_corrupted_download_is_refused(
    stack: dict[str, Any], airflow_env: Env, tmp_path: Path
) -> None:
    root = sidecar_root(stack)
    dags = write_dags(tmp_path / "dags", {"etl.py": dag_source("fetched_etl"), "include/lib.py": "X = 1\n"})
    good = deploy(stack, dags)
    bad_dags = write_dags(tmp_path / "bad", {"etl.py": dag_source("tampered_etl")})
    bad = deploy(stack, bad_dags)
    wait_live(root, bad["version"])

    # Overwriting the stored bundle changes nothing: the version's downloads are pinned to the object
    # version ingest validated.
    s3 = boto3.client("s3", endpoint_url=stack["aws_endpoint_url"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    (bucket,) = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundle" in b["Name"]]
    key = f"bundles/{stack['deployment']}/{bad['deploy_id']}.tar.gz"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    never_had_it = tmp_path / "fresh-worker"  # a worker whose sidecar never saw these versions
    never_had_it.mkdir()
    for doc, folder in ((good, dags), (bad, bad_dags)):
        fetched = drive(airflow_env(never_had_it), "versioned", bundle_version_of(doc))
        assert fetched["exit"] == 0, fetched
        assert fetched["files"] == digests(folder)
        assert "fetched and verified" in fetched["log"]

    # Bytes that do not match the version record are refused (here the record says another sha256).
    table = boto3.resource("dynamodb", endpoint_url=stack["aws_endpoint_url"], region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing").Table("dagcast-local-state")
    wrong = "0" * 64
    table.update_item(Key={"pk": f"DEPLOYMENT#{stack['deployment']}", "sk": f"VERSION#{good['version']:010d}"},
                      UpdateExpression="SET sha256 = :s", ExpressionAttributeValues={":s": wrong})
    storage = tmp_path / "other-storage"
    refused = drive(airflow_env(never_had_it, storage), "versioned", f"{good['version']}-{wrong[:16]}")
    assert refused["exit"] == 1
    assert "failed verification" in refused["error"] and "does not match the version record" in refused["error"]
    assert not list((storage / "dagcast" / "versions").glob(f"{good['version']}-*"))
    assert not list((storage / "dagcast" / "versions").glob(".tmp-*"))
    gone = drive(airflow_env(never_had_it, storage), "versioned", bundle_version_of(good))
    assert gone["exit"] == 1 and "is now bundle 0000000000000000" in gone["error"], "the run's bundle is not silently replaced"

    unknown = drive(airflow_env(never_had_it, storage), "versioned", "99999-0123456789abcdef")
    assert unknown["exit"] == 1 and "has no version 99999" in unknown["error"]
    no_token = {k: v for k, v in airflow_env(never_had_it, storage).items() if k != "DAGCAST_TOKEN"}
    unconfigured = drive(no_token, "versioned", bundle_version_of(bad))
    assert unconfigured["exit"] == 1 and "needs token" in unconfigured["error"] and "DAGCAST_TOKEN" in unconfigured["error"]


def test_concurrent_initialize_from_several_processes_leaves_one_intact_copy(
    stack: dict[str, Any], airflow_env: Env, tmp_path: Path
) -> None:
    root = sidecar_root(stack)
    dags = write_dags(tmp_path / "dags", {f"dag_{i}.py": dag_source(f"concurrent_{i}") for i in range(40)})
    done = deploy(stack, dags)
    wait_live(root, done["version"])
    empty = tmp_path / "no-sidecar-copy"
    empty.mkdir()
    env = airflow_env(empty)
    procs = [
        subprocess.Popen([sys.executable, str(DRIVER), "versioned", bundle_version_of(done)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    docs = [read_answer(io.StringIO(out)) for out, _ in results]
    assert all(d["files"] == digests(dags) for d in docs)
    assert sum("fetched and verified" in out + err for out, err in results) == 1  # one download; the others waited
    versions = tmp_path / "bundle-storage" / "dagcast" / "versions"
    assert sorted(p.name for p in versions.iterdir()) == [bundle_version_of(done)]
    assert not any((tmp_path / "bundle-storage" / "dagcast" / "downloads").iterdir())


def test_airflow_example_dags_deploy_validate_and_parse_from_the_sidecar_folder(
    stack: dict[str, Any], airflow_env: Env, tmp_path: Path
) -> None:
    shipped = Path(str(distribution("apache-airflow-core").locate_file("airflow/example_dags")))
    assert (shipped / "tutorial.py").is_file()
    examples = tmp_path / "example_dags"
    shutil.copytree(shipped, examples, ignore=shutil.ignore_patterns("__pycache__"))
    valid = run_dagcast(["validate", str(examples)])
    assert valid.returncode == 0, valid.stdout + valid.stderr

    root = sidecar_root(stack)
    done = deploy(stack, examples)
    wait_live(root, done["version"])
    served = Path(os.path.realpath(root / "current"))
    assert digests(served) == digests(examples)

    env = airflow_env(root)
    from_sidecar = drive(env, "dagbag", str(served))
    original = drive(env, "dagbag", str(examples))
    assert from_sidecar["exit"] == 0 and original["exit"] == 0
    assert len(from_sidecar["dag_ids"]) > 30
    assert from_sidecar["dag_ids"] == original["dag_ids"]
    assert from_sidecar["import_errors"] == original["import_errors"]
