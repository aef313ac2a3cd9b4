"""Benchmark of dagcast.parse (the warm, incremental parser) against Airflow's own DagBag.

  python bench/parse_bench.py [--quick] [--files 1000] [--runs 10]

On a folder of 1,000 generated DAG files (~5 KB each, four operators, as bench/e2e.py writes
them, plus its SQL/YAML assets):

1. the everyday case: a warm Parser (Airflow imported, folder parsed once), one file changed;
   the time from calling `parse(previous=..., changed={...})` to its result, over `--runs` runs
   (target: p95 < 1 s);
2. the first (whole) parse of the folder with workers=os.cpu_count() and workers=1, each on a
   fresh Parser (the warm child's start, i.e. importing Airflow, is reported apart), with DAG
   serialisation (what the DAG processor does, the default) and without (what DagBag does);
   and as the baseline, Airflow's own `DagBag(folder)` in a subprocess: the DagBag call itself and
   the whole process (interpreter start and Airflow import included).

Prints a Markdown table and writes bench/results/parse.json.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import change_one_file, machine, pct, write_dags  # noqa: E402

from dagcast.parse import Parser, ParseResult  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "parse.json"
TARGET_S = 1.0
CHANGED = "team_0/pipeline_0.py"

DAGBAG = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
started = time.perf_counter()
bag = DagBag(sys.argv[1])
seconds = time.perf_counter() - started
print("@@bench " + json.dumps({"seconds": seconds, "dags": len(bag.dag_ids), "errors": len(bag.import_errors)}), flush=True)
"""


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONDONTWRITEBYTECODE": "1"}


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(pct(values, 95), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def dagbag_baseline(folder: Path, home: Path, runs: int) -> dict[str, Any]:
    calls, totals, dags = [], [], 0
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", DAGBAG, str(folder)], env=airflow_env(home), capture_output=True,
                              text=True, timeout=900)
        totals.append(time.perf_counter() - started)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("@@bench ")), None)
        assert line, f"DagBag baseline failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        doc = json.loads(line[len("@@bench "):])
        calls.append(doc["seconds"])
        dags = doc["dags"]
    return {"dagbag_call": stats(calls), "process": stats(totals), "dags": dags}


def whole_parse(folder: Path, workers: int, serialize: bool, runs: int) -> dict[str, Any]:
    starts, parses, dags = [], [], 0
    for _ in range(runs):
        with Parser(workers=workers, serialize=serialize) as parser:
            started = time.perf_counter()
            parser.start()
            starts.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = parser.parse(folder)
            parses.append(time.perf_counter() - started)
            assert not result.import_errors, result.import_errors[:3]
            dags = len(result.dag_ids)
    return {"workers": workers, "serialize": serialize, "start": stats(starts), "parse": stats(parses),
            "start_plus_parse_p50": round(statistics.median(s + p for s, p in zip(starts, parses, strict=True)), 3),
            "dags": dags}


def one_changed(folder: Path, runs: int) -> dict[str, Any]:
    latencies: list[float] = []
    with Parser() as parser:
        parser.start()
        result: ParseResult = parser.parse(folder)
        files = len(result.files)
        for n in range(runs):
            change_one_file(folder, n)
            started = time.perf_counter()
            result = parser.parse(folder, previous=result, changed={CHANGED})
            latencies.append(time.perf_counter() - started)
            assert result.parsed_files == [CHANGED] and result.reused == files - 1, result.parsed_files
    return {"files": files, "workers": parser.workers, "latency": stats(latencies), "target_s": TARGET_S,
            "met": pct(latencies, 95) < TARGET_S}


def markdown(doc: dict[str, Any]) -> str:
    one = doc["one_changed"]
    base = doc["baseline"]
    lines = [
        f"Parse benchmark: {doc['files']} DAG files (~5 KB, 4 operators each), {doc['machine']}, Airflow {doc['airflow']}",
        "",
        "| Case | p50 | p95 | min | ratio to Airflow's DagBag (p50) |",
        "|---|---|---|---|---|",
        f"| One file changed, warm parser ({one['latency']['n']} runs; target p95 < {TARGET_S:g} s) | "
        f"{one['latency']['p50']:.3f} s | {one['latency']['p95']:.3f} s | {one['latency']['min']:.3f} s | "
        f"{one['latency']['p50'] / base['dagbag_call']['p50']:.3f} |",
    ]
    for case in doc["whole"]:
        label = f"Whole parse, workers={case['workers']}, {'with' if case['serialize'] else 'without'} serialisation"
        p = case["parse"]
        lines.append(f"| {label} | {p['p50']:.2f} s | {p['p95']:.2f} s | {p['min']:.2f} s | "
                     f"{p['p50'] / base['dagbag_call']['p50']:.2f} |")
    starts = [c["start"]["p50"] for c in doc["whole"]]
    lines += [
        f"| Warm child start (Airflow import), before the first parse | {statistics.median(starts):.2f} s | | | |",
        f"| Baseline: `DagBag(folder)` call, in a subprocess | {base['dagbag_call']['p50']:.2f} s | "
        f"{base['dagbag_call']['p95']:.2f} s | {base['dagbag_call']['min']:.2f} s | 1.00 |",
        f"| Baseline: that whole subprocess (interpreter, Airflow import, DagBag) | {base['process']['p50']:.2f} s | "
        f"{base['process']['p95']:.2f} s | {base['process']['min']:.2f} s | |",
    ]
    return "\n".join(lines)


def main() -> int:
    args = argparse.ArgumentParser()
    args.add_argument("--quick", action="store_true", help="200 files, fewer runs")
    args.add_argument("--files", type=int, default=1000, help="DAG files in the folder")
    args.add_argument("--runs", type=int, default=10, help="one-changed-file runs")
    opts = args.parse_args()
    files = 200 if opts.quick else opts.files
    whole_runs = 1 if opts.quick else 3
    with tempfile.TemporaryDirectory(prefix="dagcast-parse-bench-") as work:
        folder = Path(work) / "dags"
        total = files
        while total - max(2, total // 50) < files:  # write_dags counts its SQL/YAML assets among the files
            total += 1
        write_dags(folder, total, "r1")
        say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        say(f"one changed file of {files} ...")
        one = one_changed(folder, 3 if opts.quick else opts.runs)
        whole = []
        for workers in sorted({os.cpu_count() or 1, 1}, reverse=True):
            for serialize in (True, False):
                say(f"whole parse, workers={workers}, serialize={serialize} ...")
                whole.append(whole_parse(folder, workers, serialize, whole_runs))
        say("Airflow's DagBag in a subprocess ...")
        base = dagbag_baseline(folder, Path(work) / "airflow-home", whole_runs)
        assert base["dags"] == whole[0]["dags"], (base["dags"], whole[0]["dags"])
    with Parser() as probe:
        probe.start()
        version = probe.airflow_version
    doc = {"machine": machine(), "airflow": version, "files": files, "one_changed": one, "whole": whole,
           "baseline": base}
    table = markdown(doc)
    doc["table"] = table
    if not opts.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(table)
    return 0 if one["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
