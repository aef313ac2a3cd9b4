"""The embedded stack's moto server (dagcast.moto_server) keeps DynamoDB's semantics where it takes
shortcuts for speed: a cancelled transaction leaves every item as it was, and items of every
attribute type read back exactly as written. test_moto_patches.py compares its answers with moto's
own, each server in a process of its own (projections, updates of every ReturnValues, transactions)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import Binary
from botocore.exceptions import ClientError


def _new_table(endpoint_url: str) -> Any:
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    ddb = session.resource("dynamodb", endpoint_url=endpoint_url)
    return ddb.create_table(
        TableName=f"moto-check-{uuid.uuid4().hex[:8]}",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


@pytest.fixture
def table(stack: dict[str, Any]) -> Iterator[Any]:
    t = _new_table(stack["aws_endpoint_url"])
    try:
        yield t
    finally:
        t.delete()


def test_a_cancelled_transaction_leaves_every_item_as_it_was(table: Any) -> None:
    big = {"pk": "p", "sk": "a", "n": 1, "ids": [f"dag_{i}" for i in range(500)], "m": {"x": {"y": 1}}}
    table.put_item(Item=big)
    table.put_item(Item={"pk": "p", "sk": "b", "n": 1})
    client = table.meta.client
    items = [
        {"Update": {"TableName": table.name, "Key": {"pk": "p", "sk": "a"},
                    "UpdateExpression": "SET n = :two, m.x.y = :two, ids[0] = :s",
                    "ExpressionAttributeValues": {":two": 2, ":s": "changed"}}},
        {"Put": {"TableName": table.name, "Item": {"pk": "p", "sk": "c", "n": 1}}},
        {"Update": {"TableName": table.name, "Key": {"pk": "p", "sk": "b"}, "UpdateExpression": "SET n = :two",
                    "ConditionExpression": "n = :five", "ExpressionAttributeValues": {":two": 2, ":five": 5}}},
    ]
    with pytest.raises(ClientError) as caught:
        client.transact_write_items(TransactItems=items)
    assert caught.value.response["Error"]["Code"] == "TransactionCanceledException"
    unchanged = {**big, "n": Decimal(1), "m": {"x": {"y": Decimal(1)}}}
    assert table.get_item(Key={"pk": "p", "sk": "a"}, ConsistentRead=True)["Item"] == unchanged
    assert table.get_item(Key={"pk": "p", "sk": "b"}, ConsistentRead=True)["Item"]["n"] == 1
    assert "Item" not in table.get_item(Key={"pk": "p", "sk": "c"}, ConsistentRead=True)

    items[2]["Update"]["ExpressionAttributeValues"][":five"] = 1
    client.transact_write_items(TransactItems=items)
    a = table.get_item(Key={"pk": "p", "sk": "a"}, ConsistentRead=True)["Item"]
    assert (a["n"], a["m"]["x"]["y"], a["ids"][0], a["ids"][1]) == (2, 2, "changed", "dag_1")
    assert table.get_item(Key={"pk": "p", "sk": "c"}, ConsistentRead=True)["Item"]["n"] == 1


def test_items_of_every_attribute_type_read_back_as_written(table: Any) -> None:
    item = {
        "pk": "p", "sk": "types", "s": "text é", "n": Decimal("12.5"), "yes": True, "none": None,
        "l": ["a", Decimal(1), [True, None], {"k": "v"}], "m": {"deep": {"deeper": ["x"]}, "empty": {}},
        "ss": {"a", "b"}, "ns": {Decimal(1), Decimal(2)}, "b": Binary(b"\x00\xffbytes"), "bs": {Binary(b"x"), Binary(b"y")},
        "nested_b": {"blob": Binary(b"\x01\x02")},
    }
    table.put_item(Item=item)
    assert table.get_item(Key={"pk": "p", "sk": "types"}, ConsistentRead=True)["Item"] == item
    assert table.query(KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": "p"})["Items"] == [item]
    old = table.update_item(Key={"pk": "p", "sk": "types"}, UpdateExpression="SET s = :s",
                            ExpressionAttributeValues={":s": "new"}, ReturnValues="ALL_OLD")["Attributes"]
    assert old == item
