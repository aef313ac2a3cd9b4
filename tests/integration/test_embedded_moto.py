"""The embedded stack's moto server (dagcast.moto_server) keeps DynamoDB's semantics where it takes
shortcuts for speed: a cancelled transaction leaves every item as it was, items of every
attribute type read back exactly as written, and projections and updates (every ReturnValues, a
failed condition, a missing item, a wrong key) answer what moto without the shortcuts answers."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer


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


@pytest.fixture(scope="module")
def plain_moto_url() -> Iterator[str]:
    """moto as released, in this process (dagcast.moto_server.patch() runs only in the stack's server)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def plain_table(plain_moto_url: str) -> Iterator[Any]:
    t = _new_table(plain_moto_url)
    try:
        yield t
    finally:
        t.delete()


def _outcome(call: Any, **kwargs: Any) -> Any:
    """What a table call answers (tables named alike), or its error's code and message and the item returned with it."""
    try:
        out = call(**kwargs)
    except ClientError as exc:
        item = exc.response.get("Item")
        old = {k: TypeDeserializer().deserialize(v) for k, v in item.items()} if item is not None else None
        return ("error", exc.response["Error"].get("Code"), exc.response["Error"].get("Message"), old)
    out.pop("ResponseMetadata", None)
    if "ConsumedCapacity" in out:
        out["ConsumedCapacity"]["TableName"] = "the table"
    return out


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


EVERY_TYPE = {
    "s": "text é", "n": Decimal("12.5"), "yes": True, "none": None,
    "l": ["a", Decimal(1), [True, None], {"k": "v"}], "m": {"deep": {"deeper": ["x"]}, "empty": {}},
    "ss": {"a", "b"}, "ns": {Decimal(1), Decimal(2)}, "b": Binary(b"\x00\xffbytes"), "bs": {Binary(b"x"), Binary(b"y")},
    "nested_b": {"blob": Binary(b"\x01\x02")}, "a.b": "dotted", "ids": [f"dag_{i}" for i in range(300)],
    "activations": {"w1": 1, "w2": 2},
}
PROJECTIONS = [
    ("s", {}), ("s, n, yes, #none, ss, ns, b, bs", {"#none": "none"}), ("l, m, nested_b, activations, ids", {}),
    ("#st, #missing, pk", {"#st": "s", "#missing": "missing"}), ("#dotted", {"#dotted": "a.b"}), ("absent", {}),
    ("m.deep, l[1]", {}), ("activations.w1, s", {}), ("#m.#d.deeper", {"#m": "m", "#d": "deep"}), ("ids[2], s", {}),
]


@pytest.mark.parametrize(("projection", "names"), PROJECTIONS, ids=[p for p, _ in PROJECTIONS])
def test_a_projection_reads_what_plain_moto_reads(table: Any, plain_table: Any, projection: str, names: dict[str, str]) -> None:
    answers = []
    for t in (table, plain_table):
        t.put_item(Item={"pk": "p", "sk": "a", **EVERY_TYPE})
        t.put_item(Item={"pk": "p", "sk": "b", "s": "second", "m": {"deep": 1}})
        extra = {"ExpressionAttributeNames": names} if names else {}
        answers.append([
            _outcome(t.get_item, Key={"pk": "p", "sk": "a"}, ProjectionExpression=projection, ConsistentRead=True, **extra),
            _outcome(t.get_item, Key={"pk": "p", "sk": "zz"}, ProjectionExpression=projection, **extra),
            _outcome(t.query, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": "p"},
                     ProjectionExpression=projection, **extra),
            _outcome(t.scan, ProjectionExpression=projection, **extra),
        ])
    assert "Item" in answers[0][0], f"a projection that DynamoDB accepts: {answers[0][0]}"
    assert answers[0] == answers[1]


def _updates(key: dict[str, str], return_values: str) -> list[dict[str, Any]]:
    """update_item calls a deploy record sees, and the edge cases around them."""
    rv = {"ReturnValues": return_values}
    return [
        {"Key": key, "UpdateExpression": "SET activations.#n = :t, notified.#n = :r",
         "ConditionExpression": "attribute_exists(activations) AND attribute_not_exists(activations.#n)",
         "ExpressionAttributeNames": {"#n": "w3"}, "ExpressionAttributeValues": {":t": 3, ":r": 2}, **rv},
        {"Key": key, "UpdateExpression": "SET activations.#n = :t",
         "ConditionExpression": "attribute_exists(activations) AND attribute_not_exists(activations.#n)",
         "ExpressionAttributeNames": {"#n": "w3"}, "ExpressionAttributeValues": {":t": 4}, **rv},
        {"Key": key, "UpdateExpression": "SET #s = :v, n = n + :one, ids[1] = :x REMOVE yes ADD ss :more",
         "ConditionExpression": "#s = :old", "ExpressionAttributeNames": {"#s": "s"},
         "ExpressionAttributeValues": {":v": "ACTIVE", ":one": 1, ":x": "changed", ":more": {"c"}, ":old": "text é"},
         "ReturnValuesOnConditionCheckFailure": "ALL_OLD", **rv},
        {"Key": key, "UpdateExpression": "SET #s = :v", "ConditionExpression": "#s = :old",
         "ExpressionAttributeNames": {"#s": "s"}, "ExpressionAttributeValues": {":v": "x", ":old": "text é"},
         "ReturnValuesOnConditionCheckFailure": "ALL_OLD", **rv},
        {"Key": key, "UpdateExpression": "SET converged_at = if_not_exists(converged_at, :t), m.deep.deeper = :l",
         "ExpressionAttributeValues": {":t": 9, ":l": ["y", "z"]}, **rv},
        {"Key": {"pk": "p", "sk": "new"}, "UpdateExpression": "SET n = :n", "ExpressionAttributeValues": {":n": 1}, **rv},
        {"Key": {"pk": "p", "sk": "new2"}, "UpdateExpression": "SET n = :n", "ConditionExpression": "attribute_exists(pk)",
         "ExpressionAttributeValues": {":n": 1}, **rv},
        {"Key": {"pk": "p"}, "UpdateExpression": "SET n = :n", "ExpressionAttributeValues": {":n": 1}, **rv},
        {"Key": key, "UpdateExpression": "SET n = :n", "ExpressionAttributeValues": {":n": 1, ":unused": 2}, **rv},
    ]


@pytest.mark.parametrize("return_values", ["NONE", "ALL_OLD", "ALL_NEW", "UPDATED_OLD", "UPDATED_NEW"])
def test_updates_answer_and_store_what_plain_moto_does(table: Any, plain_table: Any, return_values: str) -> None:
    key = {"pk": "p", "sk": "a"}
    results = []
    for t in (table, plain_table):
        t.put_item(Item={**key, **EVERY_TYPE, "notified": {}})
        answers = [_outcome(t.update_item, **call) for call in _updates(key, return_values)]
        stored = t.scan(ConsistentRead=True)["Items"]
        results.append((answers, sorted(stored, key=lambda i: i["sk"])))
    assert results[0] == results[1]
    answers, stored = results[0]
    assert answers[1][0] == "error" and answers[3][0] == "error", "the failed conditions failed"
    assert stored[0]["activations"] == {"w1": 1, "w2": 2, "w3": 3} and stored[0]["ids"][1] == "changed"
