"""Compiling in worker processes gives the report compiling inline gives; a dead worker is an error, not a pass."""
from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator

import pytest

import chalicelib.bundle.validate as validation
from chalicelib.bundle import CompileCache, CompileSession, CompileWorkerError, CompileWorkers, Report, validate_stream


def bundle(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def dag_file(i: int) -> bytes:
    return f"from airflow import DAG\nwith DAG('dag_{i}'):\n    pass\n# {'x' * 3000}\n".encode()


MIXED = {
    **{f"dags/d{i}.py": dag_file(i) for i in range(300)},
    "dags/broken.py": b"x = 1\ndef oops(:\n",
    "dags/nul.py": b"x = 1\x00\n",
    "sql/q.sql": b"select 1;\n",
    **{f"dags/e{i}.py": dag_file(1000 + i) for i in range(300)},
    "dags/later_broken.py": b"if True:\nprint(1)\n",
}


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileWorkers]:
    monkeypatch.setattr(validation, "PARALLEL_AFTER", 10_000)  # a few files inline, the rest to the workers
    pool = CompileWorkers(workers=2)
    yield pool
    pool.close()


def test_workers_give_the_same_manifest_dag_ids_and_errors_as_compiling_inline(workers: CompileWorkers) -> None:
    data = bundle(MIXED)
    inline = validate_stream(io.BytesIO(data), cache=CompileCache())
    parallel = validate_stream(io.BytesIO(data), cache=CompileCache(), workers=workers)
    assert not inline.valid
    assert sorted(parallel.errors, key=lambda e: e.path or "") == sorted(inline.errors, key=lambda e: e.path or "")
    assert len(parallel.errors) == 3

    good = {k: v for k, v in MIXED.items() if "broken" not in k and "nul" not in k}
    data = bundle(good)
    inline = validate_stream(io.BytesIO(data), cache=CompileCache())
    cache = CompileCache()
    parallel = validate_stream(io.BytesIO(data), cache=cache, workers=workers)
    assert parallel == inline and parallel.valid
    assert len(parallel.dag_ids) == 600
    assert cache.added == 600, "what the workers compiled is cached like what was compiled inline"
    again = validate_stream(io.BytesIO(data), cache=cache, workers=workers)
    assert again == inline and cache.added == 600


def test_results_larger_than_a_pipe_buffer_do_not_stall(workers: CompileWorkers) -> None:
    many_ids = "from airflow import DAG\n" + "".join(f"DAG('generated_{i:05d}_{'y' * 40}')\n" for i in range(3000))
    files = {f"gen/g{i}.py": many_ids.replace("generated_", f"g{i}_").encode() for i in range(12)}
    data = bundle(files)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(validate_stream(io.BytesIO(data), workers=workers)), daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "validation with workers stalled"
    report = result[0]
    assert isinstance(report, Report) and report.valid and len(report.dag_ids) == 36_000


def test_a_worker_that_dies_mid_bundle_is_an_error_and_the_next_bundle_gets_new_workers(
    workers: CompileWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bundle({f"d{i}.py": dag_file(i) for i in range(400)})
    submit = CompileSession.submit

    def killing_submit(self: CompileSession, index: int, path: str, source: bytes) -> None:
        for w in workers._workers:  # killed (out of memory, say) while the bundle is being compiled
            w.proc.kill()
            w.proc.wait()
        submit(self, index, path, source)

    monkeypatch.setattr(CompileSession, "submit", killing_submit)
    with pytest.raises(CompileWorkerError, match="stopped unexpectedly"):
        validate_stream(io.BytesIO(data), cache=CompileCache(), workers=workers, parallel=True)
    monkeypatch.setattr(CompileSession, "submit", submit)
    report = validate_stream(io.BytesIO(data), cache=CompileCache(), workers=workers, parallel=True)
    assert report.valid and len(report.dag_ids) == 400
    assert all(w.alive() for w in workers._workers)


def test_a_second_bundle_while_the_workers_are_busy_compiles_inline(workers: CompileWorkers) -> None:
    held = workers.session()
    assert held is not None
    try:
        assert workers.session() is None
        report = validate_stream(io.BytesIO(bundle(MIXED)), cache=CompileCache(), workers=workers, parallel=True)
        assert [e.path for e in report.errors] == ["dags/broken.py", "dags/nul.py", "dags/later_broken.py"]
    finally:
        held.close()
    assert workers.session() is not None
