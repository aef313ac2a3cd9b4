"""Sidecar benchmark on the embedded stack (issue: ACTIVE -> live on 10 sidecars; idle cost).

  python bench/sidecar_bench.py [--quick]

Measures, for a 1,000-file bundle of ~5 KB DAG files, the time from a version becoming
ACTIVE (the deploy record's `activated_at`) to each of 10 sidecars having it live (the
sidecar's own `last_sync_at` report), over several deploys that each change one file.
The floor, run in the same script, is the work itself: downloading the same bundle from
the same moto server and extracting it with plain `tarfile`. Then it samples one idle
sidecar's CPU time and RSS from /proc for a minute.
Writes bench/results/sidecar.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagcast.client import ApiClient  # noqa: E402
from dagcast.deploy import DeployOptions, run  # noqa: E402
from dagcast.local import EmbeddedStack  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def make_dags(root: Path, files: int) -> Path:
    body = "# " + "x" * 4700 + "\n"
    for i in range(files):
        path = root / f"team_{i % 25}" / f"dag_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "from datetime import datetime\nfrom airflow import DAG\n\n"
            f"with DAG('dag_{i}', start_date=datetime(2024, 1, 1), schedule=None):\n    pass\n{body}"
        )
    return root


def proc_stats(pid: int) -> tuple[float, int]:
    """(cpu seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return cpu, rss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer deploys, 10 s idle sample")
    parser.add_argument("--sidecars", type=int, default=10)
    args = parser.parse_args()
    deploys = 3 if args.quick else 8
    idle_seconds = 10 if args.quick else 60
    work = Path(tempfile.mkdtemp(prefix="dagcast-bench-"))
    dags = make_dags(work / "dags", 1000)
    latencies: list[float] = []
    first_latencies: list[float] = []
    floors: list[float] = []
    with EmbeddedStack(work / "state", sidecars=args.sidecars) as stack:
        info = stack.info
        assert info is not None
        api = ApiClient(info.api_url, info.token)
        for n in range(deploys + 1):  # deploy 0 is the first (full) one; the rest change one file each
            (dags / "team_0" / "dag_0.py").write_text(f"# change {n}\nx = {n}\n")
            opts = DeployOptions(dags_path=dags, deployment=info.deployment, wait=True, timeout=120)
            result = run(api, opts, lambda _msg: None)
            view = api.get_deploy(info.deployment, str(result.deploy_id))
            deadline = time.monotonic() + 30
            while any(s["last_sync_at"] is None or s["version"] < result.version for s in view["sidecars"]):
                assert time.monotonic() < deadline, "sidecars did not report"
                time.sleep(0.25)
                view = api.get_deploy(info.deployment, str(result.deploy_id))
            activated = view["deploy"]["activated_at"]
            (first_latencies if n == 0 else latencies).extend((s["last_sync_at"] - activated) / 1000 for s in view["sidecars"])
            if n == 0:
                continue
            # floor: the same download and extraction with nothing else
            version = api.get_version(info.deployment, result.version)
            started = time.perf_counter()
            with httpx.stream("GET", version["download_url"]) as resp, tempfile.TemporaryFile() as tmp:
                for chunk in resp.iter_bytes(1 << 20):
                    tmp.write(chunk)
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r:gz") as tf:
                    tf.extractall(work / f"floor-{n}", filter="data")
            floors.append(time.perf_counter() - started)
        pid = stack.sidecar_procs[0].pid
        time.sleep(5)  # let the last sync's pruning and heartbeat finish: measure idle, not the tail of work
        cpu0, _ = proc_stats(pid)
        t0 = time.monotonic()
        rss_max = 0
        while time.monotonic() - t0 < idle_seconds:
            time.sleep(1)
            rss_max = max(rss_max, proc_stats(pid)[1])
        cpu1, _ = proc_stats(pid)
        idle_cpu_pct = 100 * (cpu1 - cpu0) / (time.monotonic() - t0)
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores",
        "sidecars": args.sidecars,
        "deploys": deploys,
        "active_to_live_p50_s": statistics.median(latencies),
        "active_to_live_p95_s": pct(latencies, 95),
        "active_to_live_max_s": max(latencies),
        "first_deploy_active_to_live_p50_s": statistics.median(first_latencies),
        "first_deploy_active_to_live_max_s": max(first_latencies),
        "floor_download_extract_p50_s": statistics.median(floors),
        "idle_cpu_percent": idle_cpu_pct,
        "idle_rss_mib": rss_max / 2**20,
        "idle_seconds": idle_seconds,
    }
    out = ROOT / "bench" / "results" / "sidecar.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| ACTIVE -> live on each of {args.sidecars} sidecars, 1,000 files, one changed, p50 "
          f"| {results['active_to_live_p50_s']:.3f} s | |")
    print(f"| same, p95 | {results['active_to_live_p95_s']:.3f} s | < 1 s |")
    print(f"| first deploy of the 1,000 files (nothing to reuse), p50 | {results['first_deploy_active_to_live_p50_s']:.3f} s | |")
    print(f"| floor: download + extract alone, p50 | {results['floor_download_extract_p50_s']:.3f} s | |")
    print(f"| p50 / floor | {results['active_to_live_p50_s'] / results['floor_download_extract_p50_s']:.1f}x | |")
    print(f"| idle sidecar CPU over {idle_seconds} s | {idle_cpu_pct:.2f} % | < 1 % |")
    print(f"| idle sidecar RSS | {results['idle_rss_mib']:.1f} MiB | < 80 MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
