"""The inflate and deflate threads (chalicelib.bundle.threads): same bytes as one thread, errors where
the caller is, nothing left touching a stream once the call that used it returns, and none inherited
by a forked child."""

from __future__ import annotations

import gzip
import io
import multiprocessing
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from chalicelib.bundle import BundleError, Limits, validate_stream, write_bundle
from chalicelib.bundle import format as bundle_format
from chalicelib.bundle import scan as bundle_scan
from chalicelib.bundle.threads import worker


def many_batches(root: Path, files: int = 40, size: int = 200_000, noise: bool = False) -> list[str]:
    """Files of mixed, partly compressible bytes (random ones with `noise`): several 1 MiB batches,
    each slow enough to overlap."""
    rng = random.Random(7)
    names = []
    for i in range(files):
        rel = f"d{i % 5}/f{i:03}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if noise:
            path.write_bytes(rng.randbytes(size))
        else:
            words = b" ".join(rng.choice((b"select", b"from", b"where", b"%d" % rng.randrange(10**6)))
                              for _ in range(size // 6))
            path.write_bytes(words[:size])
        names.append(rel)
    return names


class _Inline:
    """A stand-in for the deflate thread that runs each batch at once, in the caller."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed back like the pool does
            done.set_exception(exc)
        return done


def drained(kind: str) -> None:
    """Wait until every task handed to the `kind` thread before now has run (it is FIFO)."""
    worker(kind).submit(lambda: None).result(timeout=60)


def test_a_bundle_written_through_the_deflate_thread_has_the_bytes_of_one_written_in_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = many_batches(tmp_path)
    threaded = io.BytesIO()
    info = write_bundle(tmp_path, names, threaded, compresslevel=1)
    monkeypatch.setattr(bundle_format, "worker", lambda kind: _Inline())
    inline = io.BytesIO()
    assert write_bundle(tmp_path, names, inline, compresslevel=1) == info
    assert threaded.getvalue() == inline.getvalue()
    assert info.size > 2 * 1024 * 1024 // 4 and len(gzip.decompress(threaded.getvalue())) > 6 * 1024 * 1024


class _Full(io.BytesIO):
    """An output that fails once `room` bytes are written, counting every write tried."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room, self.writes = room, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.tell() + len(data) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_an_output_that_fails_on_the_deflate_thread_fails_the_bundle_and_is_not_written_to_after(tmp_path: Path) -> None:
    names = many_batches(tmp_path)
    out = _Full(room=1024 * 1024)
    with pytest.raises(OSError, match="cannot write the bundle: No space left") as failed:
        write_bundle(tmp_path, names, out, compresslevel=1)
    assert not isinstance(failed.value, BundleError)  # not blamed on a file of the folder
    tried = out.writes
    drained("deflate")  # a batch still in flight would write now
    assert out.writes == tried


def test_a_scan_that_stops_early_returns_with_no_step_of_it_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = many_batches(tmp_path)  # compresses: each step is a full chunk, and the next is read ahead
    (tmp_path / "zz.txt").write_bytes(b"select 1;\n" * 40_000)  # last in path order, over the limit below
    out = io.BytesIO()
    write_bundle(tmp_path, [*names, "zz.txt"], out, compresslevel=1)
    steps = {"started": 0, "finished": 0}
    inflate = bundle_scan._Inflater._inflate

    def slow_off_thread(self: Any) -> bytes:
        if threading.current_thread() is threading.main_thread():
            return inflate(self)
        steps["started"] += 1
        threading.Event().wait(0.2)  # a slow step (a busy machine, a slow stream) still running at the halt
        try:
            return inflate(self)
        finally:
            steps["finished"] += 1

    monkeypatch.setattr(bundle_scan._Inflater, "_inflate", slow_off_thread)
    report = validate_stream(io.BytesIO(out.getvalue()), Limits(max_member_bytes=300_000))  # halts at zz.txt
    at_return = dict(steps)
    assert not report.valid and [e.code for e in report.errors] == ["member_too_large"]
    assert at_return["started"] > 0, "nothing was read ahead"
    assert at_return["finished"] == at_return["started"], "a step was still running when the scan returned"


@pytest.mark.parametrize("seed", range(6))
def test_a_damaged_bundle_read_ahead_gets_the_report_of_one_read_in_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    names = many_batches(tmp_path)
    out = io.BytesIO()
    write_bundle(tmp_path, names, out, compresslevel=1)
    data = bytearray(out.getvalue())
    rng = random.Random(seed)
    at = rng.randrange(1024, len(data) - 1024)
    data[at:at + 64] = rng.randbytes(64)  # damaged somewhere past the first step
    threaded = validate_stream(io.BytesIO(bytes(data)))
    monkeypatch.setattr(bundle_scan, "worker", lambda kind: _Inline())
    inline = validate_stream(io.BytesIO(bytes(data)))
    assert not threaded.valid
    assert threaded == inline  # the same issues, in the same order, and the same bytes read and hashed


def _bundle_in_child(root: str, names: list[str], result: Any) -> None:
    out = io.BytesIO()
    result.put(write_bundle(Path(root), names, out, compresslevel=1).sha256)
    result.put(validate_stream(io.BytesIO(out.getvalue())).valid)


def test_a_forked_child_bundles_and_validates_with_threads_of_its_own(tmp_path: Path) -> None:
    names = many_batches(tmp_path, files=12)
    parent = write_bundle(tmp_path, names, io.BytesIO(), compresslevel=1)  # the parent's threads are running
    validate_stream(io.BytesIO(b"not a bundle"))
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    child = ctx.Process(target=_bundle_in_child, args=(str(tmp_path), names, result))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung: it waited on a thread it did not inherit")
    assert child.exitcode == 0
    assert result.get(timeout=5) == parent.sha256
    assert result.get(timeout=5) is True



def test_a_scan_that_compiles_much_python_stops_reading_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chalicelib.bundle import CompileCache

    for i in range(240):  # ~3 MB of new Python in small files: compiled in this process, holding the GIL
        (tmp_path / f"dag_{i:03}.py").write_text("".join(f"X_{j} = {i} * {j}\n" for j in range(1000)))
    out = io.BytesIO()
    write_bundle(tmp_path, sorted(p.name for p in tmp_path.iterdir()), out, compresslevel=1)
    submitted: list[str] = []
    real = bundle_scan.worker

    def counting(kind: str) -> Any:
        submitted.append(kind)
        return real(kind)

    monkeypatch.setattr(bundle_scan, "worker", counting)
    cache = CompileCache({}, max_entries=1000)
    cold = validate_stream(io.BytesIO(out.getvalue()), cache=cache)
    cold_steps = len(submitted)
    submitted.clear()
    warm = validate_stream(io.BytesIO(out.getvalue()), cache=cache)  # every file known: nothing compiled
    assert cold.valid and warm == cold
    assert len(submitted) >= 3, "a scan that compiles nothing reads ahead"
    assert cold_steps < len(submitted) // 2, "a scan compiling most of the bundle kept reading ahead"
