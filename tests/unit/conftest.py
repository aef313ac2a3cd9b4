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
from typing import Any

import boto3
import pytest
from awsmock import clear_app_caches, fresh_session, use_fake_credentials
from chalice.test import Client
from moto import mock_aws

import app as app_module
from chalicelib.bundle import write_bundle
from chalicelib.models import CreateDeployment, Heartbeat, Mechanism, RegisterSidecar, Registration, Role, SidecarView
from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings
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
        monkeypatch.setenv("DAGCAST_SIGNING_KEY_ARN", outputs.signing_key_arn)
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


class Sidecars:
    """Sidecars registered through the control plane, each reporting with its own secret."""

    def __init__(self, control: ControlPlane, deployment: str) -> None:
        self.control = control
        self.deployment = deployment
        self.secrets: dict[str, str] = {}
        control.issue_token("unit-sidecars", Role.SIDECAR, [deployment])
        token = app_module.get_store().token_by_name("unit-sidecars")
        assert token is not None
        self.token = token

    def register(self, name: str, component: str = "unknown") -> Registration:
        reg = self.control.register_sidecar(
            self.deployment, RegisterSidecar(name=name, component=component), self.token, self.secrets.get(name)
        )
        self.secrets[name] = reg.secret
        return reg

    def report(self, name: str, version: int, **fields: Any) -> SidecarView:
        """A heartbeat saying it runs `version`, with that version's exact identity when it was published."""
        # read beside the app (not through its store, whose reads some tests count)
        table = boto3.resource("dynamodb").Table(get_settings().table_name)
        pk = f"DEPLOYMENT#{self.deployment}"
        record = table.get_item(Key={"pk": pk, "sk": f"VERSION#{version:010d}"}).get("Item") or {}
        sha256, uid = record.get("sha256"), record.get("deployment_id")
        uid = uid or table.get_item(Key={"pk": pk, "sk": "META"})["Item"]["uid"]
        body = Heartbeat(version=version, sha256=sha256, deployment_id=uid if version else None, **fields)
        return self.control.heartbeat(self.deployment, name, body, self.secrets[name])


@pytest.fixture
def sidecars(control: ControlPlane, deployment: str) -> Sidecars:
    return Sidecars(control, deployment)
