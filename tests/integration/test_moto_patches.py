"""dagcast.moto_server patches moto's internals for speed and for atomic writes; these tests hold it to
moto's own answers and check that it refuses a moto it was not written for.

* Differential: the same DynamoDB calls go to moto as released (`python -m moto.server`) and to
  `python -m dagcast.moto_server`, each in its own process (nothing patched in this one can make
  the two agree), over HTTP with boto3; answers, errors (with CancellationReasons, which
  chalicelib/store.py reads) and the stored items after every call must be the same.
* The write lock: failing transactions racing successful writes on the items they touch must never
  undo one of those writes (the race the lock was written for, see the module's docstring).
* The fence: a moto of another version, or without one of the internals patch() touches, stops
  `python -m dagcast.moto_server` at start-up with one line on stderr.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer
from botocore.config import Config
from botocore.exceptions import ClientError

from dagcast.local import free_port
from dagcast.moto_state import MOTO_VERSION

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]  # `python -m dagcast...` from here runs this tree's dagcast


@contextlib.contextmanager
def _server(argv: list[str], log: Path) -> Iterator[str]:
    """A moto server process (argv after the interpreter, without host and port) on a free port; yields its URL."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv, "-H", "127.0.0.1", "-p", str(port)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # polls its HTTP endpoint: up once it answers
            assert proc.poll() is None, f"{argv} exited {proc.returncode}: {log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/moto-api/data.json", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"{argv} did not answer within 60s: {log.read_text()}"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def patched_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _server(["-m", "dagcast.moto_server"], tmp_path_factory.mktemp("patched") / "moto.log") as url:
        yield url


@pytest.fixture(scope="module")
def plain_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _server(["-m", "moto.server"], tmp_path_factory.mktemp("plain") / "moto.log") as url:
        yield url


def _session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")


def _client(url: str) -> Any:
    config = Config(retries={"total_max_attempts": 1}, max_pool_connections=32)  # every answer as the server gave it
    return _session().client("dynamodb", endpoint_url=url, config=config)


KEY_SCHEMA = {
    "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
}


@contextlib.contextmanager
def _tables(clients: list[Any], schema: dict[str, Any] = KEY_SCHEMA) -> Iterator[tuple[str, list[Any]]]:
    """The same table (same name) on the server of each client; yields its name and the clients."""
    name = f"patches-{uuid.uuid4().hex[:8]}"
    for client in clients:
        client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST", **schema)
    try:
        yield name, clients
    finally:
        for client in clients:
            client.delete_table(TableName=name)


@pytest.fixture(scope="module")
def clients(patched_url: str, plain_url: str) -> list[Any]:
    """A low-level client of each server, the patched one first."""
    return [_client(patched_url), _client(plain_url)]


@pytest.fixture
def both(clients: list[Any]) -> Iterator[tuple[str, list[Any]]]:
    with _tables(clients) as pair:
        yield pair


def _answer(client: Any, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What one call answers: its response, or its error with everything DynamoDB sends with one."""
    try:
        out: dict[str, Any] = getattr(client, op)(**kwargs)
    except ClientError as exc:
        r = exc.response
        return {"error": r["Error"].get("Code"), "message": r["Error"].get("Message"),
                "reasons": r.get("CancellationReasons"), "item": r.get("Item")}
    out.pop("ResponseMetadata", None)
    return out


def _unordered_sets(value: Any) -> Any:
    """`value` with the members of every string, number and binary set sorted: DynamoDB gives sets no order."""
    if isinstance(value, dict):
        return {k: sorted(v) if k in ("SS", "NS", "BS") and isinstance(v, list) else _unordered_sets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_unordered_sets(v) for v in value)
    return value


def _stored(client: Any, table: str) -> list[dict[str, Any]]:
    items = client.scan(TableName=table, ConsistentRead=True)["Items"]
    return sorted(items, key=lambda i: json.dumps([i.get("pk"), i.get("sk")], default=repr, sort_keys=True))


def _differential(table: str, clients: list[Any], calls: list[tuple[str, dict[str, Any]]]) -> list[tuple[Any, Any]]:
    """Run `calls` on each server; each call's answer and the table after it must be the same on both.
    Returns the patched server's (answer, items after) per call."""
    runs = [[_unordered_sets((_answer(c, op, kwargs), _stored(c, table))) for op, kwargs in calls] for c in clients]
    for (op, kwargs), patched, plain in zip(calls, runs[0], runs[1], strict=True):
        assert patched == plain, f"{op} {kwargs}"
    return runs[0]


def S(v: str) -> dict[str, str]:  # wire-format shorthands, as short as its type letters
    return {"S": v}


def N(v: int | str) -> dict[str, str]:
    return {"N": str(v)}


def B(v: bytes) -> dict[str, bytes]:
    return {"B": v}

WIRE_ITEM = {
    "pk": S("p"), "sk": S("a"), "s": S("text é"), "n": N("12.5"), "yes": {"BOOL": True}, "none": {"NULL": True},
    "b": B(b"\x00\xffbytes"), "bs": {"BS": [b"x", b"y"]}, "ss": {"SS": ["a", "b"]}, "ns": {"NS": ["1", "2"]},
    "l": {"L": [S("a"), N(1), B(b"\x01"), {"L": [{"BOOL": False}]}, {"M": {"k": B(b"\x02")}}]},
    "m": {"M": {"deep": {"M": {"deeper": {"L": [S("x"), B(b"\x03")]}}}, "empty": {"M": {}}, "bin2": B(b"\x04")}},
    "empty_l": {"L": []}, "ids": {"L": [S(f"dag_{i}") for i in range(50)]},
}


def test_puts_gets_projections_and_binary_attributes_answer_as_moto_does(both: tuple[str, list[Any]]) -> None:
    table, clients = both
    key = {"pk": S("p"), "sk": S("a")}
    t = {"TableName": table}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("put_item", {**t, "Item": WIRE_ITEM}),
        ("put_item", {**t, "Item": {**WIRE_ITEM, "s": S("second")}, "ReturnValues": "ALL_OLD"}),
        ("put_item", {**t, "Item": {**WIRE_ITEM, "s": S("third")}, "ReturnValues": "NONE"}),
        ("put_item", {**t, "Item": WIRE_ITEM, "ConditionExpression": "attribute_not_exists(pk)",
                      "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}),
        ("put_item", {**t, "Item": {"pk": S("p"), "sk": S("b"), "bin1": B(b"\xfe")}, "ConditionExpression": "attribute_not_exists(pk)"}),
        ("get_item", {**t, "Key": key}),
        ("get_item", {**t, "Key": key, "ConsistentRead": True}),
        ("get_item", {**t, "Key": {"pk": S("p"), "sk": S("missing")}}),
        ("get_item", {**t, "Key": key, "ProjectionExpression": "s, b, bs, #n, absent", "ExpressionAttributeNames": {"#n": "none"}}),
        ("get_item", {**t, "Key": key, "ProjectionExpression": "pk, l, m, empty_l"}),
        ("get_item", {**t, "Key": key, "ProjectionExpression": "m.deep.deeper[1], l[2], m.bin2, l[4].k"}),
        ("get_item", {**t, "Key": key, "ProjectionExpression": "#m.#d, ids[3], s", "ExpressionAttributeNames": {"#m": "m", "#d": "deep"}}),
        ("get_item", {**t, "Key": {"pk": S("p"), "sk": S("b")}, "ProjectionExpression": "bin1"}),
        ("get_item", {**t, "Key": {"pk": S("p")}}),
        ("update_item", {**t, "Key": key, "UpdateExpression": "SET b = :b, m.bin2 = :b", "ExpressionAttributeValues": {":b": B(b"\x05")},
                         "ReturnValues": "ALL_NEW"}),
        ("update_item", {**t, "Key": key, "UpdateExpression": "ADD bs :bs", "ExpressionAttributeValues": {":bs": {"BS": [b"z"]}},
                         "ReturnValues": "UPDATED_NEW"}),
        ("update_item", {**t, "Key": key, "UpdateExpression": "SET s = :s REMOVE bs", "ExpressionAttributeValues": {":s": S("x")},
                         "ReturnValues": "ALL_OLD"}),
        ("update_item", {**t, "Key": key, "UpdateExpression": "SET n = n + :one", "ExpressionAttributeValues": {":one": N(1)},
                         "ReturnValues": "NONE"}),
        ("delete_item", {**t, "Key": {"pk": S("p"), "sk": S("b")}, "ReturnValues": "ALL_OLD"}),
        ("delete_item", {**t, "Key": {"pk": S("p"), "sk": S("b")}, "ReturnValues": "ALL_OLD"}),
        ("delete_item", {**t, "Key": key, "ConditionExpression": "s = :no", "ExpressionAttributeValues": {":no": S("no")},
                         "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}),
    ]
    answers = _differential(table, clients, calls)
    assert answers[3][0]["error"] == "ConditionalCheckFailedException" and answers[3][0]["item"]["s"] == S("third")
    assert answers[5][0]["Item"] == {**WIRE_ITEM, "s": S("third")}, "an item reads back as written"
    assert all("Item" in answers[i][0] for i in range(8, 13)), "projections DynamoDB accepts"
    assert answers[8][0]["Item"] == {"s": S("third"), "b": WIRE_ITEM["b"], "bs": WIRE_ITEM["bs"], "none": WIRE_ITEM["none"]}
    assert answers[13][0]["error"] == "ValidationException", "a key without its sort key"


def test_queries_answer_as_moto_does(both: tuple[str, list[Any]]) -> None:
    table, clients = both
    t = {"TableName": table}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("put_item", {**t, "Item": {"pk": S("p"), "sk": S(f"item#{i:02d}"), "n": N(i), "b": B(bytes([i])),
                                    "m": {"M": {"x": N(i), "tag": S("even" if i % 2 == 0 else "odd")}}}})
        for i in range(12)
    ]
    calls.append(("put_item", {**t, "Item": {"pk": S("q"), "sk": S("item#00"), "n": N(100)}}))
    pk_is = {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": S("p")}}
    calls += [
        ("query", {**t, **pk_is}),
        ("query", {**t, **pk_is, "ScanIndexForward": False, "Limit": 5}),
        ("query", {**t, **pk_is, "Limit": 5, "ExclusiveStartKey": {"pk": S("p"), "sk": S("item#04")}}),
        ("query", {**t, "KeyConditionExpression": "pk = :p AND begins_with(sk, :pre)",
                   "ExpressionAttributeValues": {":p": S("p"), ":pre": S("item#1")}}),
        ("query", {**t, "KeyConditionExpression": "pk = :p AND sk BETWEEN :a AND :b",
                   "ExpressionAttributeValues": {":p": S("p"), ":a": S("item#03"), ":b": S("item#06")}}),
        ("query", {**t, **pk_is, "FilterExpression": "m.tag = :even", "ExpressionAttributeValues": {":p": S("p"), ":even": S("even")}}),
        ("query", {**t, **pk_is, "ProjectionExpression": "sk, b"}),
        ("query", {**t, **pk_is, "ProjectionExpression": "m.x, sk"}),
        ("query", {**t, **pk_is, "Select": "COUNT"}),
        ("query", {**t, "KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": S("nobody")}}),
        ("scan", {**t, "FilterExpression": "n > :ten", "ExpressionAttributeValues": {":ten": N(10)}}),
    ]
    # the key condition's forms, each forwards and backwards, by pages, beside another partition with
    # the same sort keys and items of other prefixes (a query is given only its matching items: see
    # _matching_items_only)
    calls += [("put_item", {**t, "Item": {"pk": S("p"), "sk": S(f"other#{i}"), "ids": {"L": [S(f"dag_{j}") for j in range(30)]}}})
              for i in range(3)]
    calls.append(("put_item", {**t, "Item": {"pk": S("q"), "sk": S("item#05"), "n": N(105)}}))
    for condition, values in [
        ("begins_with(sk, :a)", {":a": S("item#")}), ("begins_with(sk, :a)", {":a": S("other")}),
        ("sk = :a", {":a": S("item#05")}), ("sk < :a", {":a": S("item#03")}), ("sk <= :a", {":a": S("item#03")}),
        ("sk > :a", {":a": S("item#09")}), ("sk >= :a", {":a": S("item#09")}),
        ("sk BETWEEN :a AND :b", {":a": S("item#10"), ":b": S("other#1")}), ("begins_with(sk, :a)", {":a": S("none#")}),
    ]:
        for forward in (True, False):
            q = {**t, "KeyConditionExpression": f"pk = :p AND {condition}", "ExpressionAttributeValues": {":p": S("p"), **values},
                 "ScanIndexForward": forward}
            calls += [("query", q), ("query", {**q, "Limit": 2}), ("query", {**q, "Select": "COUNT"})]
            calls.append(("query", {**q, "Limit": 3, "ExclusiveStartKey": {"pk": S("p"), "sk": S("item#06")}}))
    calls.append(("query", {**t, "KeyConditionExpression": "pk = :q AND begins_with(sk, :a)",
                            "ExpressionAttributeValues": {":q": S("q"), ":a": S("item#")}, "ProjectionExpression": "n"}))
    answers = _differential(table, clients, calls)
    assert [i["sk"]["S"] for i in answers[13][0]["Items"]][:2] == ["item#00", "item#01"]
    assert answers[20][0]["Count"] == 12
    assert answers[-1][0]["Items"] == [{"n": N(100)}, {"n": N(105)}], "the other partition's items only"


def _transactions(t: str) -> list[tuple[str, dict[str, Any]]]:
    """A record, a version pointer and a counter, then TransactWriteItems of each kind, passing and failing."""
    meta, deploy, other = ({"pk": S("d"), "sk": S(sk)} for sk in ("META", "DEPLOY#1", "OTHER"))
    validating = {"ConditionExpression": "#s = :v", "ExpressionAttributeNames": {"#s": "state"},
                  "ExpressionAttributeValues": {":v": S("VALIDATING")}}

    def transact(*items: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "transact_write_items", {"TransactItems": list(items)}

    return [
        ("put_item", {"TableName": t, "Item": {**meta, "last_version": N(0), "ids": {"L": [S("a"), S("b")]}}}),
        ("put_item", {"TableName": t, "Item": {**deploy, "state": S("VALIDATING"), "bin1": B(b"\x00\x01")}}),
        ("put_item", {"TableName": t, "Item": {**other, "n": N(1)}}),
        # the one store.activate sends when another deploy took the number (the pointer's condition fails)
        transact(
            {"Update": {"TableName": t, "Key": meta, "UpdateExpression": "SET last_version = :n",
                        "ConditionExpression": "last_version = :prev", "ExpressionAttributeValues": {":n": N(1), ":prev": N(7)}}},
            {"Put": {"TableName": t, "Item": {"pk": S("d"), "sk": S("VERSION#1"), "n": N(1)},
                     "ConditionExpression": "attribute_not_exists(pk)"}},
            {"Update": {"TableName": t, "Key": deploy, "UpdateExpression": "SET #s = :a", **validating,
                        "ExpressionAttributeValues": {":v": S("VALIDATING"), ":a": S("ACTIVE")}}},
        ),
        # a failing ConditionCheck third, after items that would each have changed something
        transact(
            {"Update": {"TableName": t, "Key": meta, "UpdateExpression": "SET last_version = :n, ids[0] = :x",
                        "ExpressionAttributeValues": {":n": N(1), ":x": S("changed")}}},
            {"Delete": {"TableName": t, "Key": other}},
            {"ConditionCheck": {"TableName": t, "Key": deploy, "ConditionExpression": "#s = :c",
                                "ExpressionAttributeNames": {"#s": "state"}, "ExpressionAttributeValues": {":c": S("CANCELLED")},
                                "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}},
            {"Put": {"TableName": t, "Item": {"pk": S("d"), "sk": S("VERSION#1"), "n": N(1)}}},
        ),
        # a failing condition on a Put, first
        transact(
            {"Put": {"TableName": t, "Item": {**other, "n": N(2)}, "ConditionExpression": "attribute_not_exists(pk)",
                     "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}},
            {"Update": {"TableName": t, "Key": deploy, "UpdateExpression": "SET bin1 = :b",
                        "ExpressionAttributeValues": {":b": B(b"\xff")}}},
            {"Delete": {"TableName": t, "Key": meta}},
        ),
        # two items on one key, and an expression moto refuses: the whole call is refused
        transact({"Put": {"TableName": t, "Item": {**other, "n": N(3)}}}, {"Delete": {"TableName": t, "Key": other}}),
        transact({"Delete": {"TableName": t, "Key": meta}},
                 {"Update": {"TableName": t, "Key": other, "UpdateExpression": "SET n = :n", "ExpressionAttributeValues": {":x": N(1)}}}),
        # a table that does not exist among items of one that does
        transact({"Delete": {"TableName": t, "Key": meta}}, {"Put": {"TableName": "no-such-table", "Item": {"pk": S("x"), "sk": S("y")}}}),
        # every kind, all passing
        transact(
            {"Update": {"TableName": t, "Key": meta, "UpdateExpression": "SET last_version = :n ADD bumps :one",
                        "ConditionExpression": "last_version = :prev",
                        "ExpressionAttributeValues": {":n": N(1), ":prev": N(0), ":one": N(1)}}},
            {"Put": {"TableName": t, "Item": {"pk": S("d"), "sk": S("VERSION#1"), "n": N(1), "b": B(b"\x07")},
                     "ConditionExpression": "attribute_not_exists(pk)"}},
            {"ConditionCheck": {"TableName": t, "Key": deploy, **validating}},
            {"Delete": {"TableName": t, "Key": other, "ConditionExpression": "n = :one", "ExpressionAttributeValues": {":one": N(1)}}},
        ),
    ]


def test_transactions_answer_as_moto_does_and_a_cancelled_one_changes_nothing(both: tuple[str, list[Any]]) -> None:
    table, clients = both
    answers = _differential(table, clients, _transactions(table))
    for step in (3, 4, 5, 6, 7, 8):
        assert answers[step][1] == answers[2][1], f"call {step} was refused, yet it changed the table"
    # what chalicelib/store.py reads of a cancelled transaction: the error's code and each item's reason code
    codes = [[r["Code"] for r in answers[step][0]["reasons"]] for step in (3, 4, 5)]
    assert {answers[step][0]["error"] for step in (3, 4, 5)} == {"TransactionCanceledException"}
    assert codes == [["ConditionalCheckFailed", "None", "None"], ["None", "None", "ConditionalCheckFailed", "None"],
                     ["ConditionalCheckFailed", "None", "None"]]
    assert answers[4][0]["reasons"][2]["Item"]["state"] == S("VALIDATING"), "ALL_OLD on a failed ConditionCheck"
    assert answers[5][0]["reasons"][0]["Item"]["n"] == N(1), "ALL_OLD on a failed Put"
    assert answers[6][0]["error"] == answers[7][0]["error"] == "ValidationException"
    assert "error" not in answers[9][0] and [i["sk"]["S"] for i in answers[9][1]] == ["DEPLOY#1", "META", "VERSION#1"]


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


@pytest.fixture(scope="module")
def resources(patched_url: str, plain_url: str) -> list[Any]:
    """boto3's resource layer (values as Python types) on each server, the patched one first."""
    return [_session().resource("dynamodb", endpoint_url=url) for url in (patched_url, plain_url)]


@pytest.fixture
def resource_tables(both: tuple[str, list[Any]], resources: list[Any]) -> list[Any]:
    """The `both` table through `resources`."""
    return [r.Table(both[0]) for r in resources]


def _outcome(call: Any, **kwargs: Any) -> Any:
    """What a table call answers, or its error's code and message and the item returned with it."""
    try:
        out = call(**kwargs)
    except ClientError as exc:
        item = exc.response.get("Item")
        old = {k: TypeDeserializer().deserialize(v) for k, v in item.items()} if item is not None else None
        return ("error", exc.response["Error"].get("Code"), exc.response["Error"].get("Message"), old)
    out.pop("ResponseMetadata", None)
    return out


@pytest.mark.parametrize(("projection", "names"), PROJECTIONS, ids=[p for p, _ in PROJECTIONS])
def test_a_projection_reads_what_plain_moto_reads(resource_tables: list[Any], projection: str, names: dict[str, str]) -> None:
    answers = []
    for t in resource_tables:
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
def test_updates_answer_and_store_what_plain_moto_does(resource_tables: list[Any], return_values: str) -> None:
    key = {"pk": "p", "sk": "a"}
    results = []
    for t in resource_tables:
        t.put_item(Item={**key, **EVERY_TYPE, "notified": {}})
        answers = [_outcome(t.update_item, **call) for call in _updates(key, return_values)]
        stored = t.scan(ConsistentRead=True)["Items"]
        results.append((answers, sorted(stored, key=lambda i: i["sk"])))
    assert results[0] == results[1]
    answers, stored = results[0]
    assert answers[1][0] == "error" and answers[3][0] == "error", "the failed conditions failed"
    assert stored[0]["activations"] == {"w1": 1, "w2": 2, "w3": 3} and stored[0]["ids"][1] == "changed"


COUNTERS = 8  # items each failing transaction updates before its ConditionCheck fails; one writer thread each
PADDING = 60  # more items it updates, none written by anyone else: they make its rollback's window wide
ROUNDS = 15  # increments per writer
FAILERS = 2  # threads sending failing transactions until the writers are done


def test_a_cancelled_transaction_never_undoes_a_concurrent_write(clients: list[Any]) -> None:
    """The race the write lock is for: moto snapshots what a transaction touches, applies its items, and
    puts the snapshot back when one fails; without the lock, a write that lands on one of those items in
    between (a counter's increment here) is undone by that rollback, and a cancelled transaction's own
    change can be left behind by another's. Every increment must count, and no `junk` may remain.
    Without the lock (`_serialised` returning the method itself) this loses increments on every run."""
    with _tables(clients[:1]) as (table, [client]):
        counter = [{"pk": S("c"), "sk": S(f"{i}")} for i in range(COUNTERS)]
        padding = [{"pk": S("pad"), "sk": S(f"{i}")} for i in range(PADDING)]
        for key in counter + padding:
            client.put_item(TableName=table, Item={**key, "n": N(0)})
        client.put_item(TableName=table, Item={"pk": S("guard"), "sk": S("g"), "state": S("A")})
        failing = [{"Update": {"TableName": table, "Key": key, "UpdateExpression": "SET junk = :j",
                               "ExpressionAttributeValues": {":j": S("from a cancelled transaction")}}} for key in counter + padding]
        failing.append({"ConditionCheck": {"TableName": table, "Key": {"pk": S("guard"), "sk": S("g")},
                                           "ConditionExpression": "#s = :b", "ExpressionAttributeNames": {"#s": "state"},
                                           "ExpressionAttributeValues": {":b": S("B")}}})
        start = threading.Barrier(COUNTERS + FAILERS, timeout=30)  # all at once: the writes land among the transactions
        writers_done = threading.Event()

        def write(i: int) -> None:
            start.wait()
            for r in range(ROUNDS):
                client.update_item(TableName=table, Key=counter[i], UpdateExpression="ADD n :one",
                                   ExpressionAttributeValues={":one": N(1)})
                client.put_item(TableName=table, Item={"pk": S("other"), "sk": S(f"{i}-{r}")})

        def fail() -> int:
            start.wait()
            cancelled = 0
            while not writers_done.is_set():
                with pytest.raises(ClientError) as caught:
                    client.transact_write_items(TransactItems=failing)
                codes = [r["Code"] for r in caught.value.response["CancellationReasons"]]
                assert codes == ["None"] * (COUNTERS + PADDING) + ["ConditionalCheckFailed"], codes
                cancelled += 1
            return cancelled

        with concurrent.futures.ThreadPoolExecutor(COUNTERS + FAILERS) as pool:
            writers = [pool.submit(write, i) for i in range(COUNTERS)]
            failers = [pool.submit(fail) for _ in range(FAILERS)]
            try:
                for w in writers:
                    w.result()
            finally:
                writers_done.set()
            cancelled = sum(f.result() for f in failers)

        items = client.scan(TableName=table, ConsistentRead=True)["Items"]
        counts = {i["sk"]["S"]: int(i["n"]["N"]) for i in items if i["pk"] == S("c")}
        assert counts == {f"{i}": ROUNDS for i in range(COUNTERS)}, f"increments lost ({cancelled} transactions cancelled)"
        assert not [i for i in items if "junk" in i], "a cancelled transaction's write was left"
        others = client.query(TableName=table, KeyConditionExpression="pk = :o", ExpressionAttributeValues={":o": S("other")},
                              Select="COUNT", ConsistentRead=True)["Count"]
        assert others == COUNTERS * ROUNDS
        assert cancelled >= FAILERS


def _run_patched(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m dagcast.moto_server ARGS`, after `prelude` ran in the same interpreter."""
    code = f"{prelude}\nimport runpy\nrunpy.run_module('dagcast.moto_server', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


MISMATCHES = [
    ("import moto; moto.__version__ = '0.0.0'",
     f"error: moto 0.0.0 is installed, dagcast's moto patches are written for {MOTO_VERSION}: "),
    ("import moto.dynamodb.models as m; del m.DynamoDBBackend.transact_write_items",
     "error: moto has no DynamoDBBackend.transact_write_items (in moto.dynamodb.models): "),
    ("import moto.dynamodb.models.dynamo_type as m; m.Item.project = lambda self, paths: None",
     "error: moto's Item.project (in moto.dynamodb.models.dynamo_type) takes (self, paths), dagcast's patch passes "
     "(self, projection_expressions): "),
    ("import moto.core.serialize as m; m.BaseJSONSerializer.get_serialized_name = None",
     "error: moto's BaseJSONSerializer.get_serialized_name (in moto.core.serialize) is not callable: "),
    ("import sys; sys.modules['moto.dynamodb.parsing.expressions'] = None",
     "error: moto's moto.dynamodb.models cannot be imported ("),
]


@pytest.mark.parametrize(("prelude", "line"), MISMATCHES, ids=["version", "missing", "signature", "not-callable", "module"])
def test_another_moto_stops_the_server_at_start_up_in_one_line(prelude: str, line: str) -> None:
    port = str(free_port())
    proc = _run_patched(prelude, "-H", "127.0.0.1", "-p", port)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    [said] = proc.stderr.strip().splitlines()
    assert said.startswith(line), said
    assert MOTO_VERSION in said, said


def test_patching_twice_wraps_nothing_twice_and_a_refused_moto_is_left_unpatched() -> None:
    """In a process of its own, so that this one's moto stays as released."""
    code = """
import inspect
import runpy
import moto
from moto.core.serialize import BaseJSONSerializer
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import Item
from moto.dynamodb.parsing.expressions import UpdateExpressionParser
from moto.dynamodb.responses import DynamoHandler
import dagcast.moto_server as m

def patched():
    attrs = [(DynamoDBBackend, n) for n in ("transact_write_items", "get_item", *m.WRITES)] + [
        (BaseJSONSerializer, "_serialize"), (Item, "project"), (DynamoHandler, "update_item"), (UpdateExpressionParser, "make")]
    return [inspect.getattr_static(cls, name) for cls, name in attrs] + [m.ddb_models.copy]

before = patched()
released = moto.__version__
moto.__version__ = "0.0.0"
try:
    m.patch()
except m.MotoMismatch:
    pass
else:
    raise SystemExit("patched another moto")
assert patched() == before, "a refused moto was patched all the same"
moto.__version__ = released
m.patch()
once = patched()
assert all(a is not b for a, b in zip(once, before)), "patch() left something unpatched"
m.patch()
runpy.run_module("dagcast.moto_server", run_name="a_second_copy")["patch"]()  # as `python -m` plus an import make
assert all(a is b for a, b in zip(patched(), once)), "a second patch() wrapped again"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
