"""`make demo`: a real DAG-only deploy, end to end, on the embedded stack.

Starts `dagcast local up` (moto server on 127.0.0.1, the API, the ingest function and
two sidecars), deploys examples/dags with `dagcast deploy --dags --wait`, shows what
landed on each sidecar, deploys a second version with one file changed, shows the swap,
then shuts everything down.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAGCAST = [sys.executable, "-m", "dagcast"]


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def show_sidecars(info: dict, version_hint: str) -> None:
    for s in info["sidecars"]:
        link = Path(s["dags_path"])
        target = os.readlink(link)
        files = files_of(link.resolve())
        print(f"   {s['name']}: {link.name} -> {target}  ({len(files)} files: {', '.join(sorted(files))})")
        versions = sorted((p.name for p in (link.parent / "versions").iterdir() if p.name[:1].isdigit()),
                          key=lambda name: int(name.split("-")[0]))  # <n>-<start of the bundle's sha256>
        print(f"   {' ' * len(s['name'])}  versions on disk: {', '.join(versions)} {version_hint}")


def deploy(env: dict[str, str], dags: Path, description: str) -> dict:
    cmd = [*DAGCAST, "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", "--description", description]
    print("   $ dagcast deploy --dags --dags-path", dags.name if dags.parent != ROOT / "examples" else "examples/dags",
          "--wait --json", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    for line in r.stderr.splitlines():
        print("   | " + line)
    if r.returncode != 0:
        print(r.stdout)
        raise SystemExit(f"deploy failed with exit {r.returncode}")
    result = json.loads(r.stdout)
    print(f"   deploy {result['deploy_id']}: {result['state']} v{result['version']}, "
          f"{result['files']} files, live on {len(result['sidecars'])} sidecars")
    return result


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="dagcast-demo-"))
    step(f"Starting the embedded stack (state in {state})")
    log = open(state / "local-up.log", "w")
    proc = subprocess.Popen([*DAGCAST, "local", "up", "--state-dir", str(state), "--sidecars", "2"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (state / "local.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                print((state / "local-up.log").read_text())
                raise SystemExit("the local stack did not start")
            time.sleep(0.2)
        info = json.loads((state / "local.json").read_text())
        print(f"   API {info['api_url']}, deployment {info['deployment']!r}, "
              f"{len(info['sidecars'])} sidecars; console at {info['api_url']}/")
        env = dict(os.environ, DAGCAST_API_URL=info["api_url"], DAGCAST_TOKEN=info["token"],
                   DAGCAST_DEPLOYMENT=info["deployment"])

        step("Deploy 1: examples/dags")
        first = deploy(env, ROOT / "examples" / "dags", "demo: first deploy")
        show_sidecars(info, "")

        step("Deploy 2: the same DAGs with one file changed")
        work = state / "work" / "dags"
        shutil.copytree(ROOT / "examples" / "dags", work)
        changed = work / "include" / "regions.py"
        changed.write_text(changed.read_text().replace('"apac")', '"apac", "latam")'))
        print("   changed include/regions.py: added region 'latam'")
        second = deploy(env, work, "demo: add latam region")
        show_sidecars(info, f"(v{first['version']} stays for tasks still running on it)")

        for s in info["sidecars"]:
            live = Path(s["dags_path"]).resolve()
            assert live.name == f"{second['version']}-{second['sha256'][:16]}", f"{s['name']} is not on v{second['version']}"
            assert "latam" in (live / "include" / "regions.py").read_text()
        step(f"Both sidecars swapped from v{first['version']} to v{second['version']} atomically. Demo OK.")
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
