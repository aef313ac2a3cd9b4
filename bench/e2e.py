"""End-to-end deploy benchmark on the embedded stack (issue #10): where a deploy's time goes, against peers.

  python bench/e2e.py [--quick] [--sidecars K] [--fanout N] [--sizes 10,1000,10000] [--no-readme]
                      [--peers sync,bundle|none] [--peer-runs 3] [--parse-10k off|on] [--parse-fanout off|on]
  python bench/e2e.py --report-only     # the tables of bench/results/e2e.json again

On `dagcast local`'s embedded stack (moto server, the API and ingest in this process, K
sidecar processes), runs the real `dagcast deploy --dags --wait --json` command on bundles of
10, 1,000 and 10,000 files (DAG files of ~5 KB, plus ~3 MB of SQL and YAML assets): first
deploys (every file new: nothing cached, nothing to reuse on the sidecars) and the everyday
case (one file changed), several times each. Every stage comes from the system's own
records, the same ones the API serves for any deploy (`GET /deployments/{d}/deploys/{id}`:
the deploy record's timestamps, each sidecar's reports and parse reports, and `stages`), plus
the CLI's `timings` in its --json output; only "CLI start" is this script's clock, taken just
before it starts the command.

The sidecars run Airflow's parse check in report mode (the deployment's default) and `--wait`
waits for their reports, so "CLI exits" includes them. After each deploy the bench waits until
every parse report is in before it goes on (one line on stderr per deploy says how long), so no
parse runs into the next measurement. A first deploy of 10,000 files would make each sidecar
parse 10,000 files (minutes of the machine), so by default (--parse-10k off) the 10,000-file
cases run on the same sidecars started again with `--parse off` (the deployment's parse_mode
has no "off"), and the tables say so.

After each deploy, the peers (bench/peers.py) run on the same folder and the same moto server:
`aws s3 sync` up then down on K folders at once, and Airflow's S3DagBundle (the same upload,
then a refresh on K running processes; the provider is installed on demand into
build/bench-peers/venv, never into the project's venv). Then it starts N sidecars on the
deployment (fan-out) and measures ACTIVE -> all of them live, and times `dagcast --help`
against `python -c pass`.

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
    ("all_parsed", "all live -> last parse report in"),
    ("noticed", "last report -> CLI noticed (its `timings.noticed_at`)"),
    ("last_report_to_cli_exit", "last report -> CLI exits"),
    ("all_live_to_cli_exit", "all live -> CLI exits"),
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

    def deploy(self, dags: Path, samples: Samples, sidecars: int, label: str = "") -> dict[str, Any]:
        """One `dagcast deploy --dags --wait --json`; adds its stages to `samples`. Returns once the deploy
        has settled (every sidecar live on it and every parse report in), so that nothing of it (the
        sidecars' Airflow parse above all) runs into the next measurement; says so on stderr."""
        started = time.time()
        proc = subprocess.run(
            [*dagcast_command(), "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--timeout", "1800"],
            env=self.env, capture_output=True, text=True, timeout=2000,
        )
        exited = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"dagcast deploy exited {proc.returncode}:\n{proc.stderr}")
        out = json.loads(proc.stdout)
        view = self._settled_view(out["deploy_id"], sidecars)
        settled = time.time()
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
        # The last report `--wait` waited for: the last parse report when the sidecars sent any (the
        # deploy record's `parsed`: sidecar -> when its report came in), else the last activation.
        parsed = [t / 1000 for t in (d.get("parsed") or {}).values()]
        last_report = max([all_live, *parsed])
        noticed = cli.get("noticed_at")  # epoch seconds; not in every CLI's --json output
        samples.add("active_to_all_live", all_live - d["activated_at"] / 1000)
        samples.add("all_parsed", (max(parsed) - all_live) if parsed else None)
        samples.add("noticed", None if noticed is None else noticed - last_report)
        samples.add("last_report_to_cli_exit", exited - last_report)
        samples.add("all_live_to_cli_exit", exited - all_live)
        samples.add("total", all_live - started)
        samples.add("cli_total", exited - started)
        reports = f"{len(parsed)}/{sidecars} parse reports" if parsed else f"no parse reports ({view['parse']['status']})"
        say(f"  {label}v{d['version']}: all live {all_live - started:.2f} s, CLI exit {exited - started:.2f} s, "
            f"{reports}, last {last_report - started:.2f} s; waited {settled - exited:.2f} s more for the deploy "
            "to settle")
        return view

    def _settled_view(self, deploy_id: str, sidecars: int, timeout: float = 1800) -> dict[str, Any]:
        """The deploy's view once it converged on `sidecars` sidecars and no parse report is pending: every
        live sidecar that parses (has a parser) has reported on it."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.api.get_deploy(self.info.deployment, deploy_id)
            d = view["deploy"]
            parsers = {s["name"] for s in view["sidecars"] if s["live"] and s.get("parser")}
            if (view["converged"] and len(d["activations"]) >= sidecars and d.get("converged_at")
                    and view["parse"]["status"] != "pending" and parsers <= set(d.get("parsed") or {})):
                return view
            if time.monotonic() > deadline:
                raise RuntimeError(f"deploy {deploy_id} did not settle on {sidecars} sidecars: {view}")
            time.sleep(0.1)

    def restart_sidecars(self, count: int, extra_args: list[str]) -> None:
        """Start the first `count` sidecars again (same names, same folders) with `extra_args` (e.g.
        `--parse off`), and wait until each runs the live version and says whether it parses as asked."""
        stack, info = self.stack, self.info
        names = [s.name for s in info.sidecars[:count]]
        olds = [c for c in stack.children if c.name in {f"sidecar {n}" for n in names}]
        for c in olds:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()  # the sidecar deregisters on SIGTERM
        for c in olds:
            if c.proc is not None:
                c.proc.wait(timeout=60)
            c.close()
            stack.children.remove(c)
        info.sidecars[:count] = [stack.start_sidecar(n, extra_args) for n in names]
        parses = "off" not in extra_args
        current = self.api.get_deployment(info.deployment).get("current_version") or 0  # 0: nothing deployed yet
        deadline = time.monotonic() + 300
        while True:
            ready = {s["name"] for s in self.api.list_sidecars(info.deployment)["items"]
                     if s["live"] and s["version"] >= current and bool(s.get("parser")) == parses}
            if set(names) <= ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecars {sorted(set(names) - ready)} did not come back on v{current}")
            time.sleep(0.2)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PeerSet:
    """The peers (bench/peers.py) measured after each dagcast deploy of a size, on the same folder."""

    aws_cli: str | None
    names: set[str]
    runs: int  # at most this many runs of each case (each peer run of 10,000 files takes a while)
    max_files: int = 1000  # larger folders: no peers (minutes per run on moto), said in the notes
    notes: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run

    def start(self, bench: Bench, work: Path, files: int) -> list[Any]:
        from peers import BundlePeer, PeerUnavailable, SyncPeer

        started: list[Any] = []
        if files > self.max_files:
            return started
        if not self.aws_cli:
            for name in ("aws s3 sync", "S3DagBundle"):
                self.notes[name] = "skipped: `aws` (the AWS CLI) is not on PATH; `pip install awscli`"
            return started
        endpoint, k = bench.info.aws_endpoint_url, len(bench.info.sidecars)
        if "sync" in self.names:
            started.append(SyncPeer(self.aws_cli, endpoint, work, f"peer-sync-{files}", k))
        if "bundle" in self.names:
            try:
                started.append(BundlePeer(self.aws_cli, endpoint, work, f"peer-bundle-{files}", k))
            except (PeerUnavailable, RuntimeError) as exc:
                self.notes["S3DagBundle"] = f"skipped: {exc}"
                say(f"S3DagBundle peer: {exc}")
        return started


def run_peers(peers: list[Any], dags: Path, files: int, first: bool, into: dict[str, list[float]], label: str,
              notes: dict[str, str]) -> None:
    for peer in list(peers):
        if first:
            peer.reset()
        try:
            seconds = peer.run(dags, files)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            notes[peer.name] = f"failed ({label.strip(': ')}): {exc}"
            say(f"  {label}{peer.name} failed, not run again: {exc}")
            peers.remove(peer)
            peer.close()
            continue
        into.setdefault(peer.name, []).append(seconds)
        say(f"  {label}{peer.name}: upload start -> {len(peer.dirs)} sidecars done {seconds:.2f} s")


def run_sizes(bench: Bench, work: Path, plan: list[tuple[int, int, int]], sidecars: int, say: Callable[[str], None],
              results: dict[str, Any], after: dict[int, Callable[[Path], None]], peer_set: PeerSet,
              parse_10k: str, pooled: Samples) -> None:
    parse = "report"
    for files, first_runs, everyday_runs in plan:
        if files >= 10_000 and parse_10k == "off" and parse != "off":
            say(f"{files} files: starting the {sidecars} sidecars again with --parse off (--parse-10k off)")
            bench.restart_sidecars(sidecars, ["--parse", "off"])
            parse = "off"
        dags = work / f"dags-{files}"
        first, everyday = Samples(), Samples()
        peer_first: dict[str, list[float]] = {}
        peer_everyday: dict[str, list[float]] = {}
        size = 0
        write_dags(dags, files, rev=f"{files}-0-{random.random()}")
        peers = peer_set.start(bench, work, files)
        try:
            for r in range(first_runs):
                if r:
                    write_dags(dags, files, rev=f"{files}-{r}-{random.random()}")  # every file new: a first deploy
                time.sleep(0.5)
                label = f"{files} files, first {r + 1}/{first_runs}: "
                view = bench.deploy(dags, first, sidecars, label)
                size = view["deploy"]["size"]
                if r < peer_set.runs:
                    run_peers(peers, dags, files, True, peer_first, label, peer_set.notes)
            for r in range(everyday_runs):
                change_one_file(dags, r)
                time.sleep(0.5)
                label = f"{files} files, one changed {r + 1}/{everyday_runs}: "
                bench.deploy(dags, everyday, sidecars, label)
                if r < peer_set.runs:
                    run_peers(peers, dags, files, False, peer_everyday, label, peer_set.notes)
        finally:
            for peer in peers:
                peer.close()
        for samples in (first, everyday):
            for key in ("noticed", "cli_process"):
                for v in samples.values.get(key, []):
                    pooled.add(key, v)
        common = {"files": files, "sidecars": sidecars, "parse": parse}
        results[f"{files}_first"] = {**common, "kind": "first deploy", "runs": first_runs, "bundle_bytes": size,
                                     "stages": first.summary(), "peers": peer_stats(peer_first, peer_set.notes)}
        results[f"{files}_one_changed"] = {**common, "kind": "one file changed", "runs": everyday_runs,
                                           "stages": everyday.summary(), "peers": peer_stats(peer_everyday, peer_set.notes)}
        if files in after:
            after[files](dags)


def peer_stats(measured: dict[str, list[float]], notes: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {name: {"skipped": why} for name, why in notes.items()}
    out.update({name: stats(values) for name, values in measured.items()})
    return out


def fanout(bench: Bench, dags: Path, total: int, deploys: int, say: Callable[[str], None],
           parse: str = "off") -> dict[str, Any]:
    """Start sidecars up to `total` on the deployment (with `--parse off` unless `parse` is "on": 47 more
    Airflow parsers on this machine would measure the CPU, not the fan-out), wait until all run the live
    version, then time `deploys` everyday deploys: ACTIVE -> each live, and ACTIVE -> all live; stop
    the extra sidecars."""
    stack, info = bench.stack, bench.info
    have = len(info.sidecars)
    started = time.monotonic()
    procs = []
    extra = ["--parse", "off"] if parse == "off" else []
    for i in range(have, total):
        info.sidecars.append(stack.start_sidecar(f"sidecar-{i + 1}", extra))
        procs.append(stack.sidecar_procs[-1])
    current = bench.api.get_version(info.deployment, None)["version"]
    deadline = time.monotonic() + 900
    while True:
        view = bench.api.get_deploy(info.deployment, current["deploy_id"])
        on = [s for s in view["sidecars"] if s["live"] and s["version"] >= current["version"]]
        if len(on) >= total and view["parse"]["status"] != "pending":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(on)} of {total} sidecars reached v{current['version']} (parse "
                               f"{view['parse']['status']})")
        time.sleep(0.5)
    say(f"fan-out: {total} sidecars live on v{current['version']} after {time.monotonic() - started:.1f} s")
    samples = Samples()
    for r in range(deploys):
        change_one_file(dags, 1000 + r)
        time.sleep(1.0)
        bench.deploy(dags, samples, total, f"fan-out {r + 1}/{deploys}: ")
        say(f"fan-out: deploy {r + 1}/{deploys}: ACTIVE -> all {total} live {samples.values['active_to_all_live'][-1]:.2f} s")
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)
    del info.sidecars[have:]
    return {"sidecars": total, "runs": deploys, "files": 1000, "kind": "one file changed",
            "parse": "report" if parse == "on" else f"report on {have}, off on the {total - have} others",
            "stages": samples.summary()}


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

    everyday = s.get("1000_one_changed")
    pooled = results.get("pooled", {})
    noticed = pooled.get("noticed")
    big_first, big_one = s.get("10000_first"), s.get("10000_one_changed")

    def parse_note(scenario: dict[str, Any] | None) -> str:
        return " (sidecars' parse off)" if scenario and scenario.get("parse") == "off" else ""

    fan = results.get("fanout", {})
    rows = [
        ("everyday deploy (1,000 files, one changed, 3 sidecars, parse reports in): CLI start -> CLI exits, p50",
         get(everyday, "cli_total", "p50"), 0.45),
        ("same, p95", get(everyday, "cli_total", "p95"), 0.7),
        ("CLI process overhead of `deploy` (interpreter start, imports, exit; everyday deploy), p50",
         get(everyday, "cli_process", "p50"), 0.12),
        ("`--wait` notices the last report: last report -> CLI noticed, p50 (every size case)",
         noticed["p50"] if noticed else None, 0.05),
        ("same, p95", noticed["p95"] if noticed else None, 0.05),
        (f"10,000 files, first deploy{parse_note(big_first)}: CLI start -> all live, p50",
         get(big_first, "total", "p50"), 5.0),
        (f"{fan.get('sidecars', 50)} sidecars (fan-out): ACTIVE -> all live, p95",
         get(fan or None, "active_to_all_live", "p95"), 1.5),
        (f"10,000 files, one changed{parse_note(big_one)}: CLI start -> all live, p50",
         get(big_one, "total", "p50"), 1.5),
        ("`dagcast --help`, p50", results["cli_help"]["dagcast_help"]["p50"], 0.3),
    ]
    return [{"target": name, "measured_s": value, "limit_s": limit, "met": None if value is None else value <= limit}
            for name, value, limit in rows]


COLUMNS = [("10_first", "10 files, first"), ("10_one_changed", "10, one changed"),
           ("1000_first", "1,000, first"), ("1000_one_changed", "1,000, one changed"),
           ("10000_first", "10,000, first"), ("10000_one_changed", "10,000, one changed"),
           ("fanout", "fan-out")]
PEERS = [("aws s3 sync", "`aws s3 sync` up + down on each"), ("S3DagBundle", "S3DagBundle: up + refresh on each")]


def column_label(label: str, scenario: dict[str, Any]) -> str:
    return f"{label} (parse off)" if scenario.get("parse") == "off" else label


def ratio(ours: float | None, peer: dict[str, Any] | None) -> str:
    if ours is None or not peer or "p50" not in peer or not peer["p50"]:
        return "—"
    return f"{ours / peer['p50']:.2f}"


def peers_markdown(results: dict[str, Any]) -> list[str]:
    s = results["scenarios"]
    cols = [(k, label) for k, label in COLUMNS if k in s and "peers" in s[k]]
    if not cols:
        return []
    lines = [
        "",
        f"Peers, measured in the same run after each dagcast deploy, on the same folder, the same moto server and "
        f"{results['sidecars']} \"sidecars\" (folders of this machine, downloading at once): `aws s3 sync` up, then "
        "`aws s3 sync` down on each; Airflow's S3DagBundle: the same upload, then on each of "
        f"{results['sidecars']} running processes (Airflow imported) the bundle's refresh, with no refresh interval "
        "waited for. Each from the start of the upload to the last sidecar done; neither validates, parses or "
        "reports. p50 seconds (runs); ratio = dagcast p50 / peer p50 (below 1: dagcast is faster).",
        "",
        "| | " + " | ".join(column_label(label, s[k]) for k, label in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]

    def p50(k: str, stage: str) -> float | None:
        return s[k]["stages"].get(stage, {}).get("p50")

    def peer_cell(k: str, name: str) -> str:
        peer = s[k]["peers"].get(name)
        if not peer:
            return "—"
        if "skipped" in peer:
            return "skipped"
        return f"{peer['p50']:.2f} ({peer['n']})"

    lines.append("| dagcast: CLI start -> all sidecars live | " + " | ".join(f"{p50(k, 'total'):.2f}" for k, _ in cols) + " |")
    lines.append("| dagcast: CLI start -> CLI exits | " + " | ".join(f"{p50(k, 'cli_total'):.2f}" for k, _ in cols) + " |")
    for name, label in PEERS:
        lines.append(f"| {label} | " + " | ".join(peer_cell(k, name) for k, _ in cols) + " |")
    for name, _ in PEERS:
        for stage, what in (("total", "all live"), ("cli_total", "CLI exits")):
            lines.append(f"| ratio dagcast {what} / {name} | "
                         + " | ".join(ratio(p50(k, stage), s[k]["peers"].get(name)) for k, _ in cols) + " |")
    notes = sorted({f"{name}: {peer['skipped']}" for k, _ in cols for name, peer in s[k]["peers"].items()
                    if "skipped" in peer})
    lines += [f"\n{n}" for n in notes]
    return lines


def markdown(results: dict[str, Any]) -> str:
    s = dict(results["scenarios"])
    if "fanout" in results:
        s["fanout"] = results["fanout"]
    cols = [(k, label) for k, label in COLUMNS if k in s]
    fan = results.get("fanout")
    sizes = ", ".join(f"{s[k]['files']:,} files {s[k]['bundle_bytes'] / 2**20:.1f} MiB" for k, _ in cols if "bundle_bytes" in s[k])
    off = [label for k, label in cols if s[k].get("parse") == "off"]
    parse = ("The sidecars run Airflow's parse check in report mode after each install and `--wait` waits for "
             "their reports" + (f", except in the columns marked (parse off): {', '.join(off)}, run with the sidecars "
                                "started with `--parse off` (`--parse-10k on` to parse there too)" if off else "")
             + (f"; in the fan-out, {fan['parse']}" if fan else "")
             + ". The bench waits after each deploy until every parse report is in before the next one.")
    lines = [
        f"Machine: {results['machine']}; shared and noisy. {results['sidecars']} sidecars"
        + (f", {fan['sidecars']} in the fan-out column (1,000 files, one changed)" if fan else "")
        + f". DAG files of ~5 KB plus ~3 MB of SQL/YAML assets; compressed: {sizes}. Recorded "
        f"{results['recorded_at']} by `{results['command']}` (about {results['duration_s'] / 60:.0f} min; "
        "`make bench` runs it), raw figures in `bench/results/e2e.json`.",
        "",
        parse,
        "",
        "Seconds, p50 / p95 / max over the runs of each column (with so few runs, p95 is the slowest or "
        "second slowest); stages marked (each) pool every sidecar of every run. \"Last report\" is the last "
        "parse report the deploy record holds (its `parsed` times), or the last sidecar live when none parsed.",
        "",
        "| stage | " + " | ".join(column_label(label, s[k]) for k, label in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| runs | " + " | ".join(str(s[k]["runs"]) for k, _ in cols) + " |",
    ]
    for key, label in STAGES:
        lines.append(f"| {label} | " + " | ".join(cell(s[k]["stages"].get(key)) for k, _ in cols) + " |")
    lines += peers_markdown(results)
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        measured = "—" if t["measured_s"] is None else f"{t['measured_s']:.2f} s"
        met = "yes" if t["met"] else ("—" if t["measured_s"] is None else "**no**")
        lines.append(f"| {t['target']} | {measured} | <= {t['limit_s']:g} s | {met} |")
    if not (results.get("pooled") or {}).get("noticed"):
        lines += ["", "\"Last report -> CLI noticed\" needs `timings.noticed_at` (epoch seconds) in `dagcast deploy "
                  "--json`; this CLI does not print it yet, hence —."]
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
    parser.add_argument("--peers", default="sync,bundle",
                        help="peers measured beside dagcast: sync (`aws s3 sync`), bundle (Airflow's S3DagBundle), or none")
    parser.add_argument("--peer-runs", type=int, default=3, help="peer runs per case, at most (after dagcast's first ones)")
    parser.add_argument("--peer-max-files", type=int, default=1000,
                        help="no peers for larger folders (a peer run of 10,000 files on moto takes minutes)")
    parser.add_argument("--aws", default=shutil.which("aws"), help="the AWS CLI for the peers (skipped without)")
    parser.add_argument("--parse-10k", choices=("off", "on"), default="off",
                        help="off: the 10,000-file cases run on sidecars started with --parse off (a first deploy "
                             "there makes each sidecar parse 10,000 DAG files: minutes of both cores)")
    parser.add_argument("--parse-fanout", choices=("off", "on"), default="off",
                        help="off: the fan-out's extra sidecars run with --parse off")
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
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dagcast-e2e-"))
    results: dict[str, Any] = {"machine": machine(), "sidecars": args.sidecars, "scenarios": {}}
    results["command"] = "python bench/e2e.py" + "".join(f" {a}" for a in sys.argv[1:])
    results["cli_help"] = cli_help(10)
    peer_set = PeerSet(args.aws, {p for p in args.peers.split(",") if p in ("sync", "bundle")}, args.peer_runs,
                       args.peer_max_files)
    pooled = Samples()
    try:
        with EmbeddedStack(work / "state", sidecars=args.sidecars) as stack:
            bench = Bench(stack, work)
            after: dict[int, Callable[[Path], None]] = {}
            if args.fanout > args.sidecars:
                after[1000] = lambda dags: results.__setitem__(
                    "fanout", fanout(bench, dags, args.fanout, fan_deploys, say, args.parse_fanout))
            run_sizes(bench, work, plan, args.sidecars, say, results["scenarios"], after, peer_set, args.parse_10k,
                      pooled)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["pooled"] = pooled.summary()
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
