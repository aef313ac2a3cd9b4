"""What a sidecar's report costs the API: the deploy behind a version is read once per process
(published versions never change), and a version that was never published is looked up each time."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from conftest import Sidecars
from test_deploy_stages import publish

import app as app_module
from chalicelib.exceptions import NotFound
from chalicelib.service import ControlPlane
from dagcast.bootstrap import StackOutputs


@pytest.fixture
def version_reads(aws: StackOutputs) -> Iterator[list[str]]:
    """Sort keys of the app's GetItem calls that read a version record."""
    reads: list[str] = []

    def note(params: dict[str, Any], **_: Any) -> None:
        sk = params.get("Key", {}).get("sk", {})
        sk = sk.get("S", "") if isinstance(sk, dict) else str(sk)
        if sk.startswith("VERSION#"):
            reads.append(sk)

    events = app_module.get_store()._client.meta.events
    events.register("provide-client-params.dynamodb.GetItem", note)
    try:
        yield reads
    finally:
        events.unregister("provide-client-params.dynamodb.GetItem", note)


def test_the_deploy_behind_a_version_is_read_once_for_all_sidecars_reporting_it(
    control: ControlPlane, aws: StackOutputs, deployment: str, make_bundle: Callable[..., bytes], version_reads: list[str],
    sidecars: Sidecars,
) -> None:
    names = ("w1", "w2", "w3")
    for name in names:
        sidecars.register(name)
    deploy_id = publish(control, aws, deployment, make_bundle({"a.py": "x = 1\n"}))
    version_reads.clear()
    for i, name in enumerate(names):
        sidecars.report(name, 1, last_sync_at=100 + i)
    assert version_reads == ["VERSION#0000000001"]
    deploy = app_module.get_store().get_deploy(deployment, deploy_id)
    assert deploy.activations == {"w1": 100, "w2": 101, "w3": 102}


def test_a_version_never_published_is_not_remembered(control: ControlPlane, aws: StackOutputs, deployment: str) -> None:
    store = app_module.get_store()
    with pytest.raises(NotFound):
        store.deploy_of_version(deployment, 7)
    table = boto3.resource("dynamodb").Table(aws.table_name)
    table.put_item(Item={"pk": f"DEPLOYMENT#{deployment}", "sk": "VERSION#0000000007", "deployment": deployment,
                         "version": 7, "deploy_id": "0123456789a-abcdef", "sha256": "0" * 64, "size": 1, "key": "k",
                         "created_at": 1})
    assert store.deploy_of_version(deployment, 7) == "0123456789a-abcdef"


def test_a_report_of_a_version_never_published_records_nothing(
    control: ControlPlane, deployment: str, version_reads: list[str], sidecars: Sidecars,
) -> None:
    sidecars.register("w1")
    view = sidecars.report("w1", 3)
    assert view.version == 3
    assert sidecars.report("w1", 4).version == 4
    assert version_reads == ["VERSION#0000000003", "VERSION#0000000004"]
