"""`make package` builds the CloudFormation template and the code zip offline of AWS, and cfn-lint passes.

It runs `chalice package`, which downloads the Lambda wheels from PyPI: without a network this
test is skipped, saying so.
"""
from __future__ import annotations

import os
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not pypi_reachable(), reason="offline: `chalice package` downloads the Lambda wheels from PyPI")
def test_make_package_works_without_aws_credentials_and_passes_cfn_lint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    proc = subprocess.run(["make", "-s", "package", f"PACKAGE_DIR={tmp_path / 'pkg'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    template = (tmp_path / "pkg" / "sam.yaml").read_text()
    assert "FunctionResponseTypes" in template and "ReportBatchItemFailures" in template
    assert (tmp_path / "pkg" / "deployment.zip").stat().st_size > 1_000_000
    with zipfile.ZipFile(tmp_path / "pkg" / "deployment.zip") as z:
        top = {name.split("/")[0] for name in z.namelist()}
    # every package app.py and chalicelib import is in the zip (chalicelib.signing: cryptography)
    assert {"app.py", "chalicelib", "chalice", "boto3", "aws_lambda_powertools", "aws_xray_sdk", "pydantic",
            "cryptography"} <= top
    assert not top & {"moto", "click", "httpx", "dagcast", "pydantic_settings"}, "nothing the functions do not import"
