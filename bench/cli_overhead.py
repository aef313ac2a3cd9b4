"""The `dagcast deploy` process's own cost: interpreter start, imports and exit, around the work.

  python bench/cli_overhead.py [--runs 15] [--files 20] [--sidecars 1]

On `dagcast local`'s embedded stack (as bench/e2e.py), runs the real command several times:
`dagcast deploy --dags --wait --json` after one file changed (a delta goes up, the sidecars take
it, the command exits 0) and `dagcast deploy --dags --dry-run --json`. For each run, the process
overhead is the subprocess's wall time minus the CLI's own `timings.total_s` (which starts when
the deploy command creates its result, and ends when the deploy is done): what bench/e2e.py calls
"CLI process: interpreter start, imports, exit". Interleaved with them, in the same run, it times
`python -c pass` (the interpreter alone, the floor) and `dagcast --help`; the runs alternate so
that a noisy neighbour hits every column alike. Prints p50 / min per column, the overhead above
`python -c pass`, and the wall time of each command (a cost merely moved inside `total_s` would
show there). Nothing is asserted: it is a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagcast.local import EmbeddedStack  # noqa: E402


def dagcast_command() -> list[str]:
    script = Path(sys.executable).with_name("dagcast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagcast"]


def write_dags(root: Path, files: int) -> None:
    for i in range(files):
        path = root / f"team_{i % 5}" / f"pipeline_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"from airflow import DAG\n\nwith DAG(dag_id='pipeline_{i}', schedule=None):\n    pass\n")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - started, proc


def deploy_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, overhead) of one deploy command, which must exit 0 with one JSON object."""
    wall, proc = timed(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-6:])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout)
    return wall, wall - out["timings"]["total_s"]


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.0f} / {min(values) * 1000:4.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command")
    parser.add_argument("--files", type=int, default=20, help="DAG files in the folder")
    parser.add_argument("--sidecars", type=int, default=1, help="sidecars on the stack (--wait waits for them)")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dagcast-cli-overhead-"))
    dags = work / "dags"
    write_dags(dags, args.files)
    dagcast = dagcast_command()
    try:
        with EmbeddedStack(work / "state", sidecars=args.sidecars) as stack:
            assert stack.info is not None
            env = {**os.environ, "DAGCAST_API_URL": stack.info.api_url, "DAGCAST_TOKEN": stack.info.token,
                   "DAGCAST_DEPLOYMENT": stack.info.deployment, "XDG_CACHE_HOME": str(work / "cache")}
            deploy = [*dagcast, "deploy", "--dags", "--dags-path", str(dags), "--json"]
            deploy_run([*deploy, "--wait"], env)  # v1, and a warm compile cache and page cache
            cols: dict[str, list[float]] = {k: [] for k in (
                "python -c pass", "dagcast --help", "deploy --wait: overhead", "deploy --wait: wall",
                "deploy --dry-run: overhead", "deploy --dry-run: wall")}
            for r in range(args.runs):
                cols["python -c pass"].append(timed([sys.executable, "-c", "pass"], env)[0])
                cols["dagcast --help"].append(timed([*dagcast, "--help"], env)[0])
                path = dags / "team_0" / "pipeline_0.py"
                path.write_text(path.read_text() + f"# change {r}\n")
                wall, overhead = deploy_run([*deploy, "--wait"], env)
                cols["deploy --wait: wall"].append(wall)
                cols["deploy --wait: overhead"].append(overhead)
                wall, overhead = deploy_run([*deploy, "--dry-run"], env)
                cols["deploy --dry-run: wall"].append(wall)
                cols["deploy --dry-run: overhead"].append(overhead)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(cols["python -c pass"])
    print(f"{args.runs} runs each, {args.files} DAG files, {args.sidecars} sidecar(s), {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    print(f"{'':28} {'p50 / min ms':>13}  {'p50 - python -c pass':>20}")
    for name, values in cols.items():
        above = "" if name == "python -c pass" else f"{(statistics.median(values) - base) * 1000:+17.0f} ms"
        print(f"{name:28} {ms(values):>13}  {above}")
    if args.json_out:
        args.json_out.write_text(json.dumps({k: sorted(round(v, 4) for v in vs) for k, vs in cols.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
