"""End-to-end deploy benchmark on the embedded stack (issue #10): where a deploy's time goes.

  python bench/e2e.py [--quick] [--sidecars K] [--fanout N] [--sizes 10,1000,10000] [--no-readme]
  python bench/e2e.py --report-only     # the tables of bench/results/e2e.json again

On `dagcast local`'s embedded stack (moto server, the API and ingest in this process, K
sidecar processes), runs the real `dagcast deploy --dags --wait --json` command on bundles of
10, 1,000 and 10,000 files (DAG files of ~5 KB, plus ~3 MB of SQL and YAML assets): first
deploys (every file new: nothing cached, nothing to reuse on the sidecars) and the everyday
case (one file changed), several times each. Every stage comes from the system's own
records, the same ones the API serves for any deploy (`GET /deployments/{d}/deploys/{id}`:
the deploy record's timestamps, each sidecar's reports, and `stages`), plus the CLI's
`timings` in its --json output; only "CLI start" is this script's clock, taken just before
it starts the command. Then it starts N sidecars on the deployment (fan-out) and measures
ACTIVE -> all of them live, and times `dagcast --help` against `python -c pass`.

Writes bench/results/e2e.json, prints Markdown tables, and puts them in README.md between
<!-- e2e-bench:start --> and <!-- e2e-bench:end --> (unless --no-readme).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagcast.client import ApiClient  # noqa: E402
from dagcast.local import EmbeddedStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "e2e.json"
README = ROOT / "README.md"
START, END = "<!-- e2e-bench:start -->", "<!-- e2e-bench:end -->"
ASSET_BYTES = 3 * 2**20

# Stages in the order a deploy goes through them: (key, label). Per-sidecar stages pool
# every sidecar of every run.
STAGES = [
    ("cli_process", "CLI process: interpreter start, imports, exit"),
    ("bundle", "CLI: bundle"),
    ("validate", "CLI: local validation"),
    ("diff", "CLI: live version + DAG diff"),
    ("presign", "CLI: presign request (POST /deploys)"),
    ("upload", "CLI: upload"),
    ("upload_to_ingest", "S3 stored -> ingest start"),
    ("validation", "ingest: validation"),
    ("ingest_to_active", "ingest start -> ACTIVE"),
    ("notified", "ACTIVE -> sidecar notified (each)"),
    ("sync", "download + verify + extract + swap (each)"),
    ("active_to_live", "ACTIVE -> live (each sidecar)"),
    ("active_to_all_live", "ACTIVE -> all sidecars live"),
    ("parse_report", "live -> Airflow's parse reported (each)"),
    ("all_live_to_cli_exit", "all live -> CLI exits (--wait notices)"),
    ("total", "**CLI start -> all sidecars live**"),
    ("cli_total", "CLI start -> CLI exits"),
]


# --- the dags folder ------------------------------------------------------------------------

DAG_TEMPLATE = '''"""{team} pipeline {i} (revision {rev}): loads {source} into the warehouse and builds {mart}.

Owned by {team}; runs {schedule}; two retries, alerts on failure. The SQL lives next to the
tasks that run it so a reviewer sees both in one diff.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator

DEFAULT_ARGS = {{
    "owner": "{team}",
    "retries": 2,
    "retry_delay": timedelta(minutes={retry}),
    "email_on_failure": True,
    "email": ["{team}-alerts@example.com"],
}}

EXTRACT_SQL = """
{extract}
"""

TRANSFORM_SQL = """
{transform}
"""


def check_row_counts(table: str, minimum: int = {minimum}, **context: object) -> int:
    """Fail the run when the load produced fewer rows than `minimum`."""
    hook = context["ti"].task.get_db_hook()  # type: ignore[attr-defined]
    count = hook.get_first(f"select count(*) from {{table}}")[0]
    if count < minimum:
        raise ValueError(f"{{table}} has {{count}} rows, expected at least {{minimum}}")
    return int(count)


with DAG(
    dag_id="{team}_pipeline_{i}",
    description="{source} -> {mart}",
    start_date=datetime(2024, {month}, {day}),
    schedule="{cron}",
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["{team}", "{source}"],
) as dag:
    extract = SQLExecuteQueryOperator(task_id="extract", conn_id="warehouse", sql=EXTRACT_SQL)
    transform = SQLExecuteQueryOperator(task_id="transform", conn_id="warehouse", sql=TRANSFORM_SQL)
    check = PythonOperator(
        task_id="check_row_counts",
        python_callable=check_row_counts,
        op_kwargs={{"table": "{mart}"}},
    )
    notify = BashOperator(task_id="notify", bash_command="echo '{team} pipeline {i} done: {{{{ ds }}}}'")
    extract >> transform >> check >> notify
'''

WORDS = ("order", "customer", "invoice", "payment", "shipment", "product", "region", "channel", "campaign",
         "session", "account", "ledger", "refund", "discount", "warehouse", "carrier", "partner", "event")


def _columns(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{rng.randrange(100)}" for _ in range(n)]


def dag_file(i: int, rev: str) -> str:
    rng = random.Random(f"{i}-{rev}")
    team = f"team_{i % 25}"
    source, mart = f"{rng.choice(WORDS)}s_raw", f"mart_{rng.choice(WORDS)}_{i}"
    cols = _columns(rng, 40)
    extract = "select\n    " + ",\n    ".join(cols[:24]) + f"\nfrom {source}\nwhere loaded_at >= '{{{{ ds }}}}'"
    transform = (
        f"insert into {mart}\nselect\n    " + ",\n    ".join(f"sum({c}) as {c}_total" for c in cols[24:]) +
        f"\nfrom {source}\ngroup by " + ", ".join(cols[:4])
    )
    text = DAG_TEMPLATE.format(
        team=team, i=i, rev=rev, source=source, mart=mart, schedule="hourly", retry=rng.randrange(1, 15),
        extract=extract, transform=transform, minimum=rng.randrange(1, 10_000), month=rng.randrange(1, 13),
        day=rng.randrange(1, 28), cron=f"{rng.randrange(60)} * * * *",
    )
    pad = 5000 - len(text)
    if pad > 0:  # top up to ~5 KB with what real DAG files carry: column documentation
        doc = "".join(f"# {c}: {rng.choice(WORDS)} {rng.choice(WORDS)} as reported by {source}\n" for c in _columns(rng, 80))
        text += "\n" + doc[:pad]
    return text


def asset(i: int, rev: str, size: int) -> tuple[str, str]:
    rng = random.Random(f"asset-{i}-{rev}")
    if i % 2:
        rel = f"include/config/source_{i}.yaml"
        lines = []
        while sum(map(len, lines)) < size:
            lines.append(f"- name: {rng.choice(WORDS)}_{rng.randrange(10_000)}\n  type: {rng.choice(('int', 'text', 'ts'))}\n"
                         f"  description: {rng.choice(WORDS)} {rng.choice(WORDS)} of the {rng.choice(WORDS)}\n")
    else:
        rel = f"include/sql/model_{i}.sql"
        lines = []
        while sum(map(len, lines)) < size:
            cols = _columns(rng, 6)
            lines.append(f"select {', '.join(cols)} from {rng.choice(WORDS)}s where {cols[0]} > {rng.randrange(1000)};\n")
    return rel, "".join(lines)


def write_dags(root: Path, files: int, rev: str) -> None:
    """A dags folder of `files` files: ~5 KB DAG files plus ~3 MB of SQL and YAML (rewritten whole)."""
    if root.exists():
        shutil.rmtree(root)
    assets = max(2, files // 50)
    for i in range(files - assets):
        path = root / f"team_{i % 25}" / f"pipeline_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dag_file(i, rev))
    for i in range(assets):
        rel, text = asset(i, rev, ASSET_BYTES // assets)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def change_one_file(root: Path, n: int) -> None:
    path = root / "team_0" / "pipeline_0.py"
    path.write_text(path.read_text() + f"# change {n}\n")


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(key, []).append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: stats(v) for k, v in self.values.items()}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(pct(values, 95), 3),
            "max": round(max(values), 3)}


def dagcast_command() -> list[str]:
    script = Path(sys.executable).with_name("dagcast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagcast"]


class Bench:
    def __init__(self, stack: EmbeddedStack, work: Path) -> None:
        assert stack.info is not None
        self.stack = stack
        self.info = stack.info
        self.api = ApiClient(self.info.api_url, self.info.token)
        self.env = {
            **os.environ,
            "DAGCAST_API_URL": self.info.api_url,
            "DAGCAST_TOKEN": self.info.token,
            "DAGCAST_DEPLOYMENT": self.info.deployment,
            "XDG_CACHE_HOME": str(work / "cache"),  # the CLI's compile cache starts cold, as on a new machine
        }

    def deploy(self, dags: Path, samples: Samples, sidecars: int) -> dict[str, Any]:
        """One `dagcast deploy --dags --wait --json`; adds its stages to `samples`."""
        started = time.time()
        proc = subprocess.run(
            [*dagcast_command(), "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--timeout", "300"],
            env=self.env, capture_output=True, text=True, timeout=600,
        )
        exited = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"dagcast deploy exited {proc.returncode}:\n{proc.stderr}")
        out = json.loads(proc.stdout)
        view = self._converged_view(out["deploy_id"], sidecars)
        d, st = view["deploy"], view["stages"]
        cli = out["timings"]
        samples.add("cli_process", (exited - started) - cli["total_s"])
        for key in ("bundle", "validate", "diff", "presign", "upload"):
            samples.add(key, cli[f"{key}_s"])
        samples.add("upload_to_ingest", st["upload_to_ingest_s"])
        samples.add("validation", st["validation_s"])
        samples.add("ingest_to_active", st["ingest_to_active_s"])
        for s in st["sidecars"]:
            samples.add("notified", s["notified_s"])
            samples.add("sync", s["sync_s"])
            samples.add("active_to_live", s["live_s"])
            samples.add("parse_report", s.get("parse_report_s"))
        all_live = max(d["activations"].values()) / 1000
        samples.add("active_to_all_live", all_live - d["activated_at"] / 1000)
        samples.add("all_live_to_cli_exit", exited - all_live)
        samples.add("total", all_live - started)
        samples.add("cli_total", exited - started)
        return view

    def _converged_view(self, deploy_id: str, sidecars: int) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            view = self.api.get_deploy(self.info.deployment, deploy_id)
            d = view["deploy"]
            if view["converged"] and len(d["activations"]) >= sidecars and d.get("converged_at"):
                return view
            if time.monotonic() > deadline:
                raise RuntimeError(f"deploy {deploy_id} did not converge on {sidecars} sidecars: {view}")
            time.sleep(0.1)


def run_sizes(bench: Bench, work: Path, plan: list[tuple[int, int, int]], sidecars: int, say: Callable[[str], None],
              results: dict[str, Any], after: dict[int, Callable[[Path], None]]) -> None:
    for files, first_runs, everyday_runs in plan:
        dags = work / f"dags-{files}"
        first, everyday = Samples(), Samples()
        size = 0
        for r in range(first_runs):
            write_dags(dags, files, rev=f"{files}-{r}-{random.random()}")  # every file new: a first deploy
            time.sleep(0.5)
            view = bench.deploy(dags, first, sidecars)
            size = view["deploy"]["size"]
            say(f"{files:>6} files, first deploy {r + 1}/{first_runs}: v{view['deploy']['version']}, "
                f"CLI start -> all live {first.values['total'][-1]:.2f} s")
        for r in range(everyday_runs):
            change_one_file(dags, r)
            time.sleep(0.5)
            view = bench.deploy(dags, everyday, sidecars)
            say(f"{files:>6} files, one changed {r + 1}/{everyday_runs}: v{view['deploy']['version']}, "
                f"CLI start -> all live {everyday.values['total'][-1]:.2f} s")
        results[f"{files}_first"] = {"files": files, "kind": "first deploy", "runs": first_runs, "sidecars": sidecars,
                                     "bundle_bytes": size, "stages": first.summary()}
        results[f"{files}_one_changed"] = {"files": files, "kind": "one file changed", "runs": everyday_runs,
                                           "sidecars": sidecars, "stages": everyday.summary()}
        if files in after:
            after[files](dags)


def fanout(bench: Bench, dags: Path, total: int, deploys: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Start sidecars up to `total` on the deployment, wait until all run the live version, then time
    `deploys` everyday deploys: ACTIVE -> each live, and ACTIVE -> all live; stop the extra sidecars."""
    stack, info = bench.stack, bench.info
    have = len(info.sidecars)
    started = time.monotonic()
    procs = []
    for i in range(have, total):
        info.sidecars.append(stack.start_sidecar(f"sidecar-{i + 1}"))
        procs.append(stack.sidecar_procs[-1])
    current = bench.api.get_version(info.deployment, None)["version"]
    deadline = time.monotonic() + 300
    while True:
        view = bench.api.get_deploy(info.deployment, current["deploy_id"])
        on = [s for s in view["sidecars"] if s["live"] and s["version"] >= current["version"]]
        if len(on) >= total:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(on)} of {total} sidecars reached v{current['version']}")
        time.sleep(0.5)
    say(f"fan-out: {total} sidecars live on v{current['version']} after {time.monotonic() - started:.1f} s")
    samples = Samples()
    for r in range(deploys):
        change_one_file(dags, 1000 + r)
        time.sleep(1.0)
        bench.deploy(dags, samples, total)
        say(f"fan-out: deploy {r + 1}/{deploys}: ACTIVE -> all {total} live {samples.values['active_to_all_live'][-1]:.2f} s")
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)
    del info.sidecars[have:]
    return {"sidecars": total, "runs": deploys, "files": 1000, "kind": "one file changed", "stages": samples.summary()}


def cli_help(runs: int) -> dict[str, Any]:
    """`dagcast --help` wall time against the interpreter's own start (`python -c pass`)."""
    def timed(cmd: list[str]) -> list[float]:
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            out.append(time.perf_counter() - t)
        return out

    timed([*dagcast_command(), "--help"])  # warm the page cache for both
    ours = timed([*dagcast_command(), "--help"])
    base = timed([sys.executable, "-c", "pass"])
    return {"runs": runs, "dagcast_help": stats(ours), "python_pass": stats(base)}


# --- reporting -------------------------------------------------------------------------------


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:")))
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = ""
    return f"{os.cpu_count()} cores{f' ({model})' if model else ''}{mem}, Python {platform.python_version()}"


def cell(stage: dict[str, float] | None) -> str:
    if not stage:
        return "—"
    return f"{stage['p50']:.2f} / {stage['p95']:.2f} / {stage['max']:.2f}"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]

    def get(scenario: dict[str, Any] | None, stage: str, stat: str) -> float | None:
        return scenario["stages"].get(stage, {}).get(stat) if scenario else None

    everyday, first = s.get("1000_one_changed"), s.get("1000_first")
    rows = [
        ("1,000 files, one changed, 3 sidecars: CLI start -> all live, p50", get(everyday, "total", "p50"), 1.0),
        ("same, p95", get(everyday, "total", "p95"), 2.0),
        ("1,000 files, first deploy: CLI start -> all live, p50", get(first, "total", "p50"), 3.0),
        ("10,000 files, first deploy: CLI start -> all live, p50", get(s.get("10000_first"), "total", "p50"), 15.0),
        (f"{results.get('fanout', {}).get('sidecars', 50)} sidecars: ACTIVE -> all live, p95",
         get(results.get("fanout"), "active_to_all_live", "p95"), 3.0),
        ("`dagcast --help`, p50", results["cli_help"]["dagcast_help"]["p50"], 0.3),
    ]
    return [{"target": name, "measured_s": value, "limit_s": limit, "met": value is not None and value <= limit}
            for name, value, limit in rows]


COLUMNS = [("10_first", "10 files, first"), ("10_one_changed", "10, one changed"),
           ("1000_first", "1,000, first"), ("1000_one_changed", "1,000, one changed"),
           ("10000_first", "10,000, first"), ("10000_one_changed", "10,000, one changed"),
           ("fanout", "fan-out")]


def markdown(results: dict[str, Any]) -> str:
    s = dict(results["scenarios"])
    if "fanout" in results:
        s["fanout"] = results["fanout"]
    cols = [(k, label) for k, label in COLUMNS if k in s]
    fan = results.get("fanout")
    sizes = ", ".join(f"{s[k]['files']:,} files {s[k]['bundle_bytes'] / 2**20:.1f} MiB" for k, _ in cols if "bundle_bytes" in s[k])
    lines = [
        f"Machine: {results['machine']}; shared and noisy. {results['sidecars']} sidecars"
        + (f", {fan['sidecars']} in the fan-out column (1,000 files, one changed)" if fan else "")
        + f". DAG files of ~5 KB plus ~3 MB of SQL/YAML assets; compressed: {sizes}. Recorded "
        f"{results['recorded_at']} by `{results['command']}` (about {results['duration_s'] / 60:.0f} min; "
        "`make bench` runs it), raw figures in `bench/results/e2e.json`.",
        "",
        "Seconds, p50 / p95 / max over the runs of each column (with so few runs, p95 is the slowest or "
        "second slowest); stages marked (each) pool every sidecar of every run.",
        "",
        "| stage | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| runs | " + " | ".join(str(s[k]["runs"]) for k, _ in cols) + " |",
    ]
    for key, label in STAGES:
        lines.append(f"| {label} | " + " | ".join(cell(s[k]["stages"].get(key)) for k, _ in cols) + " |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        measured = "—" if t["measured_s"] is None else f"{t['measured_s']:.2f} s"
        lines.append(f"| {t['target']} | {measured} | <= {t['limit_s']:g} s | {'yes' if t['met'] else '**no**'} |")
    h = results["cli_help"]
    lines += ["", f"`dagcast --help`: p50 {h['dagcast_help']['p50'] * 1000:.0f} ms against "
              f"{h['python_pass']['p50'] * 1000:.0f} ms for `python -c pass` ({h['runs']} runs each)."]
    return "\n".join(lines)


def write_readme(table: str) -> bool:
    text = README.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs of each case (a few minutes)")
    parser.add_argument("--sidecars", type=int, default=3, help="sidecars for the size cases")
    parser.add_argument("--fanout", type=int, default=50, help="sidecars in the fan-out case (0 to skip)")
    parser.add_argument("--sizes", default="10,1000,10000", help="bundle sizes to run, comma-separated")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--report-only", action="store_true", help="print (and put in README.md) the last results again")
    args = parser.parse_args()
    if args.report_only:
        table = markdown(json.loads(RESULTS.read_text()))
        print(table)
        return 0 if args.no_readme or write_readme(table) else 1
    sizes = {int(n) for n in args.sizes.split(",")}
    if args.quick:
        plan = [(10, 2, 3), (1000, 3, 6), (10_000, 2, 2)]
        fan_deploys = 3
    else:
        plan = [(10, 5, 8), (1000, 6, 20), (10_000, 5, 5)]
        fan_deploys = 8
    plan = [step for step in plan if step[0] in sizes]
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dagcast-e2e-"))
    results: dict[str, Any] = {"machine": machine(), "sidecars": args.sidecars, "scenarios": {}}
    results["command"] = "python bench/e2e.py" + (" --quick" if args.quick else "")
    results["cli_help"] = cli_help(10)
    try:
        with EmbeddedStack(work / "state", sidecars=args.sidecars) as stack:
            bench = Bench(stack, work)
            after: dict[int, Callable[[Path], None]] = {}
            if args.fanout > args.sidecars:
                after[1000] = lambda dags: results.__setitem__("fanout", fanout(bench, dags, args.fanout, fan_deploys, say))
            run_sizes(bench, work, plan, args.sidecars, say, results["scenarios"], after)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["duration_s"] = round(time.monotonic() - t0, 1)
    results["targets"] = targets(results)
    results["recorded_at"] = time.strftime("%Y-%m-%d", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if not args.no_readme and not write_readme(table):
        say(f"README.md has no {START} / {END} markers: table not written there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
