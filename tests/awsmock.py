"""Plumbing for tests that run the app against moto's in-process mock."""
from __future__ import annotations

import boto3
import botocore.loaders
import botocore.session

import app as app_module
from chalicelib.settings import get_settings

REGION = "us-east-1"
_LOADER = botocore.loaders.create_loader()


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
