"""EMF metrics printed by the functions: names, dimensions and values CloudWatch will see."""
from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from conftest import Sidecars

import app as app_module
from chalicelib.models import CreateDeploy
from chalicelib.service import ControlPlane
from dagcast.bootstrap import StackOutputs


def upload_and_ingest(control: ControlPlane, aws: StackOutputs, deployment: str, bundle: bytes) -> str:
    created = control.create_deploy(deployment, CreateDeploy(sha256=hashlib.sha256(bundle).hexdigest(), size=len(bundle)), "t")
    boto3.client("s3").put_object(Bucket=aws.bucket, Key=created.deploy.key, Body=bundle)
    notification = {"Records": [{
        "eventName": "ObjectCreated:Post",
        "s3": {"bucket": {"name": aws.bucket}, "object": {"key": urllib.parse.quote_plus(created.deploy.key), "size": len(bundle)}},
    }]}
    event = {"Records": [{
        "messageId": "m1", "receiptHandle": "r1", "body": json.dumps(notification), "attributes": {},
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
        "awsRegion": "us-east-1",
    }]}
    assert app_module.ingest(event, None) == {"batchItemFailures": []}
    return created.deploy.deploy_id


def emf_lines(out: str) -> list[dict[str, Any]]:
    return [doc for line in out.splitlines() if line.startswith("{") and "_aws" in (doc := json.loads(line))]


def metric_values(docs: list[dict[str, Any]]) -> dict[tuple[str, tuple[str, ...]], Any]:
    """{(metric name, sorted dimension names): value} over every EMF document."""
    found: dict[tuple[str, tuple[str, ...]], Any] = {}
    for doc in docs:
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == "dagcast"
            for dims in directive["Dimensions"]:
                for metric in directive["Metrics"]:
                    value = doc[metric["Name"]]
                    if isinstance(value, list):  # EMF allows arrays; one event, one value
                        [value] = value
                    found[(metric["Name"], tuple(sorted(dims)))] = (value, metric["Unit"], {d: doc[d] for d in dims})
    return found


def test_an_accepted_deploy_emits_counts_sizes_and_timings(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle({"a.py": "x = 1\n", "b.py": "y = 2\n", "q.sql": "select 1;\n"})
    capsys.readouterr()
    upload_and_ingest(control, aws, deployment, bundle)
    found = metric_values(emf_lines(capsys.readouterr().out))
    svc = ("service",)
    assert found[("DeploysAccepted", svc)] == (1.0, "Count", {"service": "dagcast"})
    assert found[("BundleBytes", svc)][:2] == (float(len(bundle)), "Bytes")
    assert found[("BundleFiles", svc)][:2] == (3.0, "Count")
    assert found[("ValidationSeconds", svc)][1] == "Seconds" and 0 <= found[("ValidationSeconds", svc)][0] < 60
    assert found[("UploadToActiveSeconds", svc)][1] == "Seconds" and found[("UploadToActiveSeconds", svc)][0] >= 0
    assert ("DeploysRejected", svc) not in found


def test_a_rejection_is_counted_overall_and_by_reason(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle({"broken.py": "def f(:\n"})
    capsys.readouterr()
    upload_and_ingest(control, aws, deployment, bundle)
    found = metric_values(emf_lines(capsys.readouterr().out))
    assert found[("DeploysRejected", ("service",))] == (1.0, "Count", {"service": "dagcast"})
    assert found[("DeploysRejected", ("reason", "service"))] == (1.0, "Count", {"service": "dagcast", "reason": "syntax_error"})
    assert ("DeploysAccepted", ("service",)) not in found
    tags = boto3.client("s3").get_object_tagging(Bucket=aws.bucket, Key=f"bundles/{deployment}/{_only_deploy(deployment)}.tar.gz")
    assert tags["TagSet"] == [{"Key": "dagcast-state", "Value": "rejected"}], "the lifecycle rule expires rejected bundles"


def test_convergence_time_is_emitted_once_from_the_sidecars_activation_times(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], capsys: pytest.CaptureFixture[str],
    sidecars: Sidecars,
) -> None:

    sidecars.register("w1")
    deploy_id = upload_and_ingest(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    capsys.readouterr()
    sidecars.report("w1", 1)
    view = control.get_deploy(deployment, deploy_id)
    control.get_deploy(deployment, deploy_id)
    app_module.telemetry.flush()
    found = metric_values(emf_lines(capsys.readouterr().out))
    assert view.converged
    value, unit, _ = found[("ActiveToAllSidecarsSeconds", ("service",))]
    assert unit == "Seconds" and value >= 0
    stored = app_module.get_store().get_deploy(deployment, deploy_id)
    assert stored.converged_at == stored.activations["w1"]


def _only_deploy(deployment: str) -> str:
    deploys, _ = app_module.get_store().list_deploys(deployment, 10, None)
    [deploy] = deploys
    return deploy.deploy_id
