"""What keeping the embedded stack's state on disk costs (issue #21).

  python bench/durable.py [--rounds 3] [--runs 4] [--files 1000] [--no-readme]

The everyday deploy (`dagcast deploy --dags --wait --json`, one file changed in a dags folder
of --files files, two sidecars) on `dagcast local`'s embedded stack, alternately with moto's
state in memory only (the baseline, `EmbeddedStack(persist=False)`) and kept under the state
folder (the default), --rounds times each, --runs deploys per round; the two are compared as
ratios of medians from this one script, so a busy machine slows both alike. Also: how long a
flush of the state takes after a deploy (the moto server's own figure, `/_dagcast/state`),
how much of the state folder it is, and how long `local up` takes to start on the state of
those deploys against a fresh folder.

Writes bench/results/durable.json and puts a table in README.md between
<!-- durable-bench:start --> and <!-- durable-bench:end --> (unless --no-readme).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import Bench, Samples, change_one_file, write_dags  # noqa: E402

from dagcast.local import EmbeddedStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "durable.json"
README = ROOT / "README.md"
START, END = "<!-- durable-bench:start -->", "<!-- durable-bench:end -->"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_round(work: Path, dags: Path, persist: bool, runs: int, tag: str) -> dict[str, Any]:
    state = work / f"state-{tag}"
    shutil.rmtree(state, ignore_errors=True)
    started = time.monotonic()
    with EmbeddedStack(state, sidecars=2, persist=persist) as stack:
        up_s = time.monotonic() - started
        bench = Bench(stack, work)
        samples = Samples()
        bench.deploy(dags, Samples(), 2)  # the first deploy of the folder: not measured
        flushes = []
        for r in range(runs):
            change_one_file(dags, hash((tag, r)) % 10**6)
            bench.deploy(dags, samples, 2)
            if persist:
                assert stack.info is not None
                with urllib.request.urlopen(stack.info.aws_endpoint_url + "/_dagcast/state", timeout=5) as resp:
                    flushes.append(json.load(resp)["flush_seconds"])
    return {"total": samples.values["total"], "cli_total": samples.values["cli_total"], "up_s": up_s,
            "flush_s": flushes, "state_bytes": folder_bytes(state / "aws") if persist else 0}


def restart(state: Path) -> dict[str, Any]:
    """`local up` again on the state a round left."""
    started = time.monotonic()
    with EmbeddedStack(state, sidecars=2, persist=True):
        return {"restart_s": time.monotonic() - started}


def in_child(*argv: str) -> dict[str, Any]:
    """One stack per process: the API is this process's Chalice app, set up once per process."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench round {argv} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=4, help="measured deploys per round")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "WORK", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, work_dir, tag = args.child
        work_path = Path(work_dir)
        out = restart(work_path / f"state-{tag}") if kind == "restart" else one_round(
            work_path, work_path / "dags", kind == "disk", args.runs, tag)
        print(json.dumps(out))
        return 0
    work = Path(tempfile.mkdtemp(prefix="dagcast-durable-bench-"))
    try:
        dags = work / "dags"
        write_dags(dags, args.files, rev="durable")
        got: dict[str, dict[str, list[float]]] = {"memory": {}, "disk": {}}
        for r in range(args.rounds):
            for kind, persist in (("memory", False), ("disk", True)):
                out = in_child("--runs", str(args.runs), "--child", kind, str(work), f"{kind}-{r}")
                if persist:
                    out.update(in_child("--child", "restart", str(work), f"{kind}-{r}"))
                for key, value in out.items():
                    if value is None:
                        continue
                    got[kind].setdefault(key, []).extend(value if isinstance(value, list) else [value])
                print(f"round {r + 1}/{args.rounds} {kind:>6}: CLI start -> all live p50 "
                      f"{statistics.median(out['total']):.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {kind: {k: statistics.median(v) for k, v in d.items() if v} for kind, d in got.items()}
    results = {
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "files": args.files, "rounds": args.rounds, "runs_per_round": args.runs,
        "memory": med["memory"], "disk": med["disk"],
        "ratio_total": round(med["disk"]["total"] / med["memory"]["total"], 3),
        "ratio_cli_total": round(med["disk"]["cli_total"] / med["memory"]["cli_total"], 3),
        "flush_max_s": round(max(got["disk"]["flush_s"]), 4),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    print(table)
    if not args.no_readme:
        text = README.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            README.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    return 0


def render(r: dict[str, Any]) -> str:
    m, d = r["memory"], r["disk"]
    rows = [
        f"| everyday deploy ({r['files']:,} files, one changed, 2 sidecars), p50 | state in memory | state on disk | ratio |",
        "|---|---:|---:|---:|",
        f"| CLI start -> all sidecars live | {m['total']:.2f} s | {d['total']:.2f} s | {r['ratio_total']:.2f} |",
        f"| CLI start -> CLI exits | {m['cli_total']:.2f} s | {d['cli_total']:.2f} s | {r['ratio_cli_total']:.2f} |",
        f"| `local up` until ready (fresh folder) | {m['up_s']:.2f} s | {d['up_s']:.2f} s | |",
        f"| `local up` again on that state | | {d['restart_s']:.2f} s | |",
        f"| latest state flush, read after each deploy (p50 / max) | | {d['flush_s'] * 1000:.1f} / {r['flush_max_s'] * 1000:.1f} ms | |",
        f"| AWS state on disk after {r['runs_per_round'] + 1} deploys | | {d['state_bytes'] / 1024:.0f} KiB | |",
    ]
    machine = f"Python {r['machine']['python']}, {r['machine']['cpus']} CPUs"
    return "\n".join(rows) + f"\n\n{r['rounds']} rounds of {r['runs_per_round']} deploys each, alternating; {machine}."


if __name__ == "__main__":
    sys.exit(main())
