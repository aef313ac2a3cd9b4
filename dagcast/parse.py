"""Parse a DAG folder with Airflow's own loader, in a warm child process, incrementally.

`Parser` starts one child interpreter (the *warm child*) that imports Airflow once and then
serves parse requests, one JSON line each on its stdin; it answers JSON lines on a dedicated
file descriptor (its original stdout, duplicated; fd 1 is pointed at stderr so Airflow's
logging and DAG files' prints cannot corrupt the protocol). For each request the warm child
lists the folder with Airflow's own listing (`airflow.utils.file.list_py_file_paths`, which is
what the DAG processor uses: `.airflowignore`, `[core] dag_ignore_file_syntax`, the safe-mode
heuristic) and forks up to `workers` *worker* processes, which take files one at a time from the
warm child. A worker parses each file the way the DAG processor's per-file child does: a fresh
`DagBag` on that one file (`process_file(path, only_if_updated=False, safe_mode=...)`) with the
folder on sys.path, then serialises its DAGs (a serialisation failure is an import error in
Airflow too). DAG files therefore never run in the caller's process nor in the warm child, and
a parse never sees module state left by an earlier one: every parse uses new forks of the warm
child, which itself never imports a DAG file.

Bounds: Airflow's per-file import timeout (`[core] dagbag_import_timeout`, SIGALRM, the same
mechanism as Airflow's) makes a slow file an import error; a worker that outlives it anyway
(signals blocked, a C loop) is killed at 1.5x the timeout + 2 s and the file gets an error; a
worker that dies (segfault, `os._exit`) costs only the file it was on. The whole parse has a
deadline (`timeout`), after which the warm child kills its workers and the parse raises
ParseError; the caller's side enforces the same deadline (plus a grace) on the warm child.
Results are plain JSON (ids, messages, frames as strings): nothing is ever unpickled.

Incremental parses: with `previous` and `changed`, only the changed or added files and the
files that import (directly or transitively, found by a static `ast` scan of every .py file in
the folder, kept in `ParseResult.modules`) a changed, added or removed module are parsed;
the other results are taken from `previous`. Modules resolve against the folder root, as
Airflow puts the folder on sys.path.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import faulthandler
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pydantic import BaseModel, Field

from dagcast.lifetime import child_env, die_with_parent

MESSAGE_LIMIT = 2_000
FRAME_LIMIT = 5
DEFAULT_TIMEOUT = 600.0  # whole parse
STARTUP_TIMEOUT = 180.0  # importing Airflow in the warm child
GRACE = 15.0  # the caller waits this much past the deadline for the warm child's own verdict
_TMP_PREFIX = "dagcast-parse-"
_TMP_ENV = "DAGCAST_PARSE_TMP"  # the warm child removes it if its parent dies without doing so
NICE_FROM_FILES = 20  # a parse of this many files or more runs its workers at the parser's `nice`
_PR_SET_PDEATHSIG = 1
# top-level `import airflow.x` / `from airflow.x import y`: what the DAG processor pre-imports
_AIRFLOW_IMPORT = re.compile(rb"^(?:from|import)[ \t]+(airflow(?:\.\w+)+)(?:[ \t]+import[ \t]+\(?([\w, \t]*))?",
                             re.MULTILINE)


# Bound once, at import (before any DAG file runs in a fork of this process): a DAG file that
# monkeypatches json or os cannot garble the results a worker sends.
_decode = json.JSONDecoder().decode
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_os_write = os.write


def airflow_importable() -> bool:
    """Whether this interpreter can import Airflow (found, not imported)."""
    try:
        return importlib.util.find_spec("airflow") is not None
    except (ImportError, ValueError):
        return False


# --- results -----------------------------------------------------------------------------------


class ImportFailure(BaseModel):
    """Why a file did not load: what Airflow records as the file's import error."""

    path: str  # the file, relative to the folder
    line: int | None  # line in that file where it failed, when the traceback passes through it
    type: str  # exception class name, e.g. ModuleNotFoundError, AirflowTaskTimeout
    message: str  # str(exception), at most MESSAGE_LIMIT characters
    frames: list[str] = Field(default_factory=list)  # last frames, "path:line in func", folder-relative

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.type}: {self.message}"


class FileResult(BaseModel):
    path: str
    dag_ids: list[str]
    error: ImportFailure | None = None
    seconds: float = 0.0


class ParseResult(BaseModel):
    folder: str = ""
    files: dict[str, FileResult]  # every file Airflow would parse, by path relative to the folder
    duplicates: dict[str, list[str]] = Field(default_factory=dict)  # dag_id -> files, when several define it
    parsed: int = 0
    reused: int = 0
    seconds: float = 0.0
    parsed_files: list[str] = Field(default_factory=list)  # which files this parse ran (not reused)
    # static imports of every .py file in the folder (also helpers Airflow does not parse), for the
    # next incremental parse: path -> absolute module names it may import
    modules: dict[str, list[str]] = Field(default_factory=dict)

    @property
    def dag_ids(self) -> list[str]:
        return sorted({d for f in self.files.values() for d in f.dag_ids})

    @property
    def import_errors(self) -> list[ImportFailure]:
        return [f.error for _, f in sorted(self.files.items()) if f.error is not None]


class ParseError(Exception):
    """The parser itself failed (not a DAG file): the message says why."""


# --- the folder's import graph (caller side, no Airflow) -----------------------------------------


def module_of(rel: str) -> str | None:
    """The module name a folder-relative .py path is imported as, with the folder on sys.path."""
    if not rel.endswith(".py"):
        return None
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts else None


def scan_imports(source: bytes | str, rel: str) -> list[str]:
    """Absolute names of the modules a file may import: every `import`/`from ... import` anywhere in
    it (relative ones resolved against its package), plus `importlib.import_module("x")` and
    `__import__("x")` with literal names. `from a import b` yields `a` and `a.b` (b may be a module)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    package = rel.split("/")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    continue
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module:
                names.add(module)
            names.update(f"{module}.{a.name}" if module else a.name for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return sorted(n for n in names if n and not n.startswith("."))


def python_files(folder: Path) -> list[str]:
    """Every .py file under `folder` (following symlinks, skipping __pycache__), folder-relative."""
    found: list[str] = []
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel_top = os.path.relpath(top, folder)
        prefix = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        found.extend(prefix + f for f in files if f.endswith(".py"))
    return sorted(found)


def import_graph(folder: Path, previous: dict[str, list[str]] | None = None,
                 rescan: set[str] | None = None) -> dict[str, list[str]]:
    """`modules` of a ParseResult: previous entries kept unless in `rescan`, new files scanned."""
    graph: dict[str, list[str]] = {}
    for rel in python_files(folder):
        if previous is not None and rel in previous and not (rescan and rel in rescan):
            graph[rel] = previous[rel]
            continue
        try:
            graph[rel] = scan_imports((folder / rel).read_bytes(), rel)
        except OSError:
            graph[rel] = []
    return graph


def importers_of(graph: dict[str, list[str]], touched: Iterable[str]) -> set[str]:
    """Files of `graph` importing, directly or transitively, a module among the `touched` paths (importing
    `a.b.c` runs `a` and `a.b` too). Each round compares every file's imports with the few modules found
    so far, so an incremental parse of a large folder spends no time on the files that import nothing new."""
    frontier = {m for m in (module_of(p) for p in touched) if m}
    seen_modules = set(frontier)
    found: set[str] = set()
    while frontier:
        below = tuple(m + "." for m in frontier)
        nxt: set[str] = set()
        for rel, names in graph.items():
            if rel not in found and any(n in frontier or n.startswith(below) for n in names):
                found.add(rel)
                module = module_of(rel)
                if module and module not in seen_modules:
                    seen_modules.add(module)
                    nxt.add(module)
        frontier = nxt
    return found


def _normalize(folder: Path, path: str) -> str:
    p = Path(path)
    if p.is_absolute():
        with contextlib.suppress(ValueError):
            p = p.relative_to(folder)
    text = p.as_posix()
    while text.startswith("./"):
        text = text[2:]
    return text


def duplicates_of(files: dict[str, FileResult]) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for rel, result in sorted(files.items()):
        for dag_id in result.dag_ids:
            where.setdefault(dag_id, []).append(rel)
    return {dag_id: paths for dag_id, paths in sorted(where.items()) if len(paths) > 1}


# --- the caller's side of the warm child -----------------------------------------------------------


class _Lines:
    """JSON lines read from a pipe with deadlines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def take(self) -> dict[str, Any] | None:
        end = self.buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        doc: dict[str, Any] = _decode(line.decode())
        return doc

    def feed(self) -> bool:
        """Read what is there; False at end of file."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:  # nothing there after all
            return True
        self.buf += chunk
        return bool(chunk)

    def read(self, deadline: float) -> dict[str, Any] | None:
        """The next message, None at end of file; TimeoutError past `deadline` (time.monotonic)."""
        while True:
            doc = self.take()
            if doc is not None:
                return doc
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and not self.feed():
                return None


@dataclasses.dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    lines: _Lines
    log: IO[bytes]
    airflow: str

    def alive(self) -> bool:
        return self.proc.poll() is None


def _stop(child: _Child | None) -> None:
    if child is None:
        return
    with contextlib.suppress(OSError):
        if child.proc.stdin:
            child.proc.stdin.close()
    try:
        child.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
    with contextlib.suppress(OSError):
        if child.proc.stdout:
            child.proc.stdout.close()
    child.log.close()


def _cleanup(holder: dict[str, Any]) -> None:
    _stop(holder.pop("child", None))
    tmp = holder.pop("tmp", None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


_BOOT = (
    "import sys\n"
    "root = {root!r}\n"
    "sys.path.insert(0, root)\n"
    "import dagcast.parse as p\n"
    "if sys.path and sys.path[0] == root:\n"
    "    del sys.path[0]\n"
    "p._serve()\n"
)


class Parser:
    """A warm parser: one child interpreter that imports Airflow once; every parse forks a fresh
    child of it (as Airflow's own DAG processor does), so DAG files never run in the caller's
    process and module state of one parse never leaks into the next.

    workers: parallel forks for large parses (default os.cpu_count()); file_timeout: Airflow's
    per-file import timeout (default its `[core] dagbag_import_timeout`); timeout: deadline of a
    whole parse; env: extra environment of the child (AIRFLOW__* settings); safe_mode: Airflow's
    DAG discovery heuristic (default `[core] dag_discovery_safe_mode`); python: the interpreter
    with Airflow (default this one); bundle_name: passed to the DagBag, as the processor does;
    serialize: serialise each DAG as the processor does (its failures are import errors there).
    Not for concurrent use from several threads (parses are serialised by a lock)."""

    def __init__(self, *, workers: int | None = None, file_timeout: float | None = None,
                 env: dict[str, str] | None = None, timeout: float | None = None,
                 safe_mode: bool | None = None, python: str | None = None,
                 bundle_name: str | None = None, serialize: bool = True, immutable: bool = False,
                 nice: int = 0) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.immutable = immutable  # folders whose files never change in place (a sidecar's versions)
        # the workers of a parse of NICE_FROM_FILES files or more run at this lower CPU priority than the
        # caller (a sidecar beside Airflow: 10); a smaller parse (an everyday change: a fork or two, over in
        # tens of milliseconds, that `deploy --wait` waits on) and the warm child itself do not
        self.nice = nice
        self.file_timeout = file_timeout
        self.env = dict(env or {})
        self.timeout = timeout or DEFAULT_TIMEOUT
        self.safe_mode = safe_mode
        self.python = python or sys.executable
        self.bundle_name = bundle_name
        self.serialize = serialize
        self._lock = threading.RLock()
        self._holder: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, _cleanup, self._holder)
        self.starts = 0  # how many warm children this parser started

    # lifetime

    def __enter__(self) -> Parser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            _cleanup(self._holder)

    def start(self) -> None:
        """Start the warm child now (else at the first parse); restart it if it died."""
        with self._lock:
            child = self._holder.get("child")
            if child is not None and child.alive():
                return
            _stop(self._holder.pop("child", None))
            self._holder["child"] = self._spawn()

    @property
    def pid(self) -> int | None:
        """The warm child's process id, while it runs."""
        child = self._holder.get("child")
        return child.proc.pid if child is not None and child.alive() else None

    @property
    def airflow_version(self) -> str | None:
        child = self._holder.get("child")
        return child.airflow if child is not None else None

    def _tmp(self) -> Path:
        tmp = self._holder.get("tmp")
        if tmp is None:
            tmp = self._holder["tmp"] = tempfile.mkdtemp(prefix=_TMP_PREFIX)
        return Path(tmp)

    def _environment(self, tmp: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET")}
        if "AIRFLOW_CONFIG" in env and not os.path.isfile(env["AIRFLOW_CONFIG"]):
            del env["AIRFLOW_CONFIG"]  # Airflow would write a default config there
        home = tmp / "airflow-home"
        home.mkdir(exist_ok=True)
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # DagBag needs no database; this keeps any connection attempt inside the temp dir
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp / 'airflow.db'}",
            "PYTHONDONTWRITEBYTECODE": env.get("PYTHONDONTWRITEBYTECODE", "1"),
        })
        env.update(self.env)
        env[_TMP_ENV] = str(tmp)
        return child_env(env)

    def _spawn(self) -> _Child:
        tmp = self._tmp()
        log = open(tmp / "parser.log", "ab")  # noqa: SIM115 - kept open with the child
        root = str(Path(__file__).resolve().parent.parent)
        try:
            proc = subprocess.Popen([self.python, "-c", _BOOT.format(root=root)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, env=self._environment(tmp), cwd=tmp)
        except OSError as exc:
            log.close()
            raise ParseError(f"cannot start the parser process ({self.python}): {exc}") from exc
        assert proc.stdout is not None
        lines = _Lines(proc.stdout.fileno())
        child = _Child(proc=proc, lines=lines, log=log, airflow="")
        self.starts += 1
        try:
            doc = lines.read(time.monotonic() + STARTUP_TIMEOUT)
        except TimeoutError:
            _kill(child)
            raise ParseError(f"the parser process did not start within {STARTUP_TIMEOUT:g}s{self._tail()}") from None
        if doc is None or doc.get("type") != "ready":
            _kill(child)
            if doc is not None and doc.get("type") == "fatal":
                raise ParseError(f"Airflow failed to import in the parser process ({self.python}):\n{doc.get('message', '')}")
            raise ParseError(f"the parser process exited while starting (status {proc.returncode}){self._tail()}")
        child.airflow = str(doc.get("airflow", ""))
        return child

    def _tail(self) -> str:
        tmp = self._holder.get("tmp")
        if not tmp:
            return ""
        try:
            with open(Path(tmp) / "parser.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - MESSAGE_LIMIT))
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its last output:\n{text}" if text else ""

    # parsing

    def parse(self, folder: Path, *, previous: ParseResult | None = None, changed: set[str] | None = None,
              timeout: float | None = None) -> ParseResult:
        """Whole parse unless both `previous` and `changed` (paths relative to `folder`) are given;
        then only changed or added files and the importers of changed modules are parsed."""
        started = time.perf_counter()
        folder = Path(folder).absolute()
        if not folder.is_dir():
            raise ParseError(f"{folder} is not a directory")
        scan: threading.Thread | None = None
        if previous is not None and changed is not None:
            edits = {_normalize(folder, c) for c in changed}
            before = previous.modules
            graph = import_graph(folder, before, edits)
            touched = edits | (before.keys() ^ graph.keys())
            select_: list[str] | None = sorted(edits | importers_of(graph, touched))
            known = sorted(previous.files)
        else:  # the import graph (for the next parses) is built while the child parses
            graph, select_, known = {}, None, []
            scan = threading.Thread(target=lambda: graph.update(import_graph(folder)), name="dagcast-parse-scan",
                                    daemon=True)
            scan.start()
        request = {
            "op": "parse", "folder": str(folder), "select": select_, "known": known,
            "safe_mode": self.safe_mode, "file_timeout": self.file_timeout, "workers": self.workers,
            "timeout": timeout or self.timeout, "bundle_name": self.bundle_name, "serialize": self.serialize,
            "immutable": self.immutable, "nice": self.nice,
        }
        try:
            with self._lock:
                listed, fresh = self._exchange(request)
        finally:
            if scan is not None:
                scan.join()
        files: dict[str, FileResult] = {}
        for rel in sorted(listed):
            if rel in fresh:
                files[rel] = fresh[rel]
            elif previous is not None and rel in previous.files:
                files[rel] = previous.files[rel]
            else:
                raise ParseError(f"the parser process returned no result for {rel}")
        return ParseResult(
            folder=str(folder), files=files, duplicates=duplicates_of(files), parsed=len(fresh),
            reused=len(files) - len(fresh), seconds=round(time.perf_counter() - started, 4),
            parsed_files=sorted(fresh), modules=graph,
        )

    def _exchange(self, request: dict[str, Any]) -> tuple[list[str], dict[str, FileResult]]:
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        deadline_after = float(request["timeout"]) + GRACE
        for attempt in (1, 2):
            self.start()
            child: _Child = self._holder["child"]
            assert child.proc.stdin is not None
            in_sync = False  # the child is between requests: it can serve the next one
            try:
                try:
                    child.proc.stdin.write(line)
                    child.proc.stdin.flush()
                except OSError:
                    if attempt == 1:  # died since the last parse: nothing ran, start again
                        continue
                    raise ParseError(f"the parser process died (status {child.proc.poll()}){self._tail()}") from None
                deadline = time.monotonic() + deadline_after
                doc = self._read(child, deadline, f"answer within {deadline_after:g}s")
                if doc is None:
                    if attempt == 1:
                        continue
                    raise ParseError(f"the parser process died (status {child.proc.wait()}){self._tail()}")
                if doc.get("type") == "error":
                    in_sync = True
                    raise ParseError(str(doc.get("message")))
                listed: list[str] = doc["files"]
                fresh: dict[str, FileResult] = {}
                while True:
                    doc = self._read(child, deadline, f"finish parsing {request['folder']} within {deadline_after:g}s "
                                                      f"({len(fresh)} files done)")
                    if doc is None:
                        raise ParseError(f"the parser process died during the parse (status {child.proc.wait()})"
                                         f"{self._tail()}")
                    kind = doc.pop("type", None)
                    if kind == "file":
                        result = FileResult.model_validate(doc)
                        fresh[result.path] = result
                    elif kind in ("done", "error"):
                        in_sync = True
                        if kind == "error":
                            raise ParseError(str(doc.get("message")))
                        return listed, fresh
            except (ValueError, KeyError) as exc:  # not our protocol
                raise ParseError(f"the parser process sent an unreadable answer: {exc}") from exc
            finally:
                if not in_sync:  # mid-answer (or dead): a new child for the next parse
                    _kill(child)
        raise AssertionError("unreachable")

    def _read(self, child: _Child, deadline: float, what: str) -> dict[str, Any] | None:
        try:
            return child.lines.read(deadline)
        except TimeoutError:
            raise ParseError(f"the parser process did not {what}; it was killed") from None


def _kill(child: _Child) -> None:
    with contextlib.suppress(OSError):
        child.proc.kill()
    child.proc.wait()


def parse_folder_once(folder: Path, **kw: Any) -> ParseResult:
    """Parse `folder` with a Parser used once (the CLI). Keywords: Parser's and parse()'s."""
    parse_kw = {k: kw.pop(k) for k in ("previous", "changed", "timeout") if k in kw}
    with Parser(**kw) as parser:
        return parser.parse(folder, **parse_kw)


# --- the warm child (runs in the Airflow interpreter) -------------------------------------------------


_libc: list[Any] = []  # loaded once in the warm child (find_library runs ldconfig), inherited by forks


def _load_libc() -> Any:
    if not _libc:
        try:
            _libc.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except OSError:
            _libc.append(None)
    return _libc[0]


def _set_pdeathsig(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = _load_libc()
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = _os_write(fd, view)
        view = view[n:]


def _doc_line(doc: dict[str, Any]) -> bytes:
    return (_encode(doc) + "\n").encode()


def _serve() -> None:
    """The warm child's main: import Airflow, then one parse per request line on stdin."""
    die_with_parent()
    tmp = os.environ.pop(_TMP_ENV, "")
    parent = os.getppid()

    def orphaned(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """Our parent died (the death signal, or our stdin's end): its temp dir is ours to remove."""
        if tmp and os.path.basename(tmp).startswith(_TMP_PREFIX) and os.getppid() != parent:
            shutil.rmtree(tmp, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, orphaned)
    proto = os.dup(1)
    os.dup2(2, 1)  # whatever prints to stdout (Airflow's logging, DAG files) goes to the log

    def send(doc: dict[str, Any]) -> None:
        _write_all(proto, _doc_line(doc))

    try:
        warm = _Warm(proto, tmp or None)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises ParseError
        send({"type": "fatal", "message": traceback.format_exc()[-MESSAGE_LIMIT:]})
        os._exit(1)
    send({"type": "ready", "airflow": warm.version, "pid": os.getpid()})
    for raw in sys.stdin.buffer:
        request = json.loads(raw)
        if request.get("op") == "exit":
            break
        try:
            warm.parse(request, send)
        except Exception as exc:  # noqa: BLE001 - the warm child stays up; this parse fails
            traceback.print_exc()  # the whole story to the sidecar's log; one line to the deployer
            send({"type": "error", "message": f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]})
    if os.getppid() != parent:
        orphaned()
    os._exit(0)


@dataclasses.dataclass
class _Worker:
    pid: int
    cmd: int  # warm -> worker: file paths, one JSON line each
    res: int  # worker -> warm: results
    lines: _Lines
    current: str | None = None
    since: float = 0.0


DEFAULT_HEURISTIC = "airflow.utils.file.might_contain_dag_via_default_heuristic"
HEURISTIC_KEPT = 200_000  # files whose answer the warm child remembers


def _remember_dag_heuristic(conf: Any, immutable: Callable[[], bool]) -> None:
    """In the warm child: Airflow's listing (`[core] dag_discovery_safe_mode`) reads every .py file of the
    folder for the words "dag" and "airflow", on every parse, and each version is a new folder. Its
    unchanged files are hard links of the same immutable files, so the answer of Airflow's default
    heuristic (a function of the bytes alone) is remembered by the file's identity (device, inode, size,
    mtime): an incremental parse of 10,000 files reads only what changed. A `might_contain_dag_callable`
    of the user's own is left alone (it may look at more than the bytes). Only for folders that are
    never written in place (`Parser(immutable=True)`: the sidecar's version folders; `immutable()`
    says whether the request being served lists one); any other folder may be edited between two
    parses within one tick of the file system's clock."""
    from airflow.utils import file as airflow_file

    if conf.get("core", "might_contain_dag_callable", fallback=DEFAULT_HEURISTIC) != DEFAULT_HEURISTIC:
        return
    original = airflow_file.might_contain_dag
    known: dict[tuple[int, int, int, int], bool] = {}

    def might_contain_dag(file_path: str, safe_mode: bool, zip_file: Any = None) -> bool:
        if not safe_mode or zip_file is not None or not immutable():
            return bool(original(file_path, safe_mode, zip_file))
        try:
            st = os.stat(file_path)
        except OSError:
            return bool(original(file_path, safe_mode))
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        answer = known.get(key)
        if answer is None:
            answer = bool(original(file_path, safe_mode))
            if len(known) >= HEURISTIC_KEPT:
                known.clear()
            known[key] = answer
        return answer

    airflow_file.might_contain_dag = might_contain_dag  # what find_dag_file_paths calls, by its module's name


class _Warm:
    """State of the warm child: Airflow imported, modules pre-imported, forks on request."""

    def __init__(self, proto: int, workdir: str | None) -> None:
        import gc

        import airflow
        from airflow.configuration import conf
        from airflow.dag_processing.dagbag import DagBag  # noqa: F401 - imported once, here
        from airflow.dag_processing.importers import python_importer  # noqa: F401
        from airflow.sdk import DAG  # noqa: F401
        from airflow.serialization.serialized_objects import DagSerialization  # noqa: F401
        from airflow.utils.file import list_py_file_paths

        if sys.platform.startswith("linux"):
            _load_libc()
        self.proto = proto
        self.version = str(getattr(airflow, "__version__", ""))
        self.conf: Any = conf
        self.list_files: Callable[..., list[str]] = list_py_file_paths
        self.immutable = False  # the request being served lists a folder of immutable files
        _remember_dag_heuristic(conf, lambda: self.immutable)
        self.tried: set[str] = set()
        self.gc: Any = gc
        self._warm_up(workdir)
        gc.freeze()

    def _warm_up(self, workdir: str | None) -> None:
        """Parse one trivial DAG of our own here, so that what Airflow sets up lazily on first use
        (importer registry, policy and listener plugins, the serialisation schema) is done once,
        before any fork, instead of in every worker."""
        with tempfile.TemporaryDirectory(prefix="warm-up-", dir=workdir) as folder:
            Path(folder, "warm_up.py").write_text(_WARM_UP_DAG)
            settings = {"folder": folder, "safe_mode": False, "file_timeout": None, "bundle_name": None,
                        "serialize": True}
            with contextlib.suppress(Exception):
                _parse_one(folder, "warm_up.py", settings, [])
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)  # Airflow's Python handler would spin on a fault

    def preimport(self, folder: str, targets: Iterable[str]) -> None:
        """Import the Airflow modules the files import at top level, here, so that every fork starts
        with them (as the DAG processor does, `[dag_processor] parsing_pre_import_modules`)."""
        if not self.conf.getboolean("dag_processor", "parsing_pre_import_modules", fallback=True):
            return
        names: set[tuple[str, str]] = set()
        for rel in targets:
            with contextlib.suppress(OSError), open(os.path.join(folder, rel), "rb") as f:
                for module, attrs in _AIRFLOW_IMPORT.findall(f.read()):
                    names.add((module.decode(), ""))
                    names.update((module.decode(), a.strip().decode()) for a in attrs.split(b",") if a.strip())
        fresh = sorted(n for n in names if ".".join(n) not in self.tried)
        if not fresh:
            return
        import warnings

        for module, attr in fresh:  # `attr` too: Airflow's deprecated paths import their target lazily
            self.tried.add(".".join((module, attr)))
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if module in sys.modules or importlib.util.find_spec(module) is not None:
                    loaded = importlib.import_module(module)
                    if attr:
                        getattr(loaded, attr, None)
        self.gc.freeze()

    def parse(self, request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        folder = str(request["folder"])
        if not os.path.isdir(folder):
            send({"type": "error", "message": f"{folder} is not a directory"})
            return
        with contextlib.suppress(OSError):
            if os.lseek(2, 0, os.SEEK_END) > 8 * 2**20:  # keep the log bounded
                os.ftruncate(2, 0)
        safe_mode = request.get("safe_mode")
        if safe_mode is None:
            safe_mode = self.conf.getboolean("core", "dag_discovery_safe_mode", fallback=True)
        file_timeout = request.get("file_timeout")
        timeout_value = float(file_timeout) if file_timeout is not None else \
            self.conf.getfloat("core", "dagbag_import_timeout", fallback=30.0)
        self.immutable = bool(request.get("immutable"))
        listed = [Path(p).relative_to(folder).as_posix() for p in self.list_files(folder, safe_mode=safe_mode)]
        select_ = request.get("select")
        if select_ is None:
            targets = listed
        else:
            wanted, known = set(select_), set(request.get("known") or ())
            targets = [rel for rel in listed if rel in wanted or rel not in known]
        send({"type": "listed", "files": listed, "targets": len(targets)})
        if targets:
            self.preimport(folder, targets)
            settings = {"folder": folder, "safe_mode": bool(safe_mode), "file_timeout": file_timeout,
                        "bundle_name": request.get("bundle_name"), "serialize": bool(request.get("serialize", True)),
                        "nice": int(request.get("nice") or 0) if len(targets) >= NICE_FROM_FILES else 0}
            hard = timeout_value * 1.5 + 2 if timeout_value > 0 else None
            failure = _Run(self, settings, targets, int(request.get("workers") or 1), hard,
                           float(request.get("timeout") or DEFAULT_TIMEOUT), send).run()
            if failure:
                send({"type": "error", "message": failure})
                return
        send({"type": "done"})


class _Run:
    """One parse in the warm child: workers forked on demand, fed one file at a time."""

    def __init__(self, warm: _Warm, settings: dict[str, Any], targets: list[str], workers: int,
                 hard: float | None, timeout: float, send: Callable[[dict[str, Any]], None]) -> None:
        self.warm = warm
        self.settings = settings
        self.queue = collections.deque(targets)
        self.workers = max(1, min(workers, len(targets)))
        self.hard = hard
        self.timeout = timeout
        self.send = send
        self.running: dict[int, _Worker] = {}  # by result fd

    def run(self) -> str | None:
        """Parse every target; a message when the whole parse fails (deadline)."""
        deadline = time.monotonic() + self.timeout
        try:
            for _ in range(self.workers):
                self._feed(self._spawn())
            next_check = time.monotonic() + 0.25
            while self.running:
                now = time.monotonic()
                if now >= deadline:
                    unfinished = [w.current for w in self.running.values() if w.current] + list(self.queue)
                    shown = ", ".join(unfinished[:5]) + (f" (+{len(unfinished) - 5} more)" if len(unfinished) > 5 else "")
                    return (f"parsing {self.settings['folder']} did not finish within {self.timeout:g}s; "
                            f"{len(unfinished)} files unfinished: {shown}")
                wait = min(deadline, next_check) - now
                if self.hard is not None:
                    for w in self.running.values():
                        if w.current is not None:
                            wait = min(wait, w.since + self.hard - now)
                ready, _, _ = select.select(list(self.running), [], [], max(0.0, wait))
                for fd in ready:
                    if (ready_worker := self.running.get(fd)) is not None:  # (not reaped since, nor its fd reused)
                        self._readable(ready_worker)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + 0.25
                    for w in list(self.running.values()):
                        self._check_exited(w)
                if self.hard is not None:
                    for w in list(self.running.values()):
                        if w.current is not None and now - w.since >= self.hard:
                            self._fail(w, "ParseTimeout", f"parsing {w.current} took longer than {self.hard:g}s "
                                       "(the DagBag import timeout did not stop it); its process was killed")
            return None
        finally:
            for w in list(self.running.values()):
                self._reap(w)

    def _spawn(self) -> _Worker:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        warm_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.close(cmd_w)
                os.close(res_r)
                os.close(self.warm.proto)
                for w in self.running.values():
                    os.close(w.cmd)
                    os.close(w.res)
                if self.settings.get("nice"):
                    with contextlib.suppress(OSError):
                        os.nice(int(self.settings["nice"]))
                _worker(cmd_r, res_w, warm_pid, self.settings)
            except BaseException:  # noqa: BLE001 - the warm child sees the worker die
                code = 70
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the worker: its DAG files' children go with it
        os.close(cmd_r)
        os.close(res_w)
        os.set_blocking(res_r, False)
        worker = _Worker(pid=pid, cmd=cmd_w, res=res_r, lines=_Lines(res_r))
        self.running[res_r] = worker
        return worker

    def _feed(self, w: _Worker) -> None:
        if self.queue:
            w.current = self.queue.popleft()
            w.since = time.monotonic()
            with contextlib.suppress(OSError):  # if it died, that shows at its end of file
                _write_all(w.cmd, _encode(w.current).encode() + b"\n")
        else:
            w.current = None
            with contextlib.suppress(OSError):
                os.close(w.cmd)
            w.cmd = -1

    def _readable(self, w: _Worker) -> None:
        try:
            more = w.lines.feed()
        except OSError:
            more = False
        self._take(w)
        if not more:
            self._died(w)

    def _take(self, w: _Worker) -> None:
        while w.res >= 0:
            try:
                doc = w.lines.take()
            except ValueError:  # not our JSON: something in the file wrote to the result pipe
                self._fail(w, "ParseProcessDied", f"the process parsing {w.current} sent an unreadable result")
                return
            if doc is None:
                return
            if isinstance(doc, dict) and doc.get("path") == w.current:
                self.send({"type": "file", **doc})
                self._feed(w)

    def _check_exited(self, w: _Worker) -> None:
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = w.pid, 0
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(w.pid, signal.SIGKILL)  # what its DAG files started
            w.pid = -w.pid  # reaped: no second wait
            while w.res >= 0 and w.res in select.select([w.res], [], [], 0)[0]:  # what it wrote before it went
                if not w.lines.feed():
                    break
                self._take(w)
            self._died(w, status)

    def _died(self, w: _Worker, status: int | None = None) -> None:
        current = w.current
        status = self._reap(w, status)
        if current is not None:
            if os.WIFSIGNALED(status):
                how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            else:
                how = f"exited with status {os.waitstatus_to_exitcode(status)}"
            self.send({"type": "file", **_failed(current, "ParseProcessDied",
                                                   f"the process parsing {current} {how}", 0.0)})
            if self.queue:
                self._feed(self._spawn())

    def _fail(self, w: _Worker, kind: str, message: str) -> None:
        current = w.current
        seconds = time.monotonic() - w.since
        self._reap(w)
        if current is not None:
            self.send({"type": "file", **_failed(current, kind, message, seconds)})
        if self.queue:
            self._feed(self._spawn())

    def _reap(self, w: _Worker, status: int | None = None) -> int:
        self.running.pop(w.res, None)
        for fd in (w.cmd, w.res):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        w.cmd = w.res = -1
        w.current = None
        if w.pid > 0:
            for kill in (os.killpg, os.kill):  # its group (what its DAG files started) and itself
                with contextlib.suppress(OSError):
                    kill(w.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                status = os.waitpid(w.pid, 0)[1]
            w.pid = -w.pid
        return status or 0


_WARM_UP_DAG = """
from datetime import datetime

from airflow.sdk import DAG

try:
    from airflow.providers.standard.operators.empty import EmptyOperator
except ImportError:
    EmptyOperator = None

with DAG("dagcast_warm_up", start_date=datetime(2024, 1, 1), schedule=None, catchup=False) as dag:
    if EmptyOperator is not None:
        EmptyOperator(task_id="a") >> EmptyOperator(task_id="b")
"""


def _failed(rel: str, kind: str, message: str, seconds: float) -> dict[str, Any]:
    return {"path": rel, "dag_ids": [], "seconds": round(seconds, 4),
            "error": {"path": rel, "line": None, "type": kind, "message": message[:MESSAGE_LIMIT], "frames": []}}


# --- the worker (a fork of the warm child; runs DAG files) ------------------------------------------


class _Capture:
    """A logger stand-in that records the exception being handled when Airflow logs it."""

    def __init__(self, inner: Any, sink: list[tuple[type[BaseException], BaseException, TracebackType | None]]) -> None:
        self._inner = inner
        self._sink = sink

    def exception(self, *args: Any, **kw: Any) -> Any:
        self._record()
        return self._inner.exception(*args, **kw)

    def error(self, *args: Any, **kw: Any) -> Any:
        if kw.get("exc_info"):
            self._record()
        return self._inner.error(*args, **kw)

    def _record(self) -> None:
        typ, value, tb = sys.exc_info()
        if typ is not None and value is not None:
            self._sink.append((typ, value, tb))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Signals:
    """`signal` as seen by Airflow's importer in a worker: everything but a SIGSEGV handler."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def signal(self, signum: int, handler: Any) -> Any:
        if signum == signal.SIGSEGV:
            return signal.getsignal(signum)
        return signal.signal(signum, handler)


def _worker(cmd_fd: int, res_fd: int, warm_pid: int, settings: dict[str, Any]) -> None:
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != warm_pid:
        os._exit(0)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the warm child's handler
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "client"  # as the DAG processor's parsing child

    from airflow import settings as airflow_settings
    from airflow.dag_processing.importers import python_importer

    folder = settings["folder"]
    if folder not in sys.path:  # as BundleDagBag does
        sys.path.append(folder)
    if settings["file_timeout"] is not None:
        value = float(settings["file_timeout"])
        airflow_settings.get_dagbag_import_timeout = lambda dag_file_path: value
    captured: list[tuple[type[BaseException], BaseException, TracebackType | None]] = []
    setattr(python_importer, "log", _Capture(python_importer.log, captured))  # noqa: B010 - not a Logger
    # Airflow sets a Python SIGSEGV handler around each import; on a real segfault the faulting
    # instruction runs again and again (the handler never gets to run): the process spins until
    # killed. Keep the C-level default instead (faulthandler logs the Python stack), so the
    # process dies at once and the file gets its error.
    setattr(python_importer, "signal", _Signals())  # noqa: B010
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)  # the warm-up parse set Airflow's
    faulthandler.enable()

    with os.fdopen(cmd_fd, "rb") as commands:
        for raw in commands:
            rel = _decode(raw.decode())
            captured.clear()
            doc = _parse_one(folder, rel, settings, captured)
            _write_all(res_fd, _doc_line(doc))


def _parse_one(folder: str, rel: str, settings: dict[str, Any],
               captured: list[tuple[type[BaseException], BaseException, TracebackType | None]]) -> dict[str, Any]:
    """One file, the way the DAG processor's parsing child does it; what it defines or why not."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    path = os.path.join(folder, rel)
    modules_before = set(sys.modules)
    path_before = list(sys.path)
    started = time.perf_counter()
    dag_ids: list[str] = []
    error: dict[str, Any] | None = None
    try:
        stability = _stability_error(path, folder)
        if stability is not None:
            error = {"path": rel, "line": None, "type": "DagStabilityError", "message": stability[:MESSAGE_LIMIT],
                     "frames": []}
        else:
            bag: Any = DagBag(dag_folder=path, bundle_path=Path(folder), bundle_name=settings["bundle_name"],
                              load_op_links=False, collect_dags=False)
            bag._log = _Capture(bag.log, captured)
            bag.process_file(path, only_if_updated=False, safe_mode=settings["safe_mode"])
            for dag_id, dag in list(bag.dags.items()):
                try:
                    if settings["serialize"]:
                        DagSerialization.to_dict(dag)
                except Exception as exc:  # noqa: BLE001 - an import error, as in the DAG processor
                    captured.append((type(exc), exc, exc.__traceback__))
                    bag.import_errors[dag.relative_fileloc or rel] = f"{type(exc).__name__}: {exc}"
                    continue
                dag_ids.append(str(dag_id))
            if bag.import_errors:
                text = next(iter(bag.import_errors.values()))
                error = _failure(folder, path, rel, str(text), captured[-1] if captured else None)
    except BaseException as exc:  # noqa: BLE001 - whatever escapes Airflow is this file's error
        error = _failure(folder, path, rel, "", (type(exc), exc, exc.__traceback__))
    finally:
        sys.path[:] = path_before
        prefix = os.path.join(folder, "")
        for name in set(sys.modules) - modules_before:  # the folder's modules: fresh for the next file
            module_file = getattr(sys.modules.get(name), "__file__", None) or ""
            if module_file.startswith(prefix) or name.startswith("unusual_prefix_"):
                sys.modules.pop(name, None)
    return {"path": rel, "dag_ids": sorted(dag_ids), "error": error,
            "seconds": round(time.perf_counter() - started, 4)}


def _stability_error(path: str, folder: str) -> str | None:
    """The DAG processor's pre-parse check, when `[dag_processor] dag_version_inflation_check_level`
    is `error` (its errors keep the file from loading)."""
    from airflow.configuration import conf

    if conf.get("dag_processor", "dag_version_inflation_check_level", fallback="warning") != "error":
        return None
    from airflow.utils.dag_version_inflation_checker import check_dag_file_stability

    check: Any = check_dag_file_stability(path)
    errors = check.get_error_format_dict(path, Path(folder))
    return "\n".join(str(v) for v in errors.values()) if errors else None


def _relative(folder: str, filename: str) -> str:
    for root in {folder, os.path.realpath(folder)}:
        prefix = os.path.join(root, "")
        if filename.startswith(prefix):
            return filename[len(prefix):].replace(os.sep, "/")
    return filename


def _failure(folder: str, path: str, rel: str, text: str,
             exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None) -> dict[str, Any]:
    """ImportFailure fields from the exception Airflow caught, or from the text it recorded."""
    if exc_info is None:
        kind, message = _from_text(text)
        return {"path": rel, "line": None, "type": kind, "message": message[:MESSAGE_LIMIT], "frames": []}
    typ, value, tb = exc_info
    try:
        message = str(value)
    except Exception:  # noqa: BLE001 - a broken __str__
        message = repr(value)
    summary = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(tb)
               if not f.filename.startswith("<frozen importlib")]
    if isinstance(value, SyntaxError) and value.filename:  # where the compiler stopped: no frame of its own
        summary.append((value.filename, value.lineno, "<module>"))
    inside = [i for i, (filename, _, _) in enumerate(summary) if _relative(folder, filename) != filename]
    if inside:  # from the folder's first frame on: not Airflow's importer around it
        summary = summary[inside[0]:]
    line = next((lineno for filename, lineno, _ in reversed(summary) if filename == path), None)
    frames = [f"{_relative(folder, filename)}:{lineno} in {name}" for filename, lineno, name in summary]
    return {"path": rel, "line": line, "type": typ.__name__, "message": message[:MESSAGE_LIMIT],
            "frames": frames[-FRAME_LIMIT:]}


def _from_text(text: str) -> tuple[str, str]:
    """(type, message) of an import error Airflow recorded as text: "Type: message" or a traceback."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("Traceback"):
        tail = [i for i, line in enumerate(lines) if line.startswith(" ")]
        lines = lines[tail[-1] + 1:] if tail else lines[-1:]
    body = "\n".join(lines)
    head, sep, rest = body.partition(": ")
    if sep and head and " " not in head:
        return head.rsplit(".", 1)[-1], rest
    return "ImportError", body
