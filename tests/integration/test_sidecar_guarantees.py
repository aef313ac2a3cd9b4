"""What a sidecar process guarantees against the embedded stack: crashes at named points between
install and publish, self-healing (re-registration, reported failures, a queue that is down) and the
exit of `dagcast sidecar --once` when there is nothing, or nothing trustworthy, to install.

Crash points come from the test-only hook DAGCAST_TEST_CRASH_AT (see dagcast.sidecar._crash_point);
every wait is on an event (a log line, a file, an API answer, a metric), never on a sleep."""
from __future__ import annotations

import base64
import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import DAGCAST, Api, dag_source, files_of, metric, run_dagcast, stack_env, until, version_of_link, write_dags
from test_sidecar_resilience import crashed_at, deploy, once, sidecar_env

from dagcast.exceptions import EXIT_ERROR

pytestmark = pytest.mark.integration

MANY = {f"team_{i % 4}/dag_{i}.py": dag_source(f"guarantee_{i}", "# " + "x" * 2000 + "\n") for i in range(24)}


# --- crash windows between install and publish ------------------------------------------------


@pytest.fixture(scope="module")
def a_then_b(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A root whose link is on version A (installed by `--once`), and a current version B that changes
    one file of A (so B comes with a delta against A)."""
    work = tmp_path_factory.mktemp("a-then-b")
    dags = write_dags(work / "dags", MANY)
    a = deploy(stack, dags)["version"]
    a_files = files_of(dags)
    base = work / "base"
    first = once(sidecar_env(stack), base, base / "current")
    assert first.returncode == 0, first.stderr
    assert version_of_link(base / "current") == a
    # the changed file carries a few KiB that do not compress, so the extractor reads the delta in two goes
    noise = base64.b64encode(random.Random("a-then-b").randbytes(3000)).decode()
    write_dags(dags, {"team_0/dag_0.py": dag_source("guarantee_0", f"# changed in B: {noise}\n")})
    b = deploy(stack, dags)["version"]
    return {"base": base, "a": a, "b": b, "a_files": a_files, "b_files": files_of(dags)}


def _logged(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [json.loads(line)["msg"] for line in proc.stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("point", ["mid-delta", "after-install", "mid-publish"])
def test_a_sidecar_killed_between_install_and_publish_keeps_serving_the_old_version_and_converges_after_restart(
    stack: dict[str, Any], a_then_b: dict[str, Any], tmp_path: Path, point: str
) -> None:
    root = tmp_path / "root"
    shutil.copytree(a_then_b["base"], root, symlinks=True)  # the link's target is relative: it moves along
    link, versions = root / "current", root / "versions"
    env = sidecar_env(stack)

    killed = once(env, root, link, crash_at=point)
    assert crashed_at(killed, point), killed.stderr
    assert version_of_link(link) == a_then_b["a"] and files_of(link.resolve()) == a_then_b["a_files"], \
        "the link is still on the complete old version"
    a_folder = link.resolve()
    complete = sorted(p.name for p in versions.iterdir() if not p.name.startswith("."))
    if point == "mid-delta":
        [partial] = versions.glob(".tmp-*")
        written = files_of(partial)
        assert written.get("team_0/dag_0.py") == a_then_b["b_files"]["team_0/dag_0.py"], "B's changed file was written"
        assert 0 < len(written) < len(a_then_b["b_files"]), "killed before the unchanged files were linked from A"
        assert complete == [a_folder.name], "nothing of B was renamed into versions/"
    else:
        [b_folder] = [versions / n for n in complete if n.startswith(f"{a_then_b['b']}-")]
        assert files_of(b_folder) == a_then_b["b_files"], "B was renamed in whole"
        assert (root / "manifests" / f"{b_folder.name}.json").is_file()
        inode = b_folder.stat().st_ino
        stale_links = list(root.glob(".current.tmp-*"))
        if point == "mid-publish":
            assert [Path(p.readlink()).name for p in stale_links] == [b_folder.name], "the temp link was made, not renamed"
        else:
            assert stale_links == []

    restart = once(env, root, link)
    assert restart.returncode == 0, restart.stderr
    assert version_of_link(link) == a_then_b["b"] and files_of(link.resolve()) == a_then_b["b_files"]
    assert not list(versions.glob(".tmp-*")) and not list(root.glob(".current.tmp-*"))
    assert list((root / "downloads").iterdir()) == []
    assert files_of(a_folder) == a_then_b["a_files"], "A was never modified"
    if point == "mid-delta":
        assert "built from the delta" in _logged(restart), "the leftover was removed and the delta applied again"
    else:
        assert link.resolve().stat().st_ino == inode, "the complete folder was published as it was"
        assert not {"downloaded and verified", "built from the delta"} & set(_logged(restart)), "nothing fetched again"


# --- self-healing -----------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(stack: dict[str, Any], tmp_path: Path, name: str, *args: str, **env: str) -> Iterator[dict[str, Any]]:
    """`dagcast sidecar` (the daemon) with its own root, metrics port and log; SIGTERM (and so
    deregistration) at the end, so that no later `deploy --wait` counts it."""
    root, log_path, port = tmp_path / name, tmp_path / f"{name}.log", _free_port()
    cmd = [*DAGCAST, "sidecar", "--name", name, "--root", str(root), "--link", str(root / "current"),
           "--metrics-addr", f"127.0.0.1:{port}", *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env={**sidecar_env(stack), **env}, stdout=log, stderr=subprocess.STDOUT)
        info = {"proc": proc, "root": root, "link": root / "current", "metrics": f"http://127.0.0.1:{port}",
                "log": lambda: [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]}
        try:
            yield info
        finally:
            proc.send_signal(signal.SIGTERM)
            info["exit"] = proc.wait(timeout=30)


def _view(api: Api, stack: dict[str, Any], name: str) -> dict[str, Any] | None:
    items = api.json("GET", f"/deployments/{stack['deployment']}/sidecars")["items"]
    return next((s for s in items if s["name"] == name), None)


def _current(api: Api, stack: dict[str, Any]) -> int:
    return int(api.json("GET", f"/deployments/{stack['deployment']}")["current_version"])


def _ensure_a_version(stack: dict[str, Any], tmp_path: Path) -> None:
    """The deployment has a current version (when this test runs first, deploy one)."""
    if _current(Api(stack), stack) == 0:
        deploy(stack, write_dags(tmp_path / "first-dags", {"first.py": dag_source("guarantee_first")}))


def _dead_sqs() -> dict[str, str]:
    """SQS at a port nobody listens on (the API, S3 and registration still work), failing at once."""
    return {"AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}


def test_a_sidecar_whose_registration_an_admin_deleted_registers_again_on_its_next_heartbeat(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """Its queue is unreachable, so only the heartbeat's 404 can tell it that it is no longer registered."""
    api = Api(stack)  # the stack's admin token
    _ensure_a_version(stack, tmp_path)
    with daemon(stack, tmp_path, "reborn", "--heartbeat-interval", "0.5", **_dead_sqs()) as sc:
        registered = lambda: [e for e in sc["log"]() if e["msg"] == "registered"]  # noqa: E731
        until(lambda: (v := _view(api, stack, "reborn")) is not None and v["version"] == _current(api, stack),
              30, "registered and on the current version")
        assert len(registered()) == 1
        resp = api.call("DELETE", f"/deployments/{stack['deployment']}/sidecars/reborn")
        assert resp.status_code < 300, resp.text
        until(lambda: len(registered()) == 2, 30, "registered again")
        until(lambda: (v := _view(api, stack, "reborn")) is not None and v["live"] and v["version"] == _current(api, stack),
              30, "reporting again under its new registration")
        assert not [e for e in sc["log"]() if e["msg"] == "heartbeat failed"], "a 404 is not an error to log and keep"
    assert sc["exit"] == 0 and _view(api, stack, "reborn") is None


def test_a_failed_sync_is_reported_to_the_api_and_counted_until_a_good_one_clears_it(stack: dict[str, Any], tmp_path: Path) -> None:
    api = Api(stack)
    _ensure_a_version(stack, tmp_path)
    with daemon(stack, tmp_path, "faulty", "--heartbeat-interval", "0.5", "--resync-interval", "1") as sc:
        before = _current(api, stack)
        until(lambda: (v := _view(api, stack, "faulty")) is not None and v["version"] == before, 30, "on the current version")
        downloads = sc["root"] / "downloads"
        shutil.rmtree(downloads)
        downloads.write_text("")  # downloads/ is now a file: every fetch fails with ENOTDIR
        dags = write_dags(tmp_path / "dags", {"faulty.py": dag_source("faulty", f"# after v{before}\n")})
        proc = run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--no-wait", "--json"], stack_env(stack))
        assert proc.returncode == 0, proc.stderr
        until(lambda: _current(api, stack) > before, 30, "the new version is live")
        until(lambda: "Not a directory" in ((_view(api, stack, "faulty") or {}).get("last_error") or ""), 30,
              "the error reported to the API")
        until(lambda: metric(sc["metrics"], "dagcast_sidecar_consecutive_failures") >= 2, 30, "failures counted")
        until(lambda: (_view(api, stack, "faulty") or {}).get("failures", 0) >= 2, 30, "the count reported to the API")
        view = _view(api, stack, "faulty")
        assert view is not None and view["version"] == before and view["live"], "still serving, and saying why it is behind"
        assert metric(sc["metrics"], "dagcast_sidecar_syncs_total", 'result="error"') >= 2
        assert version_of_link(sc["link"]) == before

        downloads.unlink()
        downloads.mkdir()
        after = _current(api, stack)
        until(lambda: (v := _view(api, stack, "faulty")) is not None and (v["version"], v["last_error"]) == (after, None), 30,
              "the next reconcile installs it and clears the error")
        assert metric(sc["metrics"], "dagcast_sidecar_consecutive_failures") == 0
        until(lambda: (_view(api, stack, "faulty") or {}).get("failures") == 0, 30, "the count cleared at the API")
    assert sc["exit"] == 0


def test_with_its_queue_unreachable_a_sidecar_retries_with_a_bounded_counted_backoff_and_stays_current(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    api = Api(stack)
    _ensure_a_version(stack, tmp_path)
    with daemon(stack, tmp_path, "deaf", **_dead_sqs()) as sc:
        failed = lambda: [e for e in sc["log"]() if e["msg"] == "queue poll failed"]  # noqa: E731
        until(lambda: len(failed()) >= 4, 30, "four failed polls")
        polls = failed()
        assert [e["failures"] for e in polls] == list(range(1, len(polls) + 1)), "each failure counted, in a row"
        for e in polls:  # 1 s plus full-jitter backoff on the poll failures so far, capped at 5 s
            assert 1.0 <= e["delay"] <= 1.0 + min(5.0, 0.2 * 2 ** (e["failures"] - 1)), e
        assert "Could not connect to the endpoint URL" in polls[0]["error"]
        assert version_of_link(sc["link"]) == _current(api, stack), "the reconcile at start installed the current version"
        view = _view(api, stack, "deaf")
        assert view is not None and view["live"] and view["last_error"] is None, "a queue outage is not a sync failure"
    assert sc["exit"] == 0


# --- dagcast sidecar --once: its exit when there is nothing (trustworthy) to install -------------


@pytest.mark.parametrize("deployment", ["never-deployed", "no-such-deployment"])
def test_once_exits_1_with_a_clear_reason_when_there_is_no_version_to_install(
    stack: dict[str, Any], tmp_path: Path, deployment: str
) -> None:
    api = Api(stack)
    if deployment == "never-deployed":
        resp = api.call("POST", "/deployments", {"name": deployment, "mechanism": "DAG_ONLY"})
        assert resp.status_code in (201, 409), resp.text
    root, link = tmp_path / "root", tmp_path / "dags"
    proc = once({**sidecar_env(stack), "DAGCAST_DEPLOYMENT": deployment}, root, link)
    assert proc.returncode == EXIT_ERROR, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    if deployment == "never-deployed":
        assert last == f"error: deployment {deployment!r} has no version to sync yet"
    else:
        assert last.startswith("error: cannot look up version current: ") and "does not exist (HTTP 404 not_found)" in last
    assert "Traceback" not in proc.stderr
    assert not link.is_symlink() and list((root / "versions").iterdir()) == []


class TamperingProxy:
    """An HTTP forward proxy that flips one byte in the middle of every answer it passes on."""

    def __init__(self) -> None:
        self.tampered: list[str] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            method, url, _ = lines[0].split(" ", 2)
            hop = {"host", "proxy-connection", "connection", "keep-alive"}
            headers = {k: v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line) if k.lower() not in hop}
            resp = httpx.request(method, url, headers=headers)
            body = bytearray(resp.content)
            if resp.status_code == 200 and body:
                body[len(body) // 2] ^= 0xFF
                self.tampered.append(url)
            head_out = f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(OSError):
                client.sendall(head_out.encode() + bytes(body))


def test_once_exits_1_and_installs_nothing_when_the_download_does_not_match_the_version(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """The bundle's bytes are changed on their way from S3 (a proxy between the sidecar and the bucket):
    the sha256 the API vouches for does not match, so nothing is extracted, linked or left behind."""
    api = Api(stack)
    _ensure_a_version(stack, tmp_path)
    current = api.json("GET", f"/deployments/{stack['deployment']}/versions/current")["version"]
    proxy = TamperingProxy()
    api_port = httpx.URL(stack["api_url"]).port
    root, link = tmp_path / "root", tmp_path / "dags"
    try:
        env = {**sidecar_env(stack), "HTTP_PROXY": proxy.url, "NO_PROXY": f"http://127.0.0.1:{api_port}"}
        proc = once(env, root, link)
    finally:
        proxy.close()
    assert proxy.tampered, "the download went through the proxy"
    assert proc.returncode == EXIT_ERROR, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: v{current['version']} failed verification: sha256 ")
    assert last.endswith(f"does not match the version record {current['sha256']}")
    assert "Traceback" not in proc.stderr
    assert not link.is_symlink() and list((root / "versions").iterdir()) == [] and list((root / "downloads").iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
