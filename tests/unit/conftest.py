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
import botocore.loaders
import botocore.session
import pytest
from chalice.test import Client
from moto import mock_aws

import app as app_module
from chalicelib.bundle import write_bundle
from chalicelib.models import CreateDeployment, Mechanism, Role
from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings
from dagcast.bootstrap import StackOutputs, bootstrap

REGION = "us-east-1"
DEPLOYMENT = "analytics"

_CACHED = (
    app_module.get_store,
    app_module.get_bundles,
    app_module.get_control,
    app_module.get_ingest,
    app_module.get_auth,
    app_module.get_sns,
    app_module.get_publisher,
    get_settings,
)


_LOADER = botocore.loaders.create_loader()


def _session() -> boto3.session.Session:
    """A new boto3 session sharing one botocore loader, so service models are parsed once per run, not per test."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, region_name=REGION)


def _clear_caches() -> None:
    for fn in _CACHED:
        fn.cache_clear()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[StackOutputs]:
    """A fresh moto account holding dagcast's stack; the app's cached clients bind to it."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
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
