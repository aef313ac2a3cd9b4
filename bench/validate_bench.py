"""Benchmark of validate_stream against a minimal "floor" (tarfile r|gz + compile on each .py).

Usage: python bench/validate_bench.py [--quick]

Builds two bundles in a temp dir: (a) 1,000 files, ~50 MB (DAG .py files plus SQL/CSV/YAML
assets) and (b) a 256 MiB bundle of mostly incompressible data plus .py files. Each
measurement runs in a fresh subprocess (floor and validate interleaved); the table reports the
best wall time, uncompressed MB/s, the ratio to the floor (best and median) and the peak RSS
(VmHWM) of the measuring process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024
RSS_TARGET_MIB = 150
RATIO_TARGET = 1.3


DAG_HEAD = '''"""Nightly load of source __I__ into the warehouse."""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator

DEFAULT_ARGS = {"owner": "data-eng", "retries": 2, "retry_delay": timedelta(minutes=5)}


def check_counts(ds: str, **context: object) -> dict[str, int]:
    rows = [r for r in range(1000) if r % 7 == 0]
    if not rows:
        raise ValueError(f"no rows for {ds}")
    return {"rows": len(rows), "sum": sum(rows)}


with DAG(
    dag_id="load_source___I__",
    default_args=DEFAULT_ARGS,
    start_date=datetime(2024, 1, 1),
    schedule="@daily",
    catchup=False,
    tags=["load", "team-__TEAM__"],
) as dag:
'''


def dag_source(i: int, rng: random.Random) -> str:
    """A realistic ~5 KB Airflow DAG file."""
    tasks = []
    for t in range(rng.randint(28, 36)):
        tasks.append(
            f'    t{t} = BashOperator(\n        task_id="step_{t}",\n'
            f'        bash_command="python -m jobs.run --table tbl_{i}_{t} --date {{{{ ds }}}}",\n'
            f"        retries={rng.randint(0, 3)},\n    )\n"
        )
    chain = " >> ".join(f"t{t}" for t in range(len(tasks)))
    head = DAG_HEAD.replace("__I__", str(i)).replace("__TEAM__", str(i % 7))
    return (
        head
        + "".join(tasks)
        + '    check = PythonOperator(task_id="check", python_callable=check_counts)\n'
        + f"    {chain} >> check\n"
    )


def asset(kind: str, size: int, rng: random.Random) -> bytes:
    lines: list[str] = []
    total = 0
    while total < size:
        if kind == "sql":
            col, table = rng.randint(0, 99), rng.randint(0, 9)
            line = f"SELECT id, name, amount_{col} FROM sales_{table} WHERE day = '{{{{ ds }}}}';\n"
        elif kind == "csv":
            line = ",".join(str(rng.randint(0, 10**6)) for _ in range(8)) + "\n"
        else:
            name, team, ttl = rng.randint(0, 9999), rng.randint(0, 20), rng.randint(1, 400)
            line = f"- name: table_{name}\n  owner: team-{team}\n  ttl_days: {ttl}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def make_bundle(workdir: Path, name: str, files: dict[str, bytes], level: int) -> Path:
    from chalicelib.bundle import write_bundle

    root = workdir / name
    write_tree(root, files)
    out = workdir / f"{name}.tar.gz"
    with open(out, "wb") as fh:
        write_bundle(root, list(files), fh, compresslevel=level)
    return out


def small_bundle(workdir: Path) -> Path:
    rng = random.Random(1)
    files: dict[str, bytes] = {}
    for i in range(800):
        files[f"dags/team{i % 12}/load_{i}.py"] = dag_source(i, rng).encode()
    kinds = ["sql", "csv", "yaml"]
    for i in range(200):
        kind = kinds[i % 3]
        files[f"assets/{kind}/file_{i}.{kind}"] = asset(kind, rng.randint(150_000, 310_000), rng)
    return make_bundle(workdir, "small", files, 6)


def large_bundle(workdir: Path, total: int) -> Path:
    rng = random.Random(2)
    files: dict[str, bytes] = {}
    for i in range(200):
        files[f"dags/big/load_{i}.py"] = dag_source(i, rng).encode()
    chunk = 8 * MiB
    budget = total - 2 * MiB - sum(len(b) for b in files.values())
    i = 0
    while budget > 0:
        size = min(chunk, budget)
        files[f"data/blob_{i:03d}.bin"] = os.urandom(size)
        budget -= size + 1024
        i += 1
    return make_bundle(workdir, "large", files, 1)


# --------------------------------------------------------------------------- workers


def work_floor(path: str) -> dict[str, Any]:
    import tarfile

    start = time.perf_counter()
    total = 0
    with tarfile.open(path, mode="r|gz") as tf:
        for member in tf:
            if not member.isfile():
                continue
            fh = tf.extractfile(member)
            assert fh is not None
            if member.name.endswith(".py"):
                data = fh.read()
                total += len(data)
                compile(data, member.name, "exec", dont_inherit=True)
            else:
                while piece := fh.read(MiB):
                    total += len(piece)
    return {"seconds": time.perf_counter() - start, "bytes": total}


def work_validate(path: str) -> dict[str, Any]:
    from chalicelib.bundle import validate_stream

    start = time.perf_counter()
    with open(path, "rb") as fh:
        report = validate_stream(fh)
    seconds = time.perf_counter() - start
    assert report.valid, report.errors[:3]
    return {"seconds": seconds, "bytes": report.bytes, "files": report.files}


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(kind: str, path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(path: Path, repeat: int) -> dict[str, dict[str, Any]]:
    """Interleave floor and validate runs (each in a fresh process) so noise hits both alike."""
    runs: dict[str, list[dict[str, Any]]] = {"floor": [], "validate": []}
    for _ in range(repeat):
        for kind in runs:
            runs[kind].append(run_worker(kind, path))
    out = {}
    for kind, results in runs.items():
        seconds = sorted(r["seconds"] for r in results)
        out[kind] = {
            **min(results, key=lambda r: r["seconds"]),
            "median": seconds[len(seconds) // 2],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "runs": [r["seconds"] for r in results],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each and a 64 MiB large bundle")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, path = args.worker
        result = work_floor(path) if kind == "floor" else work_validate(path)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return

    repeat = 1 if args.quick else 5
    large_size = 64 * MiB if args.quick else 256 * MiB - 4 * MiB  # stay within max_bundle_bytes
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dagcast-bench-") as tmp:
        workdir = Path(tmp)
        bundles = [
            ("1k files, ~50 MB", small_bundle(workdir)),
            (f"{large_size // MiB} MiB bundle", large_bundle(workdir, large_size)),
        ]
        for label, path in bundles:
            timings = measure(path, repeat)
            floor, validate = timings["floor"], timings["validate"]
            uncompressed = validate["bytes"]
            results.append(
                {
                    "bundle": label,
                    "compressed_bytes": path.stat().st_size,
                    "uncompressed_bytes": uncompressed,
                    "files": validate["files"],
                    "floor_seconds": round(floor["seconds"], 4),
                    "validate_seconds": round(validate["seconds"], 4),
                    "validate_mb_per_s": round(uncompressed / 1e6 / validate["seconds"], 1),
                    "floor_mb_per_s": round(uncompressed / 1e6 / floor["seconds"], 1),
                    "ratio_to_floor": round(validate["seconds"] / floor["seconds"], 3),
                    "ratio_of_medians": round(validate["median"] / floor["median"], 3),
                    "validate_peak_rss_mib": round(validate["peak_rss_mib"], 1),
                    "floor_peak_rss_mib": round(floor["peak_rss_mib"], 1),
                    "validate_runs": [round(s, 4) for s in validate["runs"]],
                    "floor_runs": [round(s, 4) for s in floor["runs"]],
                }
            )

    print(
        "| bundle | compressed | uncompressed | files | validate | MB/s | floor | ratio (median) | peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        sizes = f"{r['compressed_bytes'] / MiB:.1f} MiB | {r['uncompressed_bytes'] / MiB:.1f} MiB"
        times = f"{r['validate_seconds']:.3f} s | {r['validate_mb_per_s']} | {r['floor_seconds']:.3f} s"
        rss = f"{r['validate_peak_rss_mib']} MiB (floor {r['floor_peak_rss_mib']})"
        ratio = f"{r['ratio_to_floor']:.2f}x ({r['ratio_of_medians']:.2f}x)"
        print(f"| {r['bundle']} | {sizes} | {r['files']} | {times} | {ratio} | {rss} |")
    large = results[-1]
    summary = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": args.quick,
        "targets": {"ratio_to_floor": RATIO_TARGET, "peak_rss_mib_large": RSS_TARGET_MIB},
        "met": {
            "ratio": all(r["ratio_to_floor"] <= RATIO_TARGET for r in results),
            "rss": large["validate_peak_rss_mib"] < RSS_TARGET_MIB,
        },
        "results": results,
    }
    met = summary["met"]
    print(
        f"\ntargets: ratio <= {RATIO_TARGET}x: {met['ratio']}; peak RSS < {RSS_TARGET_MIB} MiB: {met['rss']}"
    )
    out = Path(__file__).resolve().parent / "results" / "validate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
