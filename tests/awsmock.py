"""Plumbing for tests that run the app against moto's in-process mock."""
from __future__ import annotations

import boto3
import botocore.loaders
import botocore.session
import pytest

import app as app_module
from chalicelib.settings import get_settings

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
_LOADER = botocore.loaders.create_loader()


def use_fake_credentials(mp: pytest.MonkeyPatch) -> None:
    """Point boto3 at moto's in-process mock only: fake credentials, no profile, no endpoint override."""
    for name, value in FAKE_CREDENTIALS.items():
        mp.setenv(name, value)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_ENDPOINT_URL", raising=False)


def fresh_session() -> boto3.session.Session:
    """A new boto3 session sharing one botocore loader, so service models are parsed once per run, not per test."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, region_name=REGION)


def clear_app_caches() -> None:
    """Forget every cached client and service in app.py (and the settings), so they bind to the current mock."""
    for value in vars(app_module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    get_settings.cache_clear()
    app_module.telemetry.metrics.clear_metrics()  # metrics of code called without the flushing middleware
