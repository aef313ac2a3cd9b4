"""moto server for the embedded stack, with DynamoDB writes made atomic across requests.

moto serves each request in a thread, and its transact_write_items snapshots the table,
applies the items, and restores the snapshot when a condition fails, without a lock: a
failed transaction can then roll back another request's committed write. Real DynamoDB
never does that, and dagcast's version assignment relies on it, so every DynamoDB write
here takes one lock. Run as `python -m dagcast.moto_server` with moto_server's arguments.

moto's snapshot is also a deep copy of the whole table for every item of a transaction,
which grows with every deploy recorded (each holds its DAG ids): on a few dozen deploys it
made publishing a version cost hundreds of milliseconds. Under the lock nothing else writes,
so the snapshot here holds only the items the transaction touches, and a cancelled
transaction puts exactly those back.

moto also writes each DynamoDB response by walking the API's shape model value by value:
reading one deploy record with a thousand DAG ids took about 80 ms of its CPU. Its items are
already in the wire format, so attribute values without binary data are passed through. An
update deep-copies the item only to feed DynamoDB Streams, which this stack's table does not
have, every request was logged to moto.log, and each one listed moto's package folder to find
its service: none of that happens here.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
import types
from collections.abc import Callable
from typing import Any

import moto.backends
import moto.dynamodb.models as ddb_models
from moto.core.serialize import BaseJSONSerializer
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType, Item
from moto.dynamodb.models.table import Table
from moto.server import main

_WRITE_LOCK = threading.RLock()
WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _WRITE_LOCK:
            return method(*args, **kwargs)

    return locked


def _by_reference(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """copy.deepcopy for moto's DynamoDB backend module, where it copies a Table before a transaction
    (see _touched_items_only) and an Item before an update for the table's stream (no table here has
    one): neither is copied."""
    return obj if isinstance(obj, Table | Item) else copy.deepcopy(obj, memo)


def _key_of(table: Table, op_type: str, op: dict[str, Any]) -> tuple[DynamoType, DynamoType | None]:
    attrs = op["Item"] if op_type == "Put" else op["Key"]
    hash_value = DynamoType(attrs[table.hash_key_attr])
    range_value = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
    return hash_value, range_value


def _touched_items_only(method: Callable[..., Any]) -> Callable[..., Any]:
    """transact_write_items that snapshots and restores only the items it touches (call under the lock)."""

    @functools.wraps(method)
    def transact(self: DynamoDBBackend, transact_items: list[dict[str, Any]]) -> Any:
        saved = []
        for entry in transact_items:
            op_type, op = next(iter(entry.items()))
            table = self.tables.get(op.get("TableName", "")) if isinstance(op, dict) else None
            if table is None or op_type not in ("Put", "Update", "Delete", "ConditionCheck"):
                continue  # moto reports the error itself, before it changes anything
            try:
                hash_value, range_value = _key_of(table, op_type, op)
            except (KeyError, TypeError):
                continue  # a malformed key: moto refuses the item without writing it
            saved.append((table, hash_value, range_value, copy.deepcopy(table.get_item(hash_value, range_value))))
        try:
            return method(self, transact_items)
        except Exception:
            for table, hash_value, range_value, item in reversed(saved):
                _restore(table, hash_value, range_value, item)
            raise

    return transact


def _restore(table: Table, hash_value: DynamoType, range_value: DynamoType | None, item: Any) -> None:
    if item is None:
        table.delete_item(hash_value, range_value)
    elif range_value is not None:
        table.items[hash_value][range_value] = item
    else:
        table.items[hash_value] = item


_PLAIN_TYPES = frozenset({"S", "N", "BOOL", "NULL", "SS", "NS"})


def _plain(value: Any) -> bool:
    """An attribute value in DynamoDB's wire format already, with no binary data in it."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    kind, inner = next(iter(value.items()))
    if kind in _PLAIN_TYPES:
        return True
    if kind == "L":
        return isinstance(inner, list) and all(_plain(v) for v in inner)
    if kind == "M":
        return isinstance(inner, dict) and all(_plain(v) for v in inner.values())
    return False


def _attribute_values_as_they_are(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def serialize(self: Any, serialized: Any, value: Any, shape: Any, key: str) -> None:
        if getattr(shape, "name", None) == "AttributeValue" and _plain(value):
            serialized[self.get_serialized_name(shape, key or shape.name)] = value
            return
        method(self, serialized, value, shape, key)

    return serialize


def patch() -> None:
    modules = frozenset(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: modules
    BaseJSONSerializer._serialize = _attribute_values_as_they_are(BaseJSONSerializer._serialize)  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    ddb_models.copy = types.SimpleNamespace(deepcopy=_by_reference)  # type: ignore[assignment]
    DynamoDBBackend.transact_write_items = _touched_items_only(DynamoDBBackend.transact_write_items)  # type: ignore[method-assign]
    for name in WRITES:
        setattr(DynamoDBBackend, name, _serialised(getattr(DynamoDBBackend, name)))


if __name__ == "__main__":
    patch()
    main()
