"""The embedded stack's AWS state on disk: what moto server holds survives a restart.

moto keeps everything in memory. This module, loaded into the moto server process by
`dagcast.moto_server --state-dir`, writes it to the state folder a moment after it changes
and reads it back at start, for the services the stack uses:

* DynamoDB: an append-only log of the items each write touched (their new state in wire format,
  or a deletion), one JSON line per item, plus the tables' definitions; compacted into a full
  snapshot at a clean stop and when the log grows. A flush costs the items that changed, not the
  table: deploy records hold thousands of DAG ids, and pickling a table of them takes a tenth of
  a second.
* S3, SQS, SNS, EventBridge: each region's backend pickled whole (locks are recreated on load),
  with S3 object bodies stored once each as files named by their sha256, so a snapshot of the
  bucket holds only metadata. Object version ids survive, so versions pinned to them still work.

Writes are atomic (write a temporary file, fsync, rename, fsync the folder). Changes are noted
by a WSGI middleware that looks at each request (service, operation, keys) and are flushed
FLUSH_DELAY seconds later, in one pass, DynamoDB first and S3 last, so that a version record on
disk never names an object that is not. SIGTERM (also what the stack's parent sends when it
dies) flushes before the process exits; after a SIGKILL at most the changes of the last
FLUSH_DELAY and the flush in progress are lost (the ingest reconcile and the sidecars' own
reconciles heal queue messages). A torn last log line is skipped.

moto's internals are touched here (its backends' attributes); `check_moto()` says at start-up,
in one line, when the installed moto is not the one this was written against.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("dagcast.moto_state")

MOTO_VERSION = "5.2.5"  # the moto pinned in pyproject.toml; dagcast.moto_server's patches check it too
FLUSH_DELAY = 0.25  # seconds after a change before it is written: changes are batched, and a SIGKILL loses at most these
COMPACT_LOG_BYTES = 32 << 20
PICKLED = ("s3", "sqs", "sns", "events")
_READS = ("Get", "List", "Describe", "Query", "Scan", "BatchGet", "Head")


class StateError(RuntimeError):
    """The state folder cannot be read or written (the message says which file)."""


def installed_moto_differs() -> str | None:
    """The installed moto's version when it is not MOTO_VERSION, the one release this module and
    dagcast.moto_server's patches are written for (the one place that names it, besides pyproject.toml)."""
    import moto

    installed = str(moto.__version__)
    return installed if installed != MOTO_VERSION else None


def check_moto() -> None:
    """Fail at start-up, in one clear line, when moto is not the release this module knows."""
    from moto.dynamodb.models.dynamo_type import Item
    from moto.dynamodb.models.table import Table
    from moto.s3.models import FakeKey

    if (installed := installed_moto_differs()) is not None:
        raise StateError(f"dagcast's embedded state needs moto {MOTO_VERSION}; moto {installed} is installed "
                         "(install dagcast's pinned requirements)")
    for cls, attrs in ((Table, ("get_item", "put_item", "delete_item", "all_items")), (Item, ("to_json",)),
                       (FakeKey, ("value",))):
        missing = [a for a in attrs if not hasattr(cls, a)]
        if missing:
            raise StateError(f"moto's {cls.__name__} has no {', '.join(missing)}: the embedded state cannot be kept")


def _backends(service: str) -> Any:
    import moto.backends

    return moto.backends.get_backend(service)  # type: ignore[call-overload]


def _regions(service: str) -> Iterable[tuple[str, str, Any]]:
    """(account, region, backend) of every backend that exists (without creating any)."""
    for account, per_region in list(dict.items(_backends(service))):
        for region, backend in list(dict.items(per_region)):
            yield account, region, backend


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- pickling moto's objects -----------------------------------------------------------------

_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())
_CONDITION = threading.Condition


def _new_fake_key(state: dict[str, Any], body: bytes) -> Any:
    from moto.s3.models import FakeKey

    key: Any = FakeKey.__new__(FakeKey)
    key.__dict__.update(state)
    key._value_buffer = tempfile.SpooledTemporaryFile(max_size=key._max_buffer_size)  # noqa: SIM115 - the key owns it, as moto does
    key.lock = threading.Lock()
    key.value = body
    return key


def _new_table(state: dict[str, Any]) -> Any:
    from moto.dynamodb.models.table import Table

    table: Any = Table.__new__(Table)
    table.__dict__.update(state)
    table.items = collections.defaultdict(dict)  # as Table.__init__ makes it
    return table


def _new_dict(cls: Any, items: list[tuple[Any, Any]], attrs: dict[str, Any]) -> Any:
    obj: Any = cls.__new__(cls)
    for key, value in items:
        dict.__setitem__(obj, key, value)
    obj.__dict__.update(attrs)
    return obj


class _Bodies:
    """S3 object bodies, stored once each as <sha256> files; the sha256 of a FakeKey is computed once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._known: dict[int, tuple[weakref.ref[Any], str]] = {}
        self.written: set[str] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def ref(self, key: Any) -> str:
        seen = self._known.get(id(key))
        if seen is not None and seen[0]() is key:
            return seen[1]
        body = key.value
        sha = hashlib.sha256(body).hexdigest()
        if sha not in self.written:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.folder / sha, body)
            self.written.add(sha)
        self._known[id(key)] = (weakref.ref(key), sha)
        return sha

    def load(self, sha: str) -> bytes:
        try:
            return (self.folder / sha).read_bytes()
        except OSError as exc:
            raise StateError(f"the body {sha[:12]} of a stored S3 object is missing from {self.folder}") from exc

    def forget_gone(self, alive: set[str]) -> None:
        """Delete bodies no object refers to any more (after a snapshot that lists every live one)."""
        for sha in list(self.written - alive):
            with contextlib.suppress(OSError):
                (self.folder / sha).unlink()
            self.written.discard(sha)
        self._known = {k: v for k, v in self._known.items() if v[0]() is not None}


class _Pickler(pickle.Pickler):
    def __init__(self, file: Any, bodies: _Bodies | None, tables_without_items: bool) -> None:
        super().__init__(file, protocol=5)
        self.bodies = bodies
        self.tables_without_items = tables_without_items
        self.refs: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        from moto.dynamodb.models.table import Table
        from moto.s3.models import FakeKey

        if isinstance(obj, _LOCK):
            return threading.Lock, ()
        if isinstance(obj, _RLOCK):
            return threading.RLock, ()
        if isinstance(obj, _CONDITION):
            return threading.Condition, ()
        if isinstance(obj, FakeKey) and self.bodies is not None:
            sha = self.bodies.ref(obj)
            self.refs.add(sha)
            state = {k: v for k, v in obj.__dict__.items() if k not in ("_value_buffer", "lock")}
            return _load_fake_key, (state, sha)
        if isinstance(obj, Table) and self.tables_without_items:
            return _new_table, ({k: v for k, v in obj.__dict__.items() if k != "items"},)
        if isinstance(obj, dict) and type(obj) is not dict and type(obj).__module__.startswith("moto."):
            # moto's dict subclasses may override items() (S3's key store answers only the latest version
            # of each key): keep what the dict really holds
            return _new_dict, (type(obj), list(dict.items(obj)), dict(getattr(obj, "__dict__", {})))
        return NotImplemented


_LOADING: dict[str, _Bodies] = {}


def _load_fake_key(state: dict[str, Any], sha: str) -> Any:
    return _new_fake_key(state, _LOADING["bodies"].load(sha))


def _dumps(obj: Any, bodies: _Bodies | None = None, tables_without_items: bool = False) -> tuple[bytes, set[str]]:
    buf = io.BytesIO()
    pickler = _Pickler(buf, bodies, tables_without_items)
    pickler.dump(obj)
    return buf.getvalue(), pickler.refs


def _b64(value: Any) -> str:
    import base64

    return value if isinstance(value, str) else base64.b64encode(value).decode()


def _wire(value: Any) -> dict[str, Any]:
    """A DynamoType in DynamoDB's wire format (what a request carries): binary as base64, nesting kept."""
    kind, inner = value.type, value.value
    if kind == "M":
        return {"M": {k: _wire(v) for k, v in inner.items()}}
    if kind == "L":
        return {"L": [_wire(v) for v in inner]}
    if kind == "B":
        return {"B": _b64(inner)}
    if kind == "BS":
        return {"BS": [_b64(v) for v in inner]}
    return {kind: inner}


def _wire_item(item: Any) -> dict[str, Any]:
    return {name: _wire(value) for name, value in item.attrs.items()}


# --- the store ----------------------------------------------------------------------------------


class StateStore:
    """Notes changes, flushes them FLUSH_DELAY later, and restores everything at start."""

    def __init__(self, folder: Path, write_lock: Any) -> None:
        self.folder = folder
        self._write_lock = write_lock  # the moto server's DynamoDB write lock: items do not change under it
        self._bodies = _Bodies(folder / "s3-bodies")
        self._dirty: set[str] = set()
        self._touched: set[tuple[str, str]] = set()  # (table name, key or item as JSON)
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_bytes = 0
        self.generation = 0  # flushes done
        self.flushed_at = 0.0  # time.time() of the last flush
        self.flush_seconds = 0.0  # how long the last flush took

    # -- noting changes (called for every request, from the middleware)

    def note(self, service: str, operation: str, body: bytes) -> None:
        if operation.startswith(_READS) or operation == "ReceiveMessage":
            return
        with self._lock:
            if service == "dynamodb":
                self._note_dynamodb(operation, body)
            else:
                self._dirty.add(service)
                if service in ("s3", "sns", "events"):
                    self._dirty.add("sqs")  # notifications, fan-out and rule targets deliver to queues
        self._changed.set()

    def _note_dynamodb(self, operation: str, body: bytes) -> None:
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return
        name = doc.get("TableName", "")
        if operation in ("PutItem",):
            self._touched.add((name, json.dumps(doc.get("Item", {}), sort_keys=True)))
        elif operation in ("UpdateItem", "DeleteItem"):
            self._touched.add((name, json.dumps(doc.get("Key", {}), sort_keys=True)))
        elif operation == "TransactWriteItems":
            for entry in doc.get("TransactItems", []):
                for kind, op in entry.items():
                    if kind != "ConditionCheck" and isinstance(op, dict):
                        attrs = op.get("Item") if kind == "Put" else op.get("Key")
                        self._touched.add((op.get("TableName", ""), json.dumps(attrs or {}, sort_keys=True)))
        elif operation == "BatchWriteItem":
            for table, requests in doc.get("RequestItems", {}).items():
                for request in requests:
                    put, delete = request.get("PutRequest"), request.get("DeleteRequest")
                    attrs = put.get("Item") if put else (delete or {}).get("Key")
                    self._touched.add((table, json.dumps(attrs or {}, sort_keys=True)))
        else:  # tables created, deleted or reconfigured
            self._dirty.add("dynamodb-tables")

    # -- the flusher

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moto-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.wait(FLUSH_DELAY):
                return
            self._changed.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep the server up; the next change retries everything
                log.exception("state flush failed")
                with self._lock:
                    self._dirty.update(("dynamodb-tables", *PICKLED))
                self._changed.set()
                self._stop.wait(1.0)

    def stop(self) -> None:
        """Flush what is left and compact the DynamoDB log (a clean stop)."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        self.compact()

    def flush(self) -> None:
        started = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            touched, self._touched = self._touched, set()
        if touched or "dynamodb-tables" in dirty:
            self._flush_dynamodb(touched, "dynamodb-tables" in dirty)
        for service in ("sqs", "sns", "events", "s3"):  # S3 last: a record on disk never names an object that is not
            if service in dirty:
                self._flush_pickled(service)
        _fsync_dir(self.folder)
        self.generation += 1
        self.flushed_at = time.time()
        self.flush_seconds = time.monotonic() - started
        if self._log_bytes > COMPACT_LOG_BYTES:
            self.compact()

    def _flush_pickled(self, service: str) -> None:
        for attempt in range(5):
            try:
                backends = {(a, r): b for a, r, b in _regions(service)}
                data, refs = _dumps(backends, self._bodies if service == "s3" else None)
                break
            except RuntimeError:  # a dict changed size under the pickler (a request meanwhile): again
                if attempt == 4:
                    raise
                time.sleep(0.01)
        _write_atomic(self.folder / f"{service}.pickle", data)
        if service == "s3":
            self._bodies.forget_gone(refs)

    def _flush_dynamodb(self, touched: set[tuple[str, str]], tables: bool) -> None:
        from moto.dynamodb.models.dynamo_type import DynamoType

        lines = []
        with self._write_lock:
            if tables:
                backends = {(a, r): b for a, r, b in _regions("dynamodb")}
                data, _ = _dumps(backends, tables_without_items=True)
            for name, attrs_json in touched:
                attrs = json.loads(attrs_json)
                for account, region, backend in _regions("dynamodb"):
                    table = backend.tables.get(name)
                    if table is None or table.hash_key_attr not in attrs:
                        continue
                    hash_value = DynamoType(attrs[table.hash_key_attr])
                    range_value = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
                    if table.range_key_attr and table.range_key_attr not in attrs:
                        continue
                    try:
                        item = table.get_item(hash_value, range_value)
                    except Exception:  # noqa: BLE001 - moto raises for a key of the wrong type: nothing stored there
                        continue
                    key = {table.hash_key_attr: attrs[table.hash_key_attr]}
                    if table.range_key_attr:
                        key[table.range_key_attr] = attrs[table.range_key_attr]
                    lines.append({"a": account, "r": region, "t": name, "k": key,
                                  "i": _wire_item(item) if item is not None else None})
        if tables:
            _write_atomic(self.folder / "dynamodb-tables.pickle", data)
        if lines:
            blob = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
            with open(self.folder / "dynamodb.log", "ab") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            self._log_bytes += len(blob)

    def compact(self) -> None:
        """Write every item as it is now to dynamodb.snapshot, then start the log afresh."""
        with self._write_lock:
            lines = []
            for account, region, backend in _regions("dynamodb"):
                for name, table in backend.tables.items():
                    for item in table.all_items():
                        key = {table.hash_key_attr: _wire(item.hash_key)}
                        if table.range_key_attr:
                            key[table.range_key_attr] = _wire(item.range_key)
                        lines.append({"a": account, "r": region, "t": name, "k": key, "i": _wire_item(item)})
            blob = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
            _write_atomic(self.folder / "dynamodb.snapshot", blob)
            _write_atomic(self.folder / "dynamodb.log", b"")
            self._log_bytes = 0
        _fsync_dir(self.folder)

    # -- restoring

    def restore(self) -> dict[str, int]:
        """Load what the folder holds into moto's backends; returns counts of what was restored."""
        counts: dict[str, int] = {}
        if not self.folder.is_dir():
            return counts
        _LOADING["bodies"] = self._bodies
        try:
            for service in ("dynamodb-tables", *PICKLED):
                path = self.folder / f"{service}.pickle"
                if not path.exists():
                    continue
                try:
                    restored: dict[tuple[str, str], Any] = pickle.loads(path.read_bytes())
                except Exception as exc:  # noqa: BLE001 - any unreadable snapshot: say which file, stop
                    raise StateError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
                live = _backends("dynamodb" if service == "dynamodb-tables" else service)
                for (account, region), backend in restored.items():
                    dict.__setitem__(live[account], region, backend)
                counts[service] = len(restored)
        finally:
            _LOADING.pop("bodies", None)
        counts["dynamodb-items"] = self._replay(["dynamodb.snapshot", "dynamodb.log"])
        return counts

    def _replay(self, names: list[str]) -> int:
        from moto.dynamodb.models.dynamo_type import DynamoType

        live = _backends("dynamodb")
        applied = 0
        for name in names:
            path = self.folder / name
            if not path.exists():
                continue
            for raw in path.read_bytes().splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    log.warning("skipping a torn line of the state log", extra={"file": str(path)})
                    continue
                table = dict.get(live, line["a"], {}).get(line["r"])
                table = table.tables.get(line["t"]) if table is not None else None
                if table is None:
                    continue
                if line["i"] is None:
                    hash_value = DynamoType(line["k"][table.hash_key_attr])
                    range_value = DynamoType(line["k"][table.range_key_attr]) if table.range_key_attr else None
                    with contextlib.suppress(KeyError):
                        table.delete_item(hash_value, range_value)
                else:
                    table.put_item(line["i"])
                applied += 1
        return applied


# --- the middleware -----------------------------------------------------------------------------------


def middleware(app: Callable[..., Any], store: StateStore) -> Callable[..., Any]:
    """A WSGI wrapper that tells `store` about every request after moto handled it."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/_dagcast/state":
            doc = json.dumps({"generation": store.generation, "flushed_at": store.flushed_at,
                              "flush_seconds": store.flush_seconds}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(doc)))])
            return [doc]
        method = environ.get("REQUEST_METHOD", "GET")
        service, operation = _what(environ)
        body = b""
        if method == "POST" and service != "s3":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(body)
        result = app(environ, start_response)
        if service == "s3":
            if method in ("PUT", "POST", "DELETE"):
                store.note("s3", "Write", b"")
        elif service:
            if not operation and body:
                operation = _query_action(body)
            store.note(service, operation or "Unknown", body)
        return result

    return wrapped


def _what(environ: dict[str, Any]) -> tuple[str, str]:
    """(service, operation) of a request: from the JSON protocol's target header and the signature's scope."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    auth = environ.get("HTTP_AUTHORIZATION", "") or environ.get("QUERY_STRING", "")
    service = ""
    marker = "aws4_request"
    if marker in auth:
        scope = auth.split(marker)[0].rstrip("/%2F").replace("%2F", "/").split("/")
        service = scope[-1] if scope else ""
    if not service and not target:
        service = "s3"  # an unsigned request: a browser-style presigned POST (the upload form)
    operation = target.rpartition(".")[2] if target else ""
    if target.startswith("DynamoDB"):
        service = "dynamodb"
    elif target.startswith("AmazonSQS"):
        service = "sqs"
    elif target.startswith("AWSEvents"):
        service = "events"
    return service, operation


def _query_action(body: bytes) -> str:
    from urllib.parse import parse_qs

    return (parse_qs(body.decode("latin-1")).get("Action") or [""])[0]
