"""Compiling a bundle's Python in worker processes: bounded in memory and CPU, and in parallel.

Two jobs, one mechanism:

* **Bounds.** `compile()` of hostile Python can take seconds of CPU and gigabytes of memory
  from a few megabytes of source (nine MiB of `x=1` lines: 15 s and 3.7 GiB here), and it cannot
  be interrupted from Python. Every file large enough for that (``SUSPECT_BYTES`` and up) is
  compiled alone in a worker whose address space is limited (``RLIMIT_AS``) and whose CPU time
  for that file is limited (``RLIMIT_CPU``): the file then fails with a ``python_too_complex``
  issue naming it (a MemoryError in the worker, or the worker killed by the kernel at its CPU
  limit), and the process that scans the bundle never holds more than the file's bytes.
* **Parallelism.** Compiling is the largest cost of validation (about 11 MB/s per core), and a
  first deploy of a large folder is nearly all new files: past a first MiB compiled inline, the
  bytes of new `.py` files go to the workers in batches.

The scan itself stays in one process (it reads the archive once, in order); results come back
by member index, so the report is the same as compiling inline. A session has a deadline: when
the workers have not answered by then they are killed (``CompileDeadline``).

Workers are plain child interpreters (`python -c ...compile_workers.main`) fed through
their stdin and stdout: AWS Lambda has no /dev/shm, so `multiprocessing.Pool`, `Queue` and
`ProcessPoolExecutor` do not work there, and "spawn" would re-import whatever module is
`__main__` (the Lambda runtime, a CLI). They are kept for the next bundle, as a warm function
keeps its globals.
"""
from __future__ import annotations

import marshal
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

Batch = list[tuple[int, str, bytes]]  # (member index, path, source)
Result = tuple[int, dict[str, Any] | None, list[str]]  # (member index, issue as a dict or None, DAG ids)

BATCH_BYTES = 1 << 20  # source bytes per message to a worker
IN_FLIGHT = 2  # batches queued per worker before the scan waits for results
SUSPECT_BYTES = 256 * 1024  # a .py file this large is compiled alone, in a bounded worker
TOO_COMPLEX = "python_too_complex"
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class Bounds:
    """What one worker may use: address space beyond what it holds at start, CPU seconds per suspect file."""

    memory_mb: int = 1024
    cpu_seconds: float = 10.0


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


def too_complex(path: str, why: str) -> dict[str, Any]:
    """The issue of a file that the bounds stopped (as a dict, like every worker result)."""
    return {"code": TOO_COMPLEX, "path": path, "line": None, "message": f"{path}: too complex to compile: {why}"}


def _address_space_mb() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(memory_mb: int) -> None:
    import resource

    limit = (_address_space_mb() + memory_mb) << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _limit_cpu(seconds: float) -> None:
    """Let the kernel stop this process (SIGXCPU) once it used `seconds` more CPU than now."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _serve(inp: IO[bytes], out: IO[bytes], bounds: Bounds) -> None:
    """A worker: compile batches until its stdin closes. A batch of one file is a suspect: it gets
    the CPU bound; every file gets the memory bound, and a MemoryError becomes its issue."""
    from chalicelib.bundle.python import _check_python

    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the kernel's stop at the CPU limit ends the process
    _limit_memory(bounds.memory_mb)
    while True:
        try:
            batch: Batch = _read(inp)
        except EOFError:
            return
        results: list[Result] = []
        for index, path, source in batch:
            if len(batch) == 1:
                _limit_cpu(bounds.cpu_seconds)
            try:
                issue, dag_ids = _check_python(source, path)
                found = issue.model_dump() if issue else None
            except MemoryError:
                found, dag_ids = too_complex(path, "out of memory"), []
            if found is not None and found["code"] == TOO_COMPLEX:
                found = too_complex(path, f"it needs more than {bounds.memory_mb} MiB of memory")
            results.append((index, found, dag_ids))
        del batch
        _write(out, results)


# A worker's entry: `-c` rather than `-m`, since the package's __init__ imports this module first
# (runpy would then run a second copy of it as __main__).
_ENTRY = "import sys; from chalicelib.bundle.compile_workers import main; main(sys.argv[1:])"


def main(argv: list[str]) -> None:
    """A worker process: serve compile batches on stdin/stdout under the bounds given as arguments."""
    _serve(sys.stdin.buffer, sys.stdout.buffer, Bounds(int(argv[0]), float(argv[1])))


class _Worker:
    def __init__(self, bounds: Bounds) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where chalicelib is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, str(bounds.memory_mb), repr(bounds.cpu_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self.in_flight: deque[Batch] = deque()
        self.spent = False  # it hit a bound: replaced after this bundle
        # Results are read as they come: a worker blocked writing a large result while this process
        # is blocked writing it the next batch would otherwise wait on each other for ever.
        self._results: queue.Queue[list[Result] | None] = queue.Queue()
        threading.Thread(target=self._drain, name="compile-results", daemon=True).start()

    @property
    def pending(self) -> int:
        return len(self.in_flight)

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
        self.in_flight.append(batch)

    def receive(self, deadline: float | None) -> list[Result] | None:
        """The next batch's results; None when the worker died with batches in flight."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            results = self._results.get(timeout=timeout)
        except queue.Empty:
            raise CompileDeadline("the compile workers did not finish in time") from None
        if results is None:
            self._results.put(None)  # every later receive sees the same
            return None
        self.in_flight.popleft()
        return results

    def exit_reason(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "its worker stopped answering"
        if code == -signal.SIGXCPU:
            return "it took more CPU time than allowed"
        if code == -signal.SIGKILL:
            return "its worker was killed (out of memory?)"
        return f"its worker exited with {code}"

    def stop(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.stop()


class CompileWorkers:
    """A fixed set of bounded worker processes; one bundle at a time (see `session`)."""

    def __init__(self, workers: int | None = None, bounds: Bounds | None = None) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.size = workers or max(1, cpus)
        self.bounds = bounds or Bounds()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers (if not running); they import the validator while the caller goes on."""
        self._workers = [w for w in self._workers if w.alive() and not w.spent]
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.bounds))

    def session(self, deadline: float | None = None, wait: bool = False) -> CompileSession | None:
        """A session for one bundle. Without `wait`, None while another bundle has the workers; with
        it, wait for them until `deadline` (CompileDeadline when they are still busy then)."""
        if wait:
            timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._lock.acquire(timeout=timeout):
                raise CompileDeadline("the compile workers were busy with another bundle until the deadline")
        elif not self._lock.acquire(blocking=False):
            return None
        try:
            self.start()
        except BaseException:
            self._lock.release()
            raise
        return CompileSession(self, deadline)

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def kill(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []


class CompileSession:
    """Sources of one bundle out, results back; `results()` once every source was submitted.

    After a file came back too complex, nothing more is sent (the bundle is rejected anyway), and
    `results()` does not wait for what is still being compiled."""

    def __init__(self, pool: CompileWorkers, deadline: float | None) -> None:
        self._pool = pool  # its lock is held by this session until close()
        self._deadline = deadline
        self._open = True
        self._batch: Batch = []
        self._batch_bytes = 0
        self._next = 0
        self._done: list[Result] = []
        self.too_complex = False

    def submit(self, index: int, path: str, source: bytes) -> None:
        """Queue a file with others (the parallel compile of many small files)."""
        if self.too_complex:
            return
        self._batch.append((index, path, source))
        self._batch_bytes += len(source)
        if self._batch_bytes >= BATCH_BYTES:
            self._send()

    def submit_alone(self, index: int, path: str, source: bytes) -> None:
        """Send a suspect file in a batch of its own, so that a worker stopped by its bounds names it."""
        if self.too_complex:
            return
        self._send()
        self._batch, self._batch_bytes = [(index, path, source)], len(source)
        self._send()

    def _send(self) -> None:
        if not self._batch or self.too_complex:
            self._batch, self._batch_bytes = [], 0
            return
        workers = self._pool._workers
        worker = min(workers[self._next:] + workers[: self._next], key=lambda w: w.pending)
        self._next = (self._next + 1) % len(workers)
        while worker.pending >= IN_FLIGHT and not self.too_complex:
            self._collect(worker)
        if self.too_complex:
            self._batch, self._batch_bytes = [], 0
            return
        worker.send(self._batch)
        self._batch, self._batch_bytes = [], 0

    def _collect(self, worker: _Worker) -> None:
        results = worker.receive(self._deadline)
        if results is None:
            self._worker_died(worker)
            return
        for result in results:
            if result[1] is not None and result[1].get("code") == TOO_COMPLEX:
                self.too_complex = True
                worker.spent = True
        self._done.extend(results)

    def _worker_died(self, worker: _Worker) -> None:
        """A worker stopped with batches in flight: a suspect file it was compiling alone is too
        complex; any other death is the machine's problem (CompileWorkerError: retry the bundle)."""
        batch = worker.in_flight.popleft() if worker.in_flight else []
        worker.in_flight.clear()
        worker.spent = True
        if len(batch) != 1:
            raise CompileWorkerError(f"a compile worker stopped unexpectedly ({worker.exit_reason()})")
        index, path, _ = batch[0]
        self._done.append((index, too_complex(path, worker.exit_reason()), []))
        self.too_complex = True

    def results(self) -> list[Result]:
        """Every result, in member order, once all batches are back (or one was too complex); closes
        the session. CompileDeadline when the workers did not answer in time."""
        try:
            self._send()
            for worker in self._pool._workers:
                while worker.pending and not self.too_complex:
                    self._collect(worker)
            return sorted(self._done, key=lambda r: r[0])
        except CompileDeadline:
            self._pool.kill()
            raise
        finally:
            self.close()

    def close(self) -> None:
        """End the session; workers with results still on their way, or that hit a bound, are replaced."""
        if not self._open:
            return
        self._open = False
        for worker in list(self._pool._workers):
            if worker.pending or worker.spent:
                worker.kill()
                self._pool._workers.remove(worker)
        self._pool._lock.release()


class CompileWorkerError(RuntimeError):
    """A worker process died mid-bundle (killed, out of memory): the caller retries the bundle."""


class CompileDeadline(RuntimeError):
    """The bundle's Python was not compiled by its deadline: the caller rejects the bundle."""


