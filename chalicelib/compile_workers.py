"""Compiling a bundle's Python files in worker processes, for bundles with many files never seen before.

Compiling is the largest cost of validation (about 11 MB/s per core), and a first deploy of a
large folder is nearly all new files. The scan itself stays in one process (it reads the
archive once, in order); the bytes of new `.py` files go to workers in batches and their
results come back by member index, so the report is the same as compiling inline.

Workers are plain child interpreters (`python -m chalicelib.compile_workers`) fed through
their stdin and stdout: AWS Lambda has no /dev/shm, so `multiprocessing.Pool`, `Queue` and
`ProcessPoolExecutor` do not work there, and "spawn" would re-import whatever module is
`__main__` (the Lambda runtime, a CLI). They are kept for the next bundle, as a warm function
keeps its globals.
"""
from __future__ import annotations

import marshal
import os
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

Batch = list[tuple[int, str, bytes]]  # (member index, path, source)
Result = tuple[int, dict[str, Any] | None, list[str]]  # (member index, issue as a dict or None, DAG ids)

BATCH_BYTES = 1 << 20  # source bytes per message to a worker
IN_FLIGHT = 2  # batches queued per worker before the scan waits for results
_LEN = struct.Struct("<Q")


def _write(out: IO[bytes], obj: Any) -> None:
    blob = marshal.dumps(obj)
    out.write(_LEN.pack(len(blob)) + blob)
    out.flush()


def _read(inp: IO[bytes]) -> Any:
    head = inp.read(_LEN.size)
    if len(head) != _LEN.size:
        raise EOFError("the pipe closed")
    (size,) = _LEN.unpack(head)
    blob = inp.read(size)
    if len(blob) != size:
        raise EOFError("the pipe closed mid-message")
    return marshal.loads(blob)


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """A worker: compile batches until its stdin closes."""
    from chalicelib.validation import _check_python

    while True:
        try:
            batch: Batch = _read(inp)
        except EOFError:
            return
        results: list[Result] = []
        for index, path, source in batch:
            issue, dag_ids = _check_python(source, path)
            results.append((index, issue.model_dump() if issue else None, dag_ids))
        _write(out, results)


class _Worker:
    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # where chalicelib is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chalicelib.compile_workers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.pending = 0
        # Results are read as they come: a worker blocked writing a large result while this process
        # is blocked writing it the next batch would otherwise wait on each other for ever.
        self._results: queue.Queue[list[Result] | None] = queue.Queue()
        threading.Thread(target=self._drain, name="compile-results", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                self._results.put(_read(self.proc.stdout))
        except (EOFError, OSError, ValueError):
            self._results.put(None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, batch: Batch) -> None:
        assert self.proc.stdin is not None
        try:
            _write(self.proc.stdin, batch)
        except OSError as exc:
            raise CompileWorkerError(f"a compile worker stopped unexpectedly (exit {self.proc.poll()})") from exc
        self.pending += 1

    def receive(self) -> list[Result]:
        results = self._results.get()
        if results is None:
            self._results.put(None)  # every later receive fails the same way
            raise CompileWorkerError(f"a compile worker stopped unexpectedly (exit {self.proc.poll()})")
        self.pending -= 1
        return results

    def stop(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CompileWorkers:
    """A fixed set of worker processes; one bundle at a time (see `session`)."""

    def __init__(self, workers: int | None = None) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.size = workers or max(1, cpus)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers (if not running); they import the validator while the caller goes on."""
        self._workers = [w for w in self._workers if w.alive()]
        while len(self._workers) < self.size:
            self._workers.append(_Worker())

    def session(self) -> CompileSession | None:
        """A session for one bundle, or None while another bundle has the workers (compile inline then)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self.start()
        except BaseException:
            self._lock.release()
            raise
        return CompileSession(self)

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []


class CompileSession:
    """Batches of one bundle's sources out, results back; `results()` once every source was submitted."""

    def __init__(self, pool: CompileWorkers) -> None:
        self._pool = pool  # its lock is held by this session until close()
        self._open = True
        self._batch: Batch = []
        self._batch_bytes = 0
        self._next = 0
        self._done: list[Result] = []

    def submit(self, index: int, path: str, source: bytes) -> None:
        self._batch.append((index, path, source))
        self._batch_bytes += len(source)
        if self._batch_bytes >= BATCH_BYTES:
            self._send()

    def _send(self) -> None:
        if not self._batch:
            return
        workers = self._pool._workers
        worker = min(workers[self._next:] + workers[: self._next], key=lambda w: w.pending)
        self._next = (self._next + 1) % len(workers)
        while worker.pending >= IN_FLIGHT:
            self._done.extend(worker.receive())
        worker.send(self._batch)
        self._batch, self._batch_bytes = [], 0

    def results(self) -> list[Result]:
        """Every result, in member order, once all batches are back; closes the session."""
        try:
            self._send()
            for worker in self._pool._workers:
                while worker.pending:
                    self._done.extend(worker.receive())
            return sorted(self._done, key=lambda r: r[0])
        finally:
            self.close()

    def close(self) -> None:
        """End the session; workers with results still on their way are replaced next time."""
        if not self._open:
            return
        self._open = False
        if any(w.pending for w in self._pool._workers):
            self._pool.close()
        self._pool._lock.release()


class CompileWorkerError(RuntimeError):
    """A worker process died mid-bundle (killed, out of memory): the caller retries the bundle."""


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
