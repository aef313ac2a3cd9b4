"""Slow links (issue #18): what a one-file change sends, and how long it takes, through a 1 Mbit/s link.

  python bench/delta_bench.py [--sizes 1000,10000] [--up-kbit 1000] [--down-kbit 10000] [--no-readme]

On `dagcast local`'s embedded stack (3 sidecars), a dags folder of N files (bench/e2e.py's: ~5 KB DAG
files plus ~3 MB of SQL and YAML) is deployed once directly; then one file is changed and
`dagcast deploy --dags --wait --json` runs with every request it makes (API calls and the S3 upload)
sent through a forwarding HTTP proxy on 127.0.0.1 that counts the bytes leaving the client and paces
them at --up-kbit (bytes back at --down-kbit: an asymmetric office or home link). It runs twice per
size: the default (a delta against the live version) and `--full` (the whole bundle), each after its
own one-file change; beside them `aws s3 sync` of the same folder through the same link (--aws, or
`aws` on PATH; `pip install awscli`). "CLI start -> all live" is this script's clock around the command, which exits
once every sidecar runs the new version. Both runs go through the same proxy in the same process,
so the ratio between them holds on a noisy machine. Writes bench/results/delta.json and the README
table between <!-- delta-bench:start --> and <!-- delta-bench:end -->.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from e2e import Bench, change_one_file, dagcast_command, machine, write_dags  # noqa: E402

from dagcast.local import EmbeddedStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "delta.json"
README = ROOT / "README.md"
START, END = "<!-- delta-bench:start -->", "<!-- delta-bench:end -->"


class _SmallBuffers(ThreadingHTTPServer):
    """Small receive buffers (inherited by accepted sockets): loopback would otherwise take megabytes of
    an upload at once, and the client would wait for an answer, not on its writes, as on a real link."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        super().server_bind()


class Link:
    """A paced, counting forward proxy: one shared pipe each way, like one uplink."""

    def __init__(self, up_kbit: int, down_kbit: int) -> None:
        self.up_rate, self.down_rate = up_kbit * 125, down_kbit * 125  # bytes per second
        self.up = self.down = 0
        self._up_free = self._down_free = 0.0  # when each direction is next idle (monotonic)
        self._lock = threading.Lock()
        self._client = httpx.Client(trust_env=False, timeout=120)
        link = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                link.send("up", len(self.requestline) + 2 + len(str(self.headers)) + 2)
                left, parts = int(self.headers.get("Content-Length") or 0), []
                while left > 0:  # paced as it is read, so that the client's writes wait as on a slow link
                    part = self.rfile.read(min(left, 16384))
                    if not part:
                        break
                    left -= len(part)
                    parts.append(part)
                    link.send("up", len(part))
                body = b"".join(parts)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "proxy-connection", "connection", "expect")}
                resp = link._client.request(self.command, self.path, content=body, headers=headers)
                link.send("down", len(resp.content) + 200)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self.server = _SmallBuffers(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def send(self, way: str, n: int) -> None:
        """Count n bytes and hold the caller until the paced link has carried them."""
        with self._lock:
            now = time.monotonic()
            if way == "up":
                self.up += n
                self._up_free = max(now, self._up_free) + n / self.up_rate
                until = self._up_free
            else:
                self.down += n
                self._down_free = max(now, self._down_free) + n / self.down_rate
                until = self._down_free
        time.sleep(max(0.0, until - time.monotonic()))

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0


def through(bench: Bench, link: Link, dags: Path, *extra: str) -> dict[str, Any]:
    link.reset()
    env = {**bench.env, "HTTP_PROXY": link.url, "http_proxy": link.url, "NO_PROXY": "", "no_proxy": ""}
    wall, started = time.time(), time.monotonic()
    proc = subprocess.run([*dagcast_command(), "deploy", "--dags", "--dags-path", str(dags), "--wait", "--json",
                           "--timeout", "900", *extra], env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"dagcast deploy exited {proc.returncode}:\n{proc.stderr}")
    out = json.loads(proc.stdout)
    shown = subprocess.run([*dagcast_command(), "deploys", "show", out["deploy_id"], "--json"], env=bench.env,
                           capture_output=True, text=True, timeout=60, check=True)
    converged_at = json.loads(shown.stdout)["deploy"]["converged_at"]  # the API's clock (ms): same machine
    return {"kind": out["upload"]["kind"], "upload_bytes": out["upload"]["bytes"], "bytes_up": link.up,
            "bytes_down": link.down, "seconds": round(seconds, 2), "live_seconds": round(converged_at / 1000 - wall, 2),
            "converged": out["converged"], "stages": out.get("timings", {})}


def s3_sync(aws_cli: str, endpoint: str, link: Link, dags: Path, n: int) -> dict[str, Any]:
    """`aws s3 sync` of the same folder: once directly, then after a one-file change through the link."""
    import boto3

    bucket = f"sync-bench-{n}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    cmd = [aws_cli, "s3", "sync", str(dags), f"s3://{bucket}/dags/", "--endpoint-url", endpoint, "--only-show-errors"]
    subprocess.run(cmd, env=env, check=True, timeout=1200)
    change_one_file(dags, 3)
    link.reset()
    started = time.monotonic()
    subprocess.run(cmd, env={**env, "HTTP_PROXY": link.url, "http_proxy": link.url, "NO_PROXY": "", "no_proxy": ""},
                   check=True, timeout=1200)
    return {"bytes_up": link.up, "bytes_down": link.down, "seconds": round(time.monotonic() - started, 2)}


def run(sizes: list[int], up_kbit: int, down_kbit: int, say: Any, aws_cli: str | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="dagcast-delta-"))
    results: dict[str, Any] = {"machine": machine(), "up_kbit": up_kbit, "down_kbit": down_kbit, "sizes": {}}
    try:
        with EmbeddedStack(work / "state", sidecars=3) as stack:
            bench = Bench(stack, work)
            link = Link(up_kbit, down_kbit)
            for n in sizes:
                dags = work / f"dags-{n}"
                write_dags(dags, n, f"r{n}")
                first = subprocess.run([*dagcast_command(), "deploy", "--dags", "--dags-path", str(dags), "--wait",
                                        "--json", "--full"], env=bench.env, capture_output=True, text=True, timeout=600)
                if first.returncode != 0:
                    raise RuntimeError(first.stderr)
                row: dict[str, Any] = {"bundle_bytes": json.loads(first.stdout)["upload"]["bytes"]}
                change_one_file(dags, 1)
                row["delta"] = through(bench, link, dags)
                say(f"{n} files, delta: {row['delta']}")
                change_one_file(dags, 2)
                row["full"] = through(bench, link, dags, "--full")
                say(f"{n} files, full: {row['full']}")
                row["bytes_ratio"] = round(row["full"]["bytes_up"] / row["delta"]["bytes_up"], 1)
                row["time_ratio"] = round(row["full"]["seconds"] / row["delta"]["seconds"], 1)
                if aws_cli:
                    row["s3_sync"] = s3_sync(aws_cli, bench.info.aws_endpoint_url, link, dags, n)
                    say(f"{n} files, aws s3 sync: {row['s3_sync']}")
                results["sizes"][str(n)] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 2**20:,.2f} MiB"


def markdown(results: dict[str, Any]) -> str:
    up, down = results["up_kbit"], results["down_kbit"]
    lines = [
        f"Through a paced proxy, {up / 1000:g} Mbit/s up and {down / 1000:g} Mbit/s down; one file changed; "
        "3 sidecars; bytes counted leaving the client (API calls included).",
        "",
        "| files | upload | bytes up | CLI start -> all live | CLI start -> exit (parse reports in) | vs the whole bundle |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in results["sizes"].items():
        d, f = row["delta"], row["full"]
        lines.append(f"| {int(n):,} | delta ({kib(d['upload_bytes'])}) | {kib(d['bytes_up'])} | {d['live_seconds']:.1f} s | "
                     f"{d['seconds']:.1f} s | {row['bytes_ratio']:g}x fewer bytes, {row['time_ratio']:g}x faster |")
        lines.append(f"| {int(n):,} | whole bundle (`--full`, {kib(f['upload_bytes'])}) | {kib(f['bytes_up'])} | "
                     f"{f['live_seconds']:.1f} s | {f['seconds']:.1f} s | 1x |")
        if "s3_sync" in row:
            sync = row["s3_sync"]
            lines.append(f"| {int(n):,} | `aws s3 sync` of the folder (no validation, no sidecars) | {kib(sync['bytes_up'])} | "
                         f"{sync['seconds']:.1f} s (upload only) | | |")
    lines += ["", f"Machine: {results['machine']}. Targets: <= 64 KiB up for 10,000 files; <= 3 s CLI start to all live. "
              "All live is when the last sidecar ran the version (the deploy's `converged_at`); the CLI exits once the "
              "sidecars' Airflow parse reports are in as well."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--up-kbit", type=int, default=1000)
    parser.add_argument("--down-kbit", type=int, default=10000)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--aws", default=shutil.which("aws"), help="the AWS CLI for the `aws s3 sync` row (skipped without)")
    args = parser.parse_args()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = run([int(s) for s in args.sizes.split(",")], args.up_kbit, args.down_kbit, say, args.aws)
    results["recorded_at"] = time.strftime("%Y-%m-%d", time.gmtime())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if not args.no_readme:
        text = README.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            README.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
