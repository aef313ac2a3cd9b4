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

Two of moto's DynamoDB costs grow with the item, and a deploy record is big (its DAG ids, and one
entry per sidecar in `activations` and `notified`), so every sidecar report paid them. A read with
a ProjectionExpression converted the whole item to plain Python and back to keep a few attributes:
names of top-level attributes are now picked from the item as stored (a get without a projection
returns the same values), and nested paths or list elements still go through moto. An update_item
deep-copied the item, wrote it out twice and compared it attribute by attribute, all only to answer
ReturnValues: with NONE or ALL_NEW none of that can change the answer, so it is skipped (ALL_NEW
still writes the new item out once), and the other ReturnValues go through moto as before.

Each update_item also parsed its UpdateExpression twice (handler and backend), and dagcast sends the
same few expressions over and over: a parsed expression is kept (moto only reads it; its validators
work on a deep copy).

A query of the table went through every item of every partition (sorted), then through every item of
its partition, walking each one to add up its size before looking at its sort key: listing the 50
sidecars of a deployment walked all its deploy records and their DAG ids, and a burst of 50
heartbeats made that 50 times. A query of the table now gives moto only the items of its partition
that match the key condition (by moto's own comparison); moto then sorts, pages, filters and
projects them as before.

All of this is written against one moto release (dagcast.moto_state.MOTO_VERSION, pinned in
pyproject.toml): patch() first checks that it is the one installed and that everything it replaces
or calls is there (check_moto), so another moto stops the server at start-up with one line on stderr
instead of answering wrongly later. tests/integration/test_moto_patches.py compares the answers with
moto's own.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import logging
import re
import threading
import types
from collections.abc import Callable
from typing import Any

from dagcast import moto_state

with contextlib.suppress(ImportError):  # a moto whose modules moved: check_moto() names what is missing, in one line
    import moto.backends
    import moto.dynamodb.models as ddb_models
    from moto.core.serialize import BaseJSONSerializer
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType, Item
    from moto.dynamodb.models.table import Table
    from moto.dynamodb.parsing.expressions import UpdateExpressionParser  # type: ignore[attr-defined]
    from moto.dynamodb.responses import DynamoHandler

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


_LIST_ELEMENT = re.compile(r".+\[\d+\]$")  # how moto's projection paths name a list element


def _top_level_names_as_stored(method: Callable[..., Item]) -> Callable[..., Item]:
    """Item.project that keeps top-level attributes without converting the whole item (see the module docstring)."""

    @functools.wraps(method)
    def project(self: Item, projection_expressions: list[list[str]]) -> Item:
        if not all(len(path) == 1 and not _LIST_ELEMENT.match(path[0]) for path in projection_expressions):
            return method(self, projection_expressions)  # nested paths and list elements: moto's way
        projected = Item(self.hash_key, self.range_key, attrs={})
        for (name,) in projection_expressions:
            if name in self.attrs:
                # bypasses LimitedSizeDict's size check, which walks the item: these values passed it
                dict.__setitem__(projected.attrs, name, copy.deepcopy(self.attrs[name]))
        return projected

    return project


class _Partition:
    """A table as a query of it sees it: every attribute is the table's, but its items are the ones given."""

    def __init__(self, table: Table, items: list[Item]) -> None:
        self._table = table
        self._items = items

    def all_items(self) -> list[Item]:
        return self._items

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


def _matching_items_only(method: Callable[..., Any]) -> Callable[..., Any]:
    """Table.query that, for a query of the table itself (no index), hands moto only the items of the
    query's partition that match its key condition, in sort key order (see the module docstring)."""

    @functools.wraps(method)
    def query(self: Table, hash_key: Any, range_comparison: str | None, range_objs: list[Any],
              *args: Any, **kwargs: Any) -> Any:
        index_name = kwargs.get("index_name", args[4] if len(args) > 4 else None)  # after limit .. projection_expressions
        partition = self.items.get(hash_key) if hash_key is not None and self.range_key_attr else None
        if index_name or not isinstance(partition, dict):
            return method(self, hash_key, range_comparison, range_objs, *args, **kwargs)
        items = [i for i in partition.values() if isinstance(i, Item) and i.range_key is not None
                 and (not range_comparison or i.range_key.compare(range_comparison, range_objs))]
        items.sort(key=lambda i: i.range_key)  # type: ignore[arg-type,return-value]  # DynamoType orders itself
        return method(_Partition(self, items), hash_key, range_comparison, range_objs, *args, **kwargs)

    return query


class _UpdateOutcome(threading.local):
    """What the update_item request being handled on this thread needs of moto's bookkeeping."""

    return_values: str | None = None  # NONE or ALL_NEW while one is in progress


_UPDATE = _UpdateOutcome()
_LEAN_RETURN_VALUES = ("NONE", "ALL_NEW")


def _lean_when_returning_none_or_new(method: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoHandler.update_item that, for ReturnValues NONE or ALL_NEW, lets moto skip the copy of the
    item before the update and the attribute comparison (both only feed ALL_OLD and UPDATED_*)."""

    @functools.wraps(method)
    def update_item(self: DynamoHandler) -> Any:
        return_values = self.body.get("ReturnValues", "NONE")
        if return_values not in _LEAN_RETURN_VALUES:
            return method(self)
        _UPDATE.return_values = return_values
        try:
            return method(self)
        finally:
            _UPDATE.return_values = None

    return update_item


def _no_old_item_for_lean_updates(method: Callable[..., Any]) -> Callable[..., Any]:
    """DynamoDBBackend.get_item, which moto's update_item handler calls once, before the update, for the
    item's old attributes: in a lean update it still checks the key, then reports no old item."""

    @functools.wraps(method)
    def get_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
        item = method(self, *args, **kwargs)
        return None if _UPDATE.return_values is not None else item

    return get_item


class _Unreturned:
    """The updated item as moto's update_item handler sees it when ReturnValues is NONE: it drops the
    attributes anyway, so they are not written out."""

    def to_json(self) -> dict[str, Any]:
        return {"Attributes": {}}


def _unreturned_when_none(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def update_item(self: DynamoDBBackend, *args: Any, **kwargs: Any) -> Any:
        item = method(self, *args, **kwargs)
        return _Unreturned() if _UPDATE.return_values == "NONE" else item

    return update_item


class MotoMismatch(RuntimeError):
    """The installed moto is not the one these patches are written for (the message says how, in one line)."""


# What patch() and serve() replace or call in moto, as (module, attribute, parameters): the parameters a
# wrapper passes on by name or position (the first ones of the signature), or None for an attribute that
# must only exist and be callable. Attributes of instances (Table.items, DynamoHandler.body) cannot be
# checked before there is one: the differential tests cover them.
_MOTO_INTERNALS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("moto.backends", "list_of_moto_modules", ()),
    ("moto.core.serialize", "BaseJSONSerializer._serialize", ("self", "serialized", "value", "shape", "key")),
    ("moto.core.serialize", "BaseJSONSerializer.get_serialized_name", ("self", "shape", "default_name")),
    ("moto.dynamodb.models", "copy.deepcopy", None),  # the module's own `copy`, replaced by _by_reference
    ("moto.dynamodb.models", "DynamoDBBackend.transact_write_items", ("self", "transact_items")),
    ("moto.dynamodb.models", "DynamoDBBackend.get_item", None),
    *(("moto.dynamodb.models", f"DynamoDBBackend.{name}", None) for name in WRITES),  # update_item among them
    ("moto.dynamodb.models.dynamo_type", "DynamoType", ("type_as_dict",)),
    ("moto.dynamodb.models.dynamo_type", "Item", ("hash_key", "range_key", "attrs")),
    ("moto.dynamodb.models.dynamo_type", "Item.project", ("self", "projection_expressions")),
    ("moto.dynamodb.models.table", "Table.get_item", ("self", "hash_key", "range_key")),
    ("moto.dynamodb.models.table", "Table.delete_item", ("self", "hash_key", "range_key")),
    ("moto.dynamodb.models.table", "Table.query", ("self", "hash_key", "range_comparison", "range_objs", "limit",
                                                   "exclusive_start_key", "scan_index_forward",
                                                   "projection_expressions", "index_name")),
    ("moto.dynamodb.models.table", "Table.all_items", ("self",)),
    ("moto.dynamodb.parsing.expressions", "UpdateExpressionParser.make", ("expression_str",)),
    ("moto.dynamodb.responses", "DynamoHandler.update_item", ("self",)),
    ("moto.moto_server.werkzeug_app", "DomainDispatcherApplication", None),
    ("moto.moto_server.werkzeug_app", "MotoRequestHandler", None),
    ("moto.moto_server.werkzeug_app", "create_backend_app", None),
)


def check_moto() -> None:
    """Raise MotoMismatch unless the installed moto is the pinned release and has every internal patch()
    touches, with the parameters its wrappers pass on: checked before anything is patched."""
    pinned = moto_state.MOTO_VERSION
    if (installed := moto_state.installed_moto_differs()) is not None:
        raise MotoMismatch(f"moto {installed} is installed, dagcast's moto patches are written for {pinned}: "
                           f"install dagcast's pinned requirements (moto[server]=={pinned})")
    written_for = f"dagcast's moto patches are written for moto {pinned}"
    for module_name, path, params in _MOTO_INTERNALS:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise MotoMismatch(f"moto's {module_name} cannot be imported ({exc}): {written_for}") from None
        for name in path.split("."):
            if not hasattr(obj, name):
                raise MotoMismatch(f"moto has no {path} (in {module_name}): {written_for}")
            obj = getattr(obj, name)
        if not callable(obj):
            raise MotoMismatch(f"moto's {path} (in {module_name}) is not callable: {written_for}")
        if params:
            try:
                found = tuple(inspect.signature(obj).parameters)
            except (TypeError, ValueError):  # no signature to read (a builtin): calling it is all there is
                continue
            if found[: len(params)] != params:
                raise MotoMismatch(f"moto's {path} (in {module_name}) takes ({', '.join(found)}), "
                                   f"dagcast's patch passes ({', '.join(params)}): {written_for}")


_PATCHED = "_dagcast_patched"  # set on moto.backends once patched: on moto, so a second copy of this module sees it too
_PATCH_LOCK = threading.Lock()


def patch() -> None:
    """Check moto (check_moto), then patch it, once: a second call changes nothing (no wrapper is wrapped again)."""
    check_moto()  # first: without the modules it checks, `moto.backends` below is not even imported
    with _PATCH_LOCK:
        if getattr(moto.backends, _PATCHED, False):
            return
        _patch()
        setattr(moto.backends, _PATCHED, True)


def _patch() -> None:
    modules = frozenset(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: modules
    BaseJSONSerializer._serialize = _attribute_values_as_they_are(BaseJSONSerializer._serialize)  # type: ignore[method-assign]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    ddb_models.copy = types.SimpleNamespace(deepcopy=_by_reference)  # type: ignore[assignment]
    DynamoDBBackend.transact_write_items = _touched_items_only(DynamoDBBackend.transact_write_items)  # type: ignore[method-assign]
    Item.project = _top_level_names_as_stored(Item.project)  # type: ignore[method-assign]
    Table.query = _matching_items_only(Table.query)  # type: ignore[method-assign]
    DynamoHandler.update_item = _lean_when_returning_none_or_new(DynamoHandler.update_item)  # type: ignore[method-assign]
    DynamoDBBackend.get_item = _no_old_item_for_lean_updates(DynamoDBBackend.get_item)  # type: ignore[method-assign]
    DynamoDBBackend.update_item = _unreturned_when_none(DynamoDBBackend.update_item)  # type: ignore[method-assign]
    UpdateExpressionParser.make = staticmethod(functools.lru_cache(maxsize=256)(UpdateExpressionParser.make))
    for name in WRITES:
        setattr(DynamoDBBackend, name, _serialised(getattr(DynamoDBBackend, name)))


def serve(argv: list[str] | None = None) -> None:
    """moto server on host:port; with --state-dir its state is restored at start and kept there
    (see dagcast.moto_state). SIGTERM and SIGINT flush the state and exit 0."""
    import argparse
    import signal
    import sys
    from pathlib import Path

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from dagcast.lifetime import die_with_parent

    die_with_parent()  # SIGTERM when `local up` goes, however it goes: the state is written, nothing is orphaned
    parser = argparse.ArgumentParser(prog="python -m dagcast.moto_server")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    parser.add_argument("--state-dir", type=Path, help="keep the state in this folder (restored at start)")
    args = parser.parse_args(argv)
    try:
        patch()
    except (MotoMismatch, ImportError) as exc:  # one line for `dagcast local up` to show, not a traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
    app: Any = DomainDispatcherApplication(create_backend_app)
    store = None
    if args.state_dir is not None:
        try:
            moto_state.check_moto()
            store = moto_state.StateStore(args.state_dir, _WRITE_LOCK)
            counts = store.restore()
        except moto_state.StateError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(3)
        print(f"state restored from {args.state_dir}: {counts}", flush=True)
        store.start()
        app = moto_state.middleware(app, store)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if store is not None:
            store.stop()


if __name__ == "__main__":
    serve()
