"""dagcast.moto_state: what moto holds is written to a folder and read back as it was."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from dagcast import moto_state
from dagcast.moto_state import StateError, StateStore

REGION = "us-east-1"


def ddb_note(store: StateStore, operation: str, **body: object) -> None:
    store.note("dynamodb", operation, json.dumps(body).encode())


def make_everything(store: StateStore) -> dict[str, str]:
    ddb = boto3.client("dynamodb", region_name=REGION)
    ddb.create_table(TableName="t", KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST")
    ddb_note(store, "CreateTable", TableName="t")
    for sk, value in (("a", {"B": b"\x00\xffbin"}), ("b", {"N": "7"}), ("gone", {"S": "x"})):
        item = {"pk": {"S": "P"}, "sk": {"S": sk}, "v": value}
        ddb.put_item(TableName="t", Item=item)
        ddb_note(store, "PutItem", TableName="t", Item={"pk": {"S": "P"}, "sk": {"S": sk}})
    key = {"pk": {"S": "P"}, "sk": {"S": "b"}}
    ddb.update_item(TableName="t", Key=key, UpdateExpression="SET v = :v", ExpressionAttributeValues={":v": {"N": "8"}})
    ddb_note(store, "UpdateItem", TableName="t", Key=key)
    ddb.delete_item(TableName="t", Key={"pk": {"S": "P"}, "sk": {"S": "gone"}})
    ddb_note(store, "DeleteItem", TableName="t", Key={"pk": {"S": "P"}, "sk": {"S": "gone"}})

    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="state-test")
    s3.put_bucket_versioning(Bucket="state-test", VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket="state-test", Key="k", Body=b"one")["VersionId"]
    s3.put_object(Bucket="state-test", Key="k", Body=b"two")
    store.note("s3", "PutObject", b"")

    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="doorbell")
    store.note("sqs", "SendMessage", b"")
    return {"first_version": first, "queue_url": url}


def check_everything(made: dict[str, str]) -> None:
    ddb = boto3.client("dynamodb", region_name=REGION)
    items = {i["sk"]["S"]: i["v"] for i in ddb.scan(TableName="t")["Items"]}
    assert items == {"a": {"B": b"\x00\xffbin"}, "b": {"N": "8"}}
    s3 = boto3.client("s3", region_name=REGION)
    assert s3.get_object(Bucket="state-test", Key="k")["Body"].read() == b"two"
    assert s3.get_object(Bucket="state-test", Key="k", VersionId=made["first_version"])["Body"].read() == b"one"
    sqs = boto3.client("sqs", region_name=REGION)
    got = sqs.receive_message(QueueUrl=made["queue_url"], WaitTimeSeconds=0)["Messages"]
    assert [m["Body"] for m in got] == ["doorbell"]


@pytest.mark.parametrize("clean_stop", [True, False], ids=["stop-compacts", "flush-only-as-after-a-kill"])
def test_what_moto_holds_comes_back_as_it_was(tmp_path: Path, clean_stop: bool) -> None:
    with mock_aws():
        store = StateStore(tmp_path, threading.Lock())
        made = make_everything(store)
        store.stop() if clean_stop else store.flush()
    assert (tmp_path / "dynamodb.snapshot").exists() == clean_stop
    with mock_aws():  # a new moto: empty until restored
        assert boto3.client("s3", region_name=REGION).list_buckets()["Buckets"] == []
        counts = StateStore(tmp_path, threading.Lock()).restore()
        assert counts["dynamodb-items"] >= 2
        check_everything(made)


def test_object_bodies_are_files_named_by_their_digest_and_the_snapshot_holds_none(tmp_path: Path) -> None:
    with mock_aws():
        store = StateStore(tmp_path, threading.Lock())
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="state-test")
        s3.put_object(Bucket="state-test", Key="big", Body=b"z" * 200_000)
        store.note("s3", "PutObject", b"")
        store.flush()
        assert b"z" * 1000 not in (tmp_path / "s3.pickle").read_bytes()
        assert [p.stat().st_size for p in (tmp_path / "s3-bodies").iterdir()] == [200_000]
        s3.delete_object(Bucket="state-test", Key="big")
        store.note("s3", "DeleteObject", b"")
        store.flush()
        assert list((tmp_path / "s3-bodies").iterdir()) == [], "the body of a deleted object is removed"


def test_a_torn_last_line_of_the_log_is_skipped_and_the_rest_restored(tmp_path: Path) -> None:
    with mock_aws():
        store = StateStore(tmp_path, threading.Lock())
        made = make_everything(store)
        store.flush()
    with open(tmp_path / "dynamodb.log", "ab") as f:
        f.write(b'{"a":"123456789012","r":"us-east-1","t":"t","k":{"pk":{"S":"P"}')  # a write cut short by a crash
    with mock_aws():
        StateStore(tmp_path, threading.Lock()).restore()
        check_everything(made)


def test_an_unreadable_snapshot_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "sqs.pickle").write_bytes(b"not a pickle")
    with mock_aws(), pytest.raises(StateError, match=r"cannot read .*sqs\.pickle"):
        StateStore(tmp_path, threading.Lock()).restore()


def test_reads_do_not_make_a_flush_due(tmp_path: Path) -> None:
    store = StateStore(tmp_path, threading.Lock())
    for op in ("GetItem", "Query", "ListObjectsV2", "ReceiveMessage", "HeadObject"):
        store.note("dynamodb" if op in ("GetItem", "Query") else "s3", op, b"{}")
    assert not store._changed.is_set()
    store.note("s3", "PutObject", b"")
    assert store._changed.is_set()


def test_the_moto_release_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_state.check_moto()  # the pinned one is installed
    monkeypatch.setattr(moto_state, "MOTO_VERSION", "0.0.1")
    with pytest.raises(StateError, match="0.0.1"):
        moto_state.check_moto()
