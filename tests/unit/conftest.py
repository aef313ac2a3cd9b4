"""Fixtures for the unit tests of the Chalice app: an in-process moto account with dagcast's resources.

Nothing here is autouse: tests opt in by naming a fixture, so tests in this folder that do
not need AWS (the validator's, for example) are unaffected.
"""
from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from awsmock import clear_app_caches, fresh_session, use_fake_credentials
from chalice.test import Client
from moto import mock_aws

import app as app_module
from chalicelib.bundle import write_bundle
from chalicelib.models import CreateDeployment, Mechanism, Role
from chalicelib.service import ControlPlane
from dagcast.bootstrap import StackOutputs, bootstrap

REGION = "us-east-1"
DEPLOYMENT = "analytics"

def _session() -> boto3.session.Session:
    return fresh_session()


def _clear_caches() -> None:
    clear_app_caches()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[StackOutputs]:
    """A fresh moto account holding dagcast's stack; the app's cached clients bind to it."""
    use_fake_credentials(monkeypatch)
    _clear_caches()
    with mock_aws():
        # moto resets boto3's default session for the mock; the app's clients come from this one.
        boto3.DEFAULT_SESSION = _session()
        outputs = bootstrap(_session(), "unit")
        monkeypatch.setenv("DAGCAST_TABLE_NAME", outputs.table_name)
        monkeypatch.setenv("DAGCAST_BUNDLES_BUCKET", outputs.bucket)
        monkeypatch.setenv("DAGCAST_TOPIC_ARN", outputs.topic_arn)
        try:
            yield outputs
        finally:
            _clear_caches()


@pytest.fixture
def control(aws: StackOutputs) -> ControlPlane:
    return app_module.get_control()


@pytest.fixture
def deployment(control: ControlPlane) -> str:
    """A deployment that accepts DAG-only deploys; its name."""
    control.create_deployment(CreateDeployment(name=DEPLOYMENT, mechanism=Mechanism.DAG_ONLY))
    return DEPLOYMENT


@pytest.fixture
def admin_token(control: ControlPlane, deployment: str) -> str:
    return control.issue_token("unit-admin", Role.ADMIN, ["*"])


@pytest.fixture
def deployer_token(control: ControlPlane, deployment: str) -> str:
    return control.issue_token("unit-deployer", Role.DEPLOYER, [deployment])


@pytest.fixture
def viewer_token(control: ControlPlane, deployment: str) -> str:
    return control.issue_token("unit-viewer", Role.VIEWER, [deployment])


@pytest.fixture
def sidecar_token(control: ControlPlane, deployment: str) -> str:
    return control.issue_token("unit-sidecar", Role.SIDECAR, [deployment])


@pytest.fixture
def client(aws: StackOutputs) -> Client:
    return Client(app_module.app)


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[[dict[str, bytes | str]], bytes]:
    """Build a real bundle (the bytes `dagcast deploy` would upload) from {relative path: content}."""
    counter = itertools.count()

    def build(files: dict[str, bytes | str]) -> bytes:
        root = tmp_path / f"dags-{next(counter)}"
        root.mkdir()
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        out = io.BytesIO()
        info = write_bundle(root, list(files), out)
        data = out.getvalue()
        assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
        return data

    return build
