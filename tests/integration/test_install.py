"""The installs a user makes, each into a fresh venv from PyPI (with the pins of pyproject.toml):

- `pip install .` (CI jobs, laptops): no AWS SDK, Chalice or moto, within the package budget,
  and from it `dagcast --help`, `validate`, `deploy --dry-run` against the embedded stack,
  `sidecar --help` and `sidecar --once` work, while `local up` and the sidecar daemon say in
  one line which extra to install;
- the sidecar image's install step, the very `pip install` line of the Dockerfile with its
  constraints (there is no Docker engine here to build the image itself);
- the Dockerfiles' contract, read from the files: hadolint clean, non-root, the healthcheck on
  the port the sidecar serves /healthz on, `dagcast sidecar` as the entrypoint, and the Airflow
  variant on the release the [airflow] extra pins.

Each venv is built once per module (pip takes a while); the budgets are sizes and counts,
never timings.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import dag_source, parse_json_stdout, stack_env, version_of_link, write_dags

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOT_IN_THE_PLAIN_INSTALL = {"boto3", "botocore", "chalice", "moto", "aws-xray-sdk", "aws-lambda-powertools",
                            "cryptography", "flask", "werkzeug", "docker", "rich", "pygments"}
MAX_PACKAGES, MAX_MB = 20, 40


def packages(py: Path) -> set[str]:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True)
    return {p["name"].lower().replace("_", "-") for p in json.loads(out.stdout)}


def site_bytes(venv: Path) -> int:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())


def fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    return where


def pip(venv: Path, *args: str) -> None:
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    venv = fresh_venv(tmp_path_factory.mktemp("plain") / "venv")
    before, size = packages(venv / "bin" / "python"), site_bytes(venv)
    pip(venv, str(ROOT))
    yield {"venv": venv, "bin": venv / "bin", "added": packages(venv / "bin" / "python") - before,
           "mb": (site_bytes(venv) - size) / 1e6}
    shutil.rmtree(venv, ignore_errors=True)


def run(plain: dict[str, Any], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Not the dev venv's PATH or PYTHONPATH: the plain venv's own dagcast, as a CI job has it.
    clean = {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["PATH"] = f"{plain['bin']}:/usr/bin:/bin"
    return subprocess.run([str(plain["bin"] / "dagcast"), *args], capture_output=True, text=True, timeout=180,
                          env=clean, cwd=plain["venv"])


def test_the_plain_install_has_no_aws_sdk_chalice_or_moto_and_fits_its_budget(plain: dict[str, Any]) -> None:
    assert plain["added"] & NOT_IN_THE_PLAIN_INSTALL == set()
    assert "dagcast" in plain["added"]
    assert len(plain["added"]) <= MAX_PACKAGES, sorted(plain["added"])
    assert plain["mb"] <= MAX_MB, f"{plain['mb']:.1f} MB"


def test_help_validate_and_sidecar_help_run_from_the_plain_install(plain: dict[str, Any], tmp_path: Path) -> None:
    assert run(plain, "--help").returncode == 0
    sidecar_help = run(plain, "sidecar", "--help")
    assert sidecar_help.returncode == 0 and "--once" in sidecar_help.stdout
    good = write_dags(tmp_path / "good", {"etl.py": dag_source("etl")})
    valid = run(plain, "validate", str(good), "--json")
    assert valid.returncode == 0, valid.stderr
    assert parse_json_stdout(valid)["valid"] is True
    bad = write_dags(tmp_path / "bad", {"etl.py": dag_source("etl"), "broken.py": "def f(:\n"})
    rejected = run(plain, "validate", str(bad), "--json")
    assert rejected.returncode == 1
    assert [e["path"] for e in parse_json_stdout(rejected)["errors"]] == ["broken.py"]


def test_a_dry_run_deploy_and_a_sidecar_once_run_from_the_plain_install(
        plain: dict[str, Any], stack: dict[str, Any], tmp_path: Path) -> None:
    dags = write_dags(tmp_path / "dags", {"etl.py": dag_source("etl"), "sql/q.sql": "select 1\n"})
    dry = run(plain, "deploy", "--dags", "--dags-path", str(dags), "--dry-run", "--json", env=stack_env(stack))
    assert dry.returncode == 0, dry.stderr
    doc = parse_json_stdout(dry)
    assert doc["state"] == "DRY_RUN" and sorted(f["path"] for f in doc["files_list"]) == ["etl.py", "sql/q.sql"]
    # The init container's mode needs no extra: it asks the API for the live version and installs it.
    live = run(plain, "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", env=stack_env(stack))
    assert live.returncode == 0, live.stderr
    link = tmp_path / "current"
    once = run(plain, "sidecar", "--name", "init-plain", "--root", str(tmp_path / "versions"), "--link", str(link),
               "--once", env=stack_env(stack))
    assert once.returncode == 0, once.stderr
    assert (link / "sql" / "q.sql").read_text() == "select 1\n"
    assert version_of_link(link) >= 1


@pytest.mark.parametrize(("args", "extra"), [
    (["local", "up", "--state-dir", "{tmp}"], "local"),
    (["sidecar", "--name", "s", "--root", "{tmp}/r", "--link", "{tmp}/l", "--api-url", "http://127.0.0.1:9",
      "--token", "t", "--deployment", "d"], "sidecar"),
])
def test_a_command_that_needs_an_extra_says_which_from_the_plain_install(
        plain: dict[str, Any], tmp_path: Path, args: list[str], extra: str) -> None:
    proc = run(plain, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"pip install 'dagcast[{extra}]'" in proc.stderr


# --- the images ---------------------------------------------------------------------------


def dockerfile(name: str) -> str:
    return (ROOT / name).read_text()


def joined_lines(text: str) -> list[str]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[str] = []
    buf = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if buf:
                out.append(buf)
            buf = ""
    return out


def test_the_sidecar_image_install_step_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """The Dockerfile's own `pip install` line, with its constraints file, /src being this checkout."""
    run_lines = [line for line in joined_lines(dockerfile("Dockerfile")) if line.startswith("RUN ") and "pip install" in line]
    assert len(run_lines) == 1
    pip_cmd = next(part for part in run_lines[0][4:].split("&&") if "pip install" in part)
    words = [w.replace("/src", str(ROOT)) for w in shlex.split(pip_cmd)]
    assert words[0] == "/opt/dagcast/bin/pip" and "--constraint" in words
    venv = fresh_venv(tmp_path / "image-venv")
    proc = subprocess.run([str(venv / "bin" / "pip"), *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    py = venv / "bin" / "python"
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    constraints = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                   for line in (ROOT / "constraints" / "sidecar.txt").read_text().splitlines()
                   if line and not line.startswith("#")}
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout)}
    assert {name for name in installed if name not in ("pip", "setuptools", "dagcast")} == set(constraints), \
        "constraints/sidecar.txt pins every package of the image, and only those"
    assert all(installed[name] == version for name, version in constraints.items())
    daemon_needs = subprocess.run([str(py), "-c", "import boto3, cryptography, dagcast.cli"], capture_output=True, text=True)
    assert daemon_needs.returncode == 0, daemon_needs.stderr
    assert subprocess.run([str(venv / "bin" / "dagcast"), "sidecar", "--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.airflow"])
def test_a_dockerfile_runs_the_sidecar_unprivileged_with_a_healthcheck_on_its_metrics_port(name: str) -> None:
    lines = joined_lines(dockerfile(name))
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", "the last USER is a numeric non-root id"
    assert [line for line in lines if line.startswith("ENTRYPOINT ")] == ['ENTRYPOINT ["dagcast", "sidecar"]']
    health = next(line for line in lines if line.startswith("HEALTHCHECK "))
    assert "/healthz" in health and "DAGCAST_METRICS_ADDR" in health
    cli = (ROOT / "dagcast" / "cli.py").read_text()
    assert 'envvar="DAGCAST_METRICS_ADDR"' in cli, "the healthcheck follows the sidecar's --metrics-addr"
    default_port = re.search(r'"--metrics-addr", default="[^"]*:(\d+)"', cli)
    assert default_port and f"DAGCAST_METRICS_ADDR=0.0.0.0:{default_port.group(1)}" in " ".join(lines)
    assert any(line.startswith("VOLUME ") and "/var/lib/dagcast" in line for line in lines), "the only place it writes"


def test_the_airflow_image_is_the_release_the_airflow_extra_pins() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["airflow"]
    version = next(r.split("==")[1] for r in extra if r.startswith("apache-airflow=="))
    base = next(line.split()[1] for line in joined_lines(dockerfile("Dockerfile.airflow")) if line.startswith("FROM "))
    assert re.fullmatch(rf"apache/airflow:slim-{re.escape(version)}-python3\.1\d", base), base
    assert f'"apache-airflow=={version}"' in dockerfile("Dockerfile.airflow"), "pip keeps the image's Airflow"


def test_the_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "Dockerfile", "Dockerfile.airflow"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
