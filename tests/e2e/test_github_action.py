"""The GitHub Action (action.yml) against the embedded stack: its deploy step's own `run:` script,
run by bash with the environment GitHub would give it (the inputs through the step's `env:`,
$RUNNER_TEMP, $GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY, the checkout as the working directory).

The install step is `pip install` of the action's checkout, which tests/integration/test_install.py
covers; here $RUNNER_TEMP/dagcast/bin/python is the test's own interpreter.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import dag_source, write_dags

from dagcast.github_action import annotation, commands_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())


def run_deploy_step(stack: dict[str, Any], checkout: Path, tmp: Path, **inputs: str) -> tuple[int, str, dict[str, str], str]:
    """(exit code, stdout, the step's outputs, the job summary) of action.yml's deploy step."""
    step = next(s for s in ACTION["runs"]["steps"] if s.get("id") == "deploy")
    values = {name: spec.get("default", "") for name, spec in ACTION["inputs"].items()}
    values.update({"api-url": stack["api_url"], "token": stack["token"], "deployment": stack["deployment"]})
    values.update(inputs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGCAST_")}
    for name, expr in step["env"].items():
        env[name] = re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: values[m.group(1)], expr)
    runner_temp = tmp / "runner"
    (runner_temp / "dagcast" / "bin").mkdir(parents=True, exist_ok=True)
    python = runner_temp / "dagcast" / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    outputs, summary = tmp / "output", tmp / "summary"
    env.update(RUNNER_TEMP=str(runner_temp), GITHUB_OUTPUT=str(outputs), GITHUB_STEP_SUMMARY=str(summary),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    got = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    return proc.returncode, proc.stdout, got, summary.read_text()


def test_the_action_declares_the_inputs_and_outputs_it_documents() -> None:
    assert set(ACTION["inputs"]) >= {"api-url", "token", "deployment", "dags-path", "wait", "timeout", "description"}
    assert set(ACTION["outputs"]) >= {"deploy-id", "version", "state"}
    assert ACTION["runs"]["using"] == "composite"
    for name, spec in ACTION["outputs"].items():
        assert spec["value"] == f"${{{{ steps.deploy.outputs.{name} }}}}"
    step = next(s for s in ACTION["runs"]["steps"] if s.get("id") == "deploy")
    assert "${{" not in step["run"], "inputs reach the script through env only (no expression injection)"
    example = yaml.safe_load((ROOT / "examples" / "ci" / "deploy-dags.yml").read_text())
    uses = [s.get("uses", "") for s in example["jobs"]["deploy"]["steps"]]
    assert any(u.split("@")[0].endswith("/dagcast") for u in uses), "the example workflow uses the action"


def test_a_deploy_through_the_action_goes_live_and_sets_its_outputs(stack: dict[str, Any], tmp_path: Path) -> None:
    checkout = tmp_path / "repo"
    write_dags(checkout / "dags", {"etl.py": dag_source("action_etl"), "sql/q.sql": f"select '{tmp_path.name}'\n"})
    code, out, outputs, summary = run_deploy_step(stack, checkout, tmp_path, description="through the action")
    assert code == 0, out
    assert outputs["state"] == "ACTIVE" and int(outputs["version"]) >= 1 and outputs["deploy-id"]
    assert outputs["exit-code"] == "0"
    assert f"::notice::deployed v{outputs['version']} (ACTIVE), deploy {outputs['deploy-id']}" in out
    assert "dagcast deploy: deployed" in summary and outputs["deploy-id"] in summary


def test_a_rejected_file_becomes_an_annotation_on_that_file_and_line(stack: dict[str, Any], tmp_path: Path) -> None:
    checkout = tmp_path / "repo"
    write_dags(checkout / "airflow" / "dags", {"etl.py": dag_source("action_ok"), "pkg/broken.py": "x = 1\ndef f(:\n"})
    code, out, outputs, _ = run_deploy_step(stack, checkout, tmp_path, **{"dags-path": "airflow/dags"})
    assert code == 3, out
    errors = [line for line in out.splitlines() if line.startswith("::error file=")]
    assert len(errors) == 1 and errors[0].startswith("::error file=airflow/dags/pkg/broken.py,line=2::syntax_error"), out
    assert outputs["exit-code"] == "3" and outputs["version"] == ""


def test_workflow_commands_escape_what_github_would_misread() -> None:
    assert annotation("a\nb: 100%", "d/a,b.py", 3) == "::error file=d/a%2Cb.py,line=3::a%0Ab: 100%25"
    timeout = commands_for({"error": {"code": "wait_timeout", "message": "gave up"},
                            "sidecars": [{"name": "w0", "version": 4}]}, 4, "dags")
    assert timeout == ["::error::deploy failed (exit 4): wait_timeout: gave up (sidecars: w0 v4)"]
    imports = commands_for({"parse": {"import_errors": [{"path": "etl.py", "line": 7, "type": "ModuleNotFoundError",
                                                         "message": "No module named 'x'"}]},
                            "error": {"code": "import_errors", "message": "new import errors"}}, 5, "./dags")
    assert imports[0] == "::error file=dags/etl.py,line=7::ModuleNotFoundError: No module named 'x'"
