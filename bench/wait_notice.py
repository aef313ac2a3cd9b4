"""How fast `dagcast deploy --wait` notices the last sidecar's report, on the embedded stack.

  python bench/wait_notice.py [--runs 6] [--sidecars 3] [--modes polling,wakeups]

Starts `dagcast local`'s embedded stack (moto server; the API and ingest in this process; K
sidecar processes), then runs `dagcast deploy --dags --wait --json` (the real command, in its
own process) on a small dags folder, one file changed each time, alternating the API's long
poll between its two ways of noticing a change: `polling` (re-read the deploy record every
`wait_check_active_seconds`, as on Lambda) and `wakeups` (the in-process notifier the
embedded stack turns on, with the same polling behind it). For each deploy:

  last report   the later of the last sidecar's activation (`deploy.activations`, the sidecar's
                own epoch ms) and, when the CLI waited for them, the last parse report
                (`deploy.parsed`, epoch ms, as the API received it)
  noticed       the CLI's `timings.noticed_at`: when it received the answer that ended its wait
  exited        when the CLI process was gone (this script's clock)

and, traced in this process (the API's side): when the last report's write to DynamoDB ended,
when the long poll that answered started building its view, and when it returned. Prints
p50/p95 per mode and writes bench/results/wait_notice.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dagcast.client import ApiClient  # noqa: E402
from dagcast.local import EmbeddedStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "wait_notice.json"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def write_dags(root: Path, files: int) -> None:
    for i in range(files):
        path = root / f"dag_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from datetime import datetime\nfrom airflow import DAG\n\n"
                        f"with DAG('dag_{i}', start_date=datetime(2024, 1, 1), schedule=None):\n    pass\n")


class Trace:
    """Wall-clock marks of the API's side, recorded by wrapping the control plane and store in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes: dict[str, list[tuple[str, float, float]]] = {}  # deploy id -> (what, write started, ended)
        self.polls: dict[str, list[tuple[float, float, float]]] = {}  # deploy id -> (started, view started, returned)
        self._local = threading.local()

    def install(self) -> None:
        import app as chalice_app
        from chalicelib.service import ControlPlane
        from chalicelib.store import Store

        store, trace = chalice_app.get_store(), self

        def after(name: str, key: Callable[..., str]) -> None:
            original = getattr(Store, name)

            def wrapped(self: Store, *args: Any, **kwargs: Any) -> Any:
                started = time.time()
                out = original(self, *args, **kwargs)
                with trace.lock:
                    trace.writes.setdefault(key(*args, **kwargs), []).append((name, started, time.time()))
                return out

            setattr(store, name, wrapped.__get__(store))

        after("record_activation", lambda deployment, deploy_id, sidecar, *a, **k: deploy_id)
        after("put_parse", lambda record, *a, **k: record.deploy_id)

        get_deploy, view = ControlPlane.get_deploy, ControlPlane._deploy_view

        def traced_get_deploy(self: ControlPlane, deployment: str, deploy_id: str, wait_seconds: float = 0,
                              **kwargs: Any) -> Any:
            started = time.time()
            trace._local.view_started = None
            out = get_deploy(self, deployment, deploy_id, wait_seconds, **kwargs)
            if wait_seconds:
                with trace.lock:
                    trace.polls.setdefault(deploy_id, []).append((started, trace._local.view_started or started, time.time()))
            return out

        def traced_view(self: ControlPlane, *args: Any, **kwargs: Any) -> Any:
            trace._local.view_started = time.time()
            return view(self, *args, **kwargs)

        control = chalice_app.get_control()
        control.get_deploy = traced_get_deploy.__get__(control)  # type: ignore[method-assign]
        control._deploy_view = traced_view.__get__(control)  # type: ignore[method-assign]


@contextlib.contextmanager
def wakeups(on: bool) -> Iterator[None]:
    from chalicelib.settings import get_settings

    settings = get_settings()
    before = getattr(settings, "wait_wakeups", None)
    if before is not None:
        settings.wait_wakeups = on
    try:
        yield
    finally:
        if before is not None:
            settings.wait_wakeups = before


def dagcast_command() -> list[str]:
    script = Path(sys.executable).with_name("dagcast")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagcast"]


def one_deploy(env: dict[str, str], dags: Path, api: ApiClient, deployment: str, sidecars: int,
               trace: Trace) -> dict[str, Any]:
    proc = subprocess.run([*dagcast_command(), "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json",
                           "--timeout", "120"], env=env, capture_output=True, text=True, timeout=300)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"dagcast deploy exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout)
    deploy_id = out["deploy_id"]
    view = api.get_deploy(deployment, deploy_id)
    d = view["deploy"]
    if len(d.get("activations") or {}) < sidecars:
        raise RuntimeError(f"deploy {deploy_id} ended its wait with {len(d.get('activations') or {})} activations")
    last_activation = max(d["activations"].values()) / 1000
    waited_parse = (out.get("parse") or {}).get("status") not in (None, "none")
    parsed = [v / 1000 for v in (d.get("parsed") or {}).values()]
    last_report = max([last_activation, *(parsed if waited_parse and parsed else [])])
    with trace.lock:
        writes = sorted(trace.writes.get(deploy_id, []), key=lambda w: w[2])
        polls = list(trace.polls.get(deploy_id, []))
    last_write = writes[-1][2] if writes else None
    answering = min((p for p in polls if last_write is None or p[2] >= last_write), key=lambda p: p[2], default=None)
    noticed = out["timings"].get("noticed_at")
    row = {
        "deploy_id": deploy_id, "version": out["version"], "parse": (out.get("parse") or {}).get("status"),
        "last_report": round(last_report, 3), "last_write_end": last_write, "noticed_at": noticed, "exited": exited,
        "report_to_noticed_s": round(noticed - last_report, 3) if noticed else None,
        "report_to_exit_s": round(exited - last_report, 3),
    }
    if writes:
        row |= {
            "report_to_write_s": round(writes[-1][1] - last_report, 3),  # the API's handler, before it writes
            "write_s": round(writes[-1][2] - writes[-1][1], 3),  # the report's write to DynamoDB
        }
    if last_write is not None and answering is not None:
        row |= {
            "write_to_wake_s": round(answering[1] - last_write, 3),  # the long poll noticed: started its view
            "view_s": round(answering[2] - answering[1], 3),  # built the view (and noted convergence)
            "answer_to_noticed_s": round(noticed - answering[2], 3) if noticed else None,  # JSON + HTTP + CLI
        }
    if noticed:
        row["noticed_to_exit_s"] = round(exited - noticed, 3)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ["report_to_noticed_s", "report_to_exit_s", "report_to_write_s", "write_s", "write_to_wake_s", "view_s", "answer_to_noticed_s",
            "noticed_to_exit_s"]
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(pct(values, 95), 3),
                      "max": round(max(values), 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=6, help="deploys per mode")
    parser.add_argument("--sidecars", type=int, default=3)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--modes", default="polling,wakeups")
    parser.add_argument("--sidecar-parse", default="auto", choices=["auto", "report", "off"],
                        help="the sidecars' --parse (off: the last report is the last activation)")
    parser.add_argument("--no-persist", action="store_true", help="moto's state in memory only (no state flushes)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="dagcast-wait-"))
    dags = work / "dags"
    write_dags(dags, args.files)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with EmbeddedStack(work / "state", sidecars=args.sidecars, persist=not args.no_persist,
                       sidecar_args=["--parse", args.sidecar_parse]) as stack:
        info = stack.info
        assert info is not None
        api = ApiClient(info.api_url, info.token)
        trace = Trace()
        trace.install()
        env = {**os.environ, "DAGCAST_API_URL": info.api_url, "DAGCAST_TOKEN": info.token,
               "DAGCAST_DEPLOYMENT": info.deployment, "XDG_CACHE_HOME": str(work / "cache")}
        for n in range(args.runs * len(modes) + 1):
            mode = modes[(n - 1) % len(modes)]
            (dags / "dag_0.py").write_text(f"x = {n}\n")
            with wakeups(mode == "wakeups"):
                row = one_deploy(env, dags, api, info.deployment, args.sidecars, trace)
            if n == 0:
                continue  # the first deploy warms everything up
            results[mode].append(row)
            print(f"{mode:>8} v{row['version']}: last report -> noticed {row['report_to_noticed_s']} s, "
                  f"-> exit {row['report_to_exit_s']} s (wake {row.get('write_to_wake_s')}, view {row.get('view_s')}, "
                  f"answer -> noticed {row.get('answer_to_noticed_s')}, parse {row['parse']})", flush=True)
            time.sleep(0.3)
    summary = {m: summarise(rows) for m, rows in results.items()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "sidecars": args.sidecars,
                                   "sidecar_parse": args.sidecar_parse,
                                   "summary": summary, "runs": results}, indent=2) + "\n")
    print("\n| mode | measure | p50 | p95 | max |\n|---|---|---|---|---|")
    for m, s in summary.items():
        for k, v in s.items():
            print(f"| {m} | {k} | {v['p50']:.3f} s | {v['p95']:.3f} s | {v['max']:.3f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
