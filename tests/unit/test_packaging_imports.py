"""What importing dagcast's modules pulls in: the CLI and the sidecar never import the server's or
the embedded stack's packages (so `pip install dagcast` without extras runs them), a command that
needs a missing extra says which one in one line, and the API's cold start leaves X-Ray, the
ingest function's code and the bundle reader for when they are used.

Each check runs in a fresh interpreter: sys.modules there holds what the imports alone brought.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every module the CLI, the sidecar and `dagcast sidecar --once` may import.
CLIENT_MODULES = [
    "dagcast", "dagcast.cli", "dagcast.sidecar", "dagcast.deploy", "dagcast.client", "dagcast.bundler",
    "dagcast.config", "dagcast.compile_cache", "dagcast.exceptions", "dagcast.extras", "dagcast.gitinfo",
    "dagcast.lease", "dagcast.lifetime", "dagcast.local", "dagcast.logs", "dagcast.observe", "dagcast.parse",
    "dagcast.parse_check", "dagcast.github_action", "chalicelib.bundle", "chalicelib.models", "chalicelib.manifest", "chalicelib.signing",
    "chalicelib.exceptions",
]
# What only the [server], [local] and [sidecar] extras install.
EXTRA_ONLY = {"boto3", "botocore", "s3transfer", "chalice", "moto", "aws_lambda_powertools", "aws_xray_sdk", "yaml",
              "cryptography", "werkzeug", "flask", "pydantic_settings"}


def run(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def top_level_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    out = run(code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))", env)
    return set(json.loads(out))


def test_importing_the_cli_and_sidecar_modules_imports_no_server_or_local_package() -> None:
    loaded = top_level_after("\n".join(f"import {m}" for m in CLIENT_MODULES))
    assert loaded & EXTRA_ONLY == set()


def test_validate_and_a_dry_run_deploy_import_no_server_or_local_package(tmp_path: Path) -> None:
    """The commands a CI job runs, run in-process: what they import on their way, not only at import."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "etl.py").write_text("from airflow import DAG\n\nwith DAG(dag_id='etl'):\n    pass\n")
    code = f"""
import contextlib, io
from dagcast.cli import main
for argv in (["validate", {str(dags)!r}, "--json"],
             ["deploy", "--dags", "--dags-path", {str(dags)!r}, "--dry-run", "--json",
              "--api-url", "http://127.0.0.1:9", "--token", "t", "--deployment", "d"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        main(argv)
"""
    loaded = top_level_after(code, {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert loaded & EXTRA_ONLY == set()


def test_the_api_cold_start_leaves_xray_ingest_and_the_bundle_reader_for_later() -> None:
    code = "import app\nimport sys\nprint(json.dumps(sorted(sys.modules)))"
    mods = set(json.loads(run("import json\n" + code, {"AWS_DEFAULT_REGION": "us-east-1"})))
    assert "aws_xray_sdk" not in mods, "X-Ray is imported only where tracing is on, at the first invocation"
    assert "chalicelib.ingest" not in mods and "aws_lambda_powertools.utilities.batch" not in mods
    assert "chalicelib.bundle.validate" not in mods and "chalicelib.bundle.compile_workers" not in mods
    assert "pydantic_settings" not in mods and "cryptography" not in mods


def test_tracing_starts_at_the_first_invocation_where_it_is_on() -> None:
    code = """
import sys
from chalicelib.settings import tracing_enabled
from chalicelib.telemetry import Tracing
tracing = Tracing("dagcast", tracing_enabled)
calls = []
traced = tracing.capture_method(lambda x: calls.append(x) or x * 2)
before = "aws_xray_sdk" in sys.modules
assert traced(21) == 42 and calls == [21]
print(before, "aws_xray_sdk.core" in sys.modules, tracing.tracer is not None)
"""
    off = run(code)
    on = run(code, {"LAMBDA_TASK_ROOT": "/var/task", "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR"})
    disabled = run(code, {"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"})
    assert off == "False False False"
    assert on == "False True True"
    assert disabled == "False False False"


@pytest.mark.parametrize(("argv", "extra", "hidden"), [
    (["local", "up", "--state-dir", "{tmp}"], "local", "moto"),
    (["sidecar", "--name", "s", "--root", "{tmp}/r", "--link", "{tmp}/l", "--api-url", "http://127.0.0.1:9",
      "--token", "t", "--deployment", "d"], "sidecar", "boto3"),
    (["admin", "create-token", "--table", "t", "--name", "n"], "server", "boto3"),
])
def test_a_command_whose_extra_is_missing_says_which_to_install_in_one_line(
        tmp_path: Path, argv: list[str], extra: str, hidden: str) -> None:
    """The extra's package made unimportable (as in `pip install dagcast`): exit 1, one line."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = f"""
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == {hidden!r} else real(name, *a)
sys.modules[{hidden!r}] = None
from dagcast.cli import main
main({args!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'dagcast[{extra}]'" in lines[0] and hidden in lines[0]
