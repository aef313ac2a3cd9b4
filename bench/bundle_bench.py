"""Bundling benchmark: `write_bundle` of a 10,000-file dags folder vs `tar czf` of the same files.

  python bench/bundle_bench.py [--files N] [--runs R]

Both run in this script on the same folder (page cache warm for both), alternating, and the
table reports medians and their ratio. Target: within 1.5x of tar. Writes bench/results/bundle.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagcast import bundler  # noqa: E402


def make_dags(root: Path, files: int) -> None:
    body = "# " + "x" * 4700 + "\n"
    for i in range(files):
        path = root / f"team_{i % 50}" / f"dag_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"from airflow import DAG\n\nwith DAG('dag_{i}', schedule=None):\n    pass\n{body}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dagcast-bundle-bench-"))
    dags = work / "dags"
    make_dags(dags, args.files)
    ours, tar = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            bundler.build(dags, sink)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(["tar", "czf", str(work / "t.tar.gz"), "-C", str(dags), "."], check=True)
        tar.append(time.perf_counter() - started)
    result = {
        "files": args.files,
        "runs": args.runs,
        "dagcast_median_s": statistics.median(ours),
        "tar_czf_median_s": statistics.median(tar),
        "ratio": statistics.median(ours) / statistics.median(tar),
    }
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "bundle.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| measure | dagcast | tar czf | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| bundle {args.files:,} files (~5 KB) | {result['dagcast_median_s']:.2f} s | {result['tar_czf_median_s']:.2f} s "
          f"| {result['ratio']:.2f}x | <= 1.5x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
