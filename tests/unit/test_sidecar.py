"""The sidecar's sync step on real files, with the API and bundle downloads faked in memory."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest

from chalicelib.bundle import DeltaCollector, Limits, validate_stream, write_bundle
from chalicelib.models import Delta, Version
from chalicelib.publish import version_statement
from chalicelib.signing import FileSigner, statement_bytes
from dagcast.exceptions import ApiError, SyncError
from dagcast.sidecar import Announced, Sidecar, SidecarConfig, Syncer, Trust, folder_name

UID = "0123456789abcdef"


def bundle_bytes(tmp: Path, files: dict[str, str]) -> bytes:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    buf = io.BytesIO()
    write_bundle(tmp, list(files), buf)
    return buf.getvalue()


class FakeApi:
    """Plays the control API: version records with sha256, limits and the deployment id, and download
    URLs served by `transport`; it signs announcements as the publishing functions do."""

    def __init__(self, signer: FileSigner) -> None:
        self.signer = signer
        self.records: dict[int, Version] = {}
        self.blobs: dict[int, bytes] = {}
        self.deltas: dict[int, bytes] = {}
        self.current = 0
        self.lookups: list[int | None] = []
        self.uid = UID

    @property
    def sha(self) -> dict[int, str]:
        return {v: r.sha256 for v, r in self.records.items()}

    def add(self, version: int, blob: bytes, sha256: str | None = None, limits: Limits | None = None,
            uid: str | None = None) -> Version:
        self.blobs[version] = blob
        self.records[version] = Version(
            deployment="d", version=version, deploy_id=f"d{version}", sha256=sha256 or hashlib.sha256(blob).hexdigest(),
            size=len(blob), key="k", created_at=0, deployment_id=uid or self.uid, limits=limits or Limits(),
        )
        self.current = max(self.current, version)
        return self.records[version]

    def add_delta(self, version: int, base: int, **changes: Any) -> Delta:
        """Build version's delta against base the way the ingest function does."""
        base_report = validate_stream(io.BytesIO(self.blobs[base]), check_python=False)
        collector = DeltaCollector({f.path: f.sha256 for f in base_report.manifest})
        report = validate_stream(io.BytesIO(self.blobs[version]), check_python=False, collect=collector)
        built = collector.build(report.manifest, report.bytes * 4)
        assert built is not None
        delta = Delta.model_validate({
            "base_version": base, "base_sha256": self.records[base].sha256, "key": "dk", "sha256": built.sha256,
            "size": len(built.data), "files": built.files, "removed": built.removed, "files_sha256": built.files_sha256,
            **changes,
        })
        self.deltas[version] = built.data
        self.records[version] = self.records[version].model_copy(update={"delta": delta})
        return delta

    def get_version(self, deployment: str, version: int | None) -> dict[str, Any]:
        self.lookups.append(version)
        v = self.current if version is None else version
        if v not in self.records:
            if version is None:  # the API's own words for a deployment nothing was deployed to yet
                raise ApiError(404, "not_found", "deployment 'd' has no version yet: deploy DAGs first")
            raise ApiError(404, "not_found", f"version {v} of deployment 'd' does not exist")
        view: dict[str, Any] = {"version": self.records[v].model_dump(mode="json"), "download_url": f"http://bundles.test/v{v}"}
        if v in self.deltas:
            view["delta_url"] = f"http://bundles.test/d{v}"
        return view

    def message(self, version: int, **override: Any) -> dict[str, Any]:
        """The queue message the publishing function sends for `version`: signed statement, URLs."""
        record = self.records[version]
        statement = statement_bytes(version_statement(record))
        doc = {"deployment": "d", "version": version, "statement": statement.decode(), "signature": self.signer.sign(statement),
               "key_id": self.signer.key_id, "download_url": f"http://bundles.test/v{version}"}
        if version in self.deltas:
            doc["delta_url"] = f"http://bundles.test/d{version}"
        return {**doc, **override}

    def trust(self) -> Trust:
        return Trust("d", self.uid, {self.signer.key_id: self.signer.public_key_pem})

    def announced(self, version: int, **override: Any) -> Announced:
        announced, verdict = self.trust().check(self.message(version, **override))
        assert announced is not None, verdict
        return announced


@pytest.fixture
def signer(tmp_path: Path) -> FileSigner:
    return FileSigner(tmp_path / "keys" / "signing.pem")


@pytest.fixture
def env(tmp_path: Path, signer: FileSigner) -> tuple[Syncer, FakeApi, list[str]]:
    api = FakeApi(signer)
    downloads: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        downloads.append(request.url.path)
        kind, n = request.url.path[1], int(request.url.path[2:])
        if kind == "v" and n not in api.blobs or kind == "d" and n not in api.deltas:
            return httpx.Response(403, content=b"expired")
        return httpx.Response(200, content=api.blobs[n] if kind == "v" else api.deltas[n])

    cfg = SidecarConfig(name="t", root=tmp_path / "root", link=tmp_path / "dags", deployment="d", keep=2)
    syncer = Syncer(cfg, api, http=httpx.Client(transport=httpx.MockTransport(handler)))  # type: ignore[arg-type]
    syncer.prepare()
    return syncer, api, downloads


def versions_of(i: int, tmp_path: Path) -> bytes:
    src = tmp_path / f"src{i}"
    return bundle_bytes(src, {"dag.py": f"VERSION = {i}\n", "sql/q.sql": f"select {i};\n"})


def on_disk(syncer: Syncer) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in syncer.versions.iterdir() if not p.name.startswith("."))


def test_publishes_a_version_behind_a_relative_link_named_by_number_and_sha256(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    record = api.add(1, versions_of(1, tmp_path))
    assert syncer.sync() == 1
    link = syncer.cfg.link
    folder = syncer.versions / f"1-{record.sha256[:16]}"
    assert os.readlink(link) == os.path.relpath(folder, link.parent)
    assert (link / "dag.py").read_text() == "VERSION = 1\n"
    live = syncer.installed()
    assert live is not None and (live.version, live.sha256, live.deployment_id) == (1, record.sha256, UID)


def test_older_equal_and_duplicate_announcements_never_go_backwards_or_download_twice(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    for i in (1, 2):
        api.add(i, versions_of(i, tmp_path))
    assert syncer.sync(api.announced(2)) == 2
    assert syncer.sync(api.announced(1)) is None
    assert syncer.sync(api.announced(2)) is None
    assert syncer.sync() is None
    assert downloads == ["/v2"]
    assert syncer.live_version() == 2


def test_poll_takes_the_highest_vouched_for_version_and_every_message_is_deleted_after(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    for i in (1, 3):
        api.add(i, versions_of(i, tmp_path))
    forged = api.add(9, versions_of(9, tmp_path))
    bodies = [api.message(3), api.message(1), api.message(3), "not json", {"deployment": "other", "version": 9},
              {**api.message(9), "signature": api.message(1)["signature"]}]
    del api.records[9]

    class FakeSqs:
        deleted: list[str] = []

        def receive_message(self, **_: Any) -> dict[str, Any]:
            return {"Messages": [{"Body": b if isinstance(b, str) else json.dumps(b), "ReceiptHandle": f"r{i}"}
                                 for i, b in enumerate(bodies)]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            self.deleted.extend(e["ReceiptHandle"] for e in Entries)

    sqs = FakeSqs()
    daemon = Sidecar(syncer.cfg, api, sqs)  # type: ignore[arg-type]
    daemon.queue_url, daemon.trust = "q", api.trust()
    announced = daemon._poll(0)
    assert announced is not None and announced.record.version == 3 and forged.version == 9
    assert sqs.deleted == [], "messages are deleted after the sync, off the critical path"
    daemon._delete_received()
    assert sorted(sqs.deleted) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    verdicts = {v: daemon.metrics.announcements.labels(result=v)._value.get()
                for v in ("accepted", "bad_signature", "malformed", "other_deployment")}
    assert verdicts == {"accepted": 3, "bad_signature": 1, "malformed": 1, "other_deployment": 1}


# --- what an attacker can send ------------------------------------------------------------


def forged(api: FakeApi, tmp_path: Path, version: int, **statement: Any) -> dict[str, Any]:
    """A message for a made-up bundle: its own sha256 and URL, in a statement nobody with the key signed."""
    blob = versions_of(version, tmp_path)
    api.blobs[version] = blob
    record = Version(deployment="d", version=version, deploy_id="evil", sha256=hashlib.sha256(blob).hexdigest(),
                     size=len(blob), key="k", created_at=0, deployment_id=UID)
    body = statement_bytes({**version_statement(record), **statement})
    return {"deployment": "d", "version": version, "statement": body.decode(), "key_id": api.signer.key_id,
            "signature": api.signer.sign(statement_bytes(version_statement(record.model_copy(update={"version": 1})))),
            "download_url": f"http://bundles.test/v{version}"}


@pytest.mark.parametrize("how", ["self-signed", "unsigned", "unknown-key", "other-deployment-id", "tampered"])
def test_a_forged_announcement_is_never_vouched_for(env: Any, tmp_path: Path, how: str) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    trust = api.trust()
    message = forged(api, tmp_path, 999)
    if how == "self-signed":  # signed, but by the attacker's own key under the real key id
        own = FileSigner(tmp_path / "attacker.pem")
        message["signature"] = own.sign(message["statement"].encode())
    elif how == "unsigned":
        del message["signature"]
    elif how == "unknown-key":
        own = FileSigner(tmp_path / "attacker.pem")
        message.update(signature=own.sign(message["statement"].encode()), key_id=own.key_id)
    elif how == "other-deployment-id":  # genuinely signed, for another stack's deployment of the same name
        other = api.add(999, versions_of(999, tmp_path), uid="ffffffffffffffff")
        message = api.message(999)
        assert other.deployment_id != trust.deployment_id
    else:  # a genuine signature, with the statement's sha256 swapped
        genuine = api.message(1)
        doc = json.loads(genuine["statement"])
        doc["sha256"] = json.loads(message["statement"])["sha256"]
        message = {**genuine, "statement": json.dumps(doc)}
    announced, verdict = trust.check(message)
    assert announced is None
    assert verdict == {"self-signed": "bad_signature", "unsigned": "unsigned", "unknown-key": "unknown_key",
                       "other-deployment-id": "other_deployment", "tampered": "bad_signature"}[how]


def test_a_daemon_drops_a_forged_announcement_and_installs_the_next_real_version(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, versions_of(1, tmp_path))
    syncer.sync()
    polls = [lambda: [forged(api, tmp_path, 999)], lambda: [api.message(2)]]
    api.add(2, versions_of(2, tmp_path))
    api.current = 1

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            batch = polls.pop(0)() if polls else []
            return {"Messages": [{"Body": json.dumps(b), "ReceiptHandle": "r"} for b in batch]}

        def delete_message_batch(self, **_: Any) -> None:
            pass

    daemon = Sidecar(syncer.cfg, api, Sqs())  # type: ignore[arg-type]
    daemon.syncer, daemon.queue_url, daemon.trust = syncer, "q", api.trust()
    first = daemon._poll(1)
    assert first is None, "the forged version is not vouched for"
    second = daemon._poll(1)
    assert second is not None and daemon._step(second)
    assert syncer.live_version() == 2 and on_disk(syncer) == [1, 2]
    assert "/v999" not in downloads
    assert daemon.metrics.announcements.labels(result="bad_signature")._value.get() == 1


def test_a_download_that_does_not_match_the_vouched_for_sha256_is_never_published(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    syncer.sync()
    api.add(2, versions_of(2, tmp_path), sha256="0" * 64)
    with pytest.raises(SyncError, match="failed verification"):
        syncer.sync(api.announced(2))
    assert syncer.live_version() == 1
    assert on_disk(syncer) == [1]
    assert list(syncer.downloads.iterdir()) == []
    assert syncer.metrics.refused.labels(reason="checksum")._value.get() == 2  # the announced URL, then the API's


def test_an_announced_url_pointing_at_other_bytes_falls_back_to_the_apis_url(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, versions_of(1, tmp_path))
    api.blobs[7] = versions_of(7, tmp_path)
    assert syncer.sync(api.announced(1, download_url="http://bundles.test/v7")) == 1
    assert downloads == ["/v7", "/v1"] and api.lookups == [1]
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 1\n"


def test_a_hostile_archive_with_a_matching_checksum_writes_nothing_outside(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ("ok.py", "../../escaped.py"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"x\n"))
    api.add(1, buf.getvalue())
    with pytest.raises(SyncError, match="refused"):
        syncer.sync()
    assert not syncer.cfg.link.exists()
    assert not list(tmp_path.rglob("escaped.py"))
    assert [p.name for p in syncer.versions.iterdir()] == []


# --- identity: number, sha256 and the deployment's id --------------------------------------


def test_a_live_version_of_another_deployment_id_is_replaced_by_the_current_one_even_if_lower(
    env: Any, tmp_path: Path
) -> None:
    """A stack recreated on the same sidecars numbers its versions from 1 again: v1 must replace v16."""
    syncer, api, _ = env
    api.add(16, versions_of(16, tmp_path), uid="aaaaaaaaaaaaaaaa")
    syncer.sync()
    assert syncer.live_version() == 16
    api.records.clear()
    api.current, api.uid = 0, UID
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync() == 1
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 1\n"
    installed = syncer.installed()
    assert installed is not None and installed.deployment_id == UID


def test_an_announcement_of_a_lower_version_from_the_new_deployment_id_is_installed(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(16, versions_of(16, tmp_path), uid="aaaaaaaaaaaaaaaa")
    syncer.sync()
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync(api.announced(1)) == 1


def test_a_live_version_the_api_does_not_know_is_replaced_by_the_current_one(env: Any, tmp_path: Path) -> None:
    """A table restored from a backup: the same deployment id, but v16 is gone and the current is v12."""
    syncer, api, _ = env
    api.add(16, versions_of(16, tmp_path))
    syncer.sync()
    del api.records[16]
    api.current = 0
    api.add(12, versions_of(12, tmp_path))
    assert syncer.sync() == 12
    assert api.lookups[-2:] == [None, 16], "it checked whether the API knows v16 before replacing it"
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 12\n"


def test_a_live_version_number_with_another_bundle_is_replaced(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(3, versions_of(3, tmp_path))
    syncer.sync()
    api.add(3, versions_of(30, tmp_path))  # v3 is now another bundle (restored and redeployed)
    assert syncer.sync(api.announced(3)) == 3
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 30\n"
    assert len(list(syncer.versions.glob("3-*"))) == 2, "each bundle in a folder of its own"


def test_versions_are_extracted_with_the_limits_they_were_validated_with(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    big = {"dag.py": "x = 1\n", "data.csv": "y" * 300_000}
    api.add(1, bundle_bytes(tmp_path / "big", big), limits=Limits(max_member_bytes=400_000))
    with pytest.MonkeyPatch.context() as mp:  # a sidecar whose own default would refuse that file
        mp.setattr(Limits.model_fields["max_member_bytes"], "default", 100_000)
        assert syncer.sync() == 1
    api.add(2, bundle_bytes(tmp_path / "big2", {**big, "dag.py": "x = 2\n"}), limits=Limits(max_member_bytes=200_000))
    with pytest.raises(SyncError, match="over the limit of 200000 bytes per file"):
        syncer.sync()
    assert syncer.live_version() == 1


# --- files ------------------------------------------------------------------------------------


def test_running_tasks_keep_their_files_when_a_new_version_is_published(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    syncer.sync()
    v1 = syncer.cfg.link.resolve()
    handle = (v1 / "dag.py").open()
    task = subprocess.Popen(["sleep", "30"], cwd=v1)
    try:
        api.add(2, versions_of(2, tmp_path))
        assert syncer.sync(api.announced(2)) == 2
        assert handle.read() == "VERSION = 1\n"
        assert (v1 / "dag.py").read_text() == "VERSION = 1\n"
        assert os.readlink(f"/proc/{task.pid}/cwd") == str(v1)
        assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 2\n"
    finally:
        handle.close()
        task.kill()
        task.wait()


def test_retention_keeps_the_newest_versions_and_never_the_live_one_is_removed(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    for i in (1, 2, 3, 4):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(api.announced(i))
    assert on_disk(syncer) == [3, 4]
    assert syncer.live_version() == 4


def test_the_live_version_is_kept_even_when_it_is_older_than_the_newest_keep(env: Any, tmp_path: Path) -> None:
    """A rollback serves an old bundle again; with it live, newer installs must never remove it."""
    syncer, api, _ = env  # keep=2
    for i in (1, 2):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(api.announced(i))
    live = syncer.versions / folder_name(1, api.records[1].sha256)
    syncer._publish(live)  # the link back on v1, as after a rollback to it
    for i in (3, 4):
        api.add(i, versions_of(i, tmp_path))
        syncer.prune_after_publish = False
        syncer._place(api.records[i], _extract(api, i, syncer), [], "bundle")
        syncer.prune()
    assert syncer.live_version() == 1
    assert 1 in on_disk(syncer) and (syncer.cfg.link / "dag.py").read_text() == "VERSION = 1\n"
    assert on_disk(syncer) == [1, 3, 4]


def _extract(api: FakeApi, version: int, syncer: Syncer) -> Path:
    from chalicelib.bundle import extract_bundle

    tmp = syncer.versions / f".tmp-x{version}"
    extract_bundle(io.BytesIO(api.blobs[version]), tmp)
    return tmp


def test_prepare_removes_leftovers_of_an_interrupted_sync(env: Any) -> None:
    syncer, _, _ = env
    (syncer.versions / ".tmp-7-0123456789abcdef" / "sub").mkdir(parents=True)
    (syncer.downloads / "7-0123456789abcdef.part").write_bytes(b"partial")
    stale_link = syncer.cfg.link.parent / f".{syncer.cfg.link.name}.tmp-123"
    os.symlink("nowhere", stale_link)
    syncer.prepare()
    assert not (syncer.versions / ".tmp-7-0123456789abcdef").exists()
    assert list(syncer.downloads.iterdir()) == []
    assert not os.path.lexists(stale_link)


def test_once_without_any_version_says_there_is_nothing_yet(env: Any) -> None:
    syncer, _, _ = env
    with pytest.raises(SyncError, match="no version to sync yet"):
        syncer.sync()


def test_unchanged_files_are_hard_linked_from_the_live_version_and_changed_ones_written(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, bundle_bytes(tmp_path / "s1", {"same.py": "x = 1\n", "edit.py": "v = 1\n", "gone.sql": "select 1;\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {"same.py": "x = 1\n", "edit.py": "v = 2\n", "new.py": "n = 1\n"}))
    syncer.sync(api.announced(1))
    syncer.sync(api.announced(2))
    v1, v2 = (syncer.versions / folder_name(i, api.records[i].sha256) for i in (1, 2))
    assert (v1 / "same.py").stat().st_ino == (v2 / "same.py").stat().st_ino
    assert (v1 / "edit.py").stat().st_ino != (v2 / "edit.py").stat().st_ino
    assert files_of_dir(v2) == {"same.py": b"x = 1\n", "edit.py": b"v = 2\n", "new.py": b"n = 1\n"}
    assert files_of_dir(v1) == {"same.py": b"x = 1\n", "edit.py": b"v = 1\n", "gone.sql": b"select 1;\n"}


def test_a_version_without_a_saved_manifest_is_extracted_in_full(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, bundle_bytes(tmp_path / "s1", {"same.py": "x = 1\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {"same.py": "x = 1\n", "b.py": "y = 2\n"}))
    syncer.sync(api.announced(1))
    v1 = folder_name(1, api.records[1].sha256)
    (syncer.manifests / f"{v1}.json").unlink()
    syncer.sync(api.announced(2))
    v2 = folder_name(2, api.records[2].sha256)
    assert (syncer.versions / v1 / "same.py").stat().st_ino != (syncer.versions / v2 / "same.py").stat().st_ino
    assert (syncer.cfg.link / "same.py").read_text() == "x = 1\n"


def files_of_dir(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


MANY = {f"dags/team_{i % 3}/dag_{i}.py": f"DAG_ID = 'dag_{i}'\n" for i in range(12)}


def test_a_version_with_a_delta_against_the_live_one_is_built_from_it(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", {**MANY, "gone.sql": "select 1;\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n", "new.py": "n = 1\n"}))
    api.add_delta(2, base=1)
    syncer.sync(api.announced(1))
    assert syncer.sync(api.announced(2)) == 2
    assert downloads == ["/v1", "/d2"] and api.lookups == [], "built from the delta, with no API lookup"
    v1, v2 = (syncer.versions / folder_name(i, api.records[i].sha256) for i in (1, 2))
    want = {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n", "new.py": "n = 1\n"}
    assert files_of_dir(v2) == {k: v.encode() for k, v in want.items()}
    assert (v1 / "dags/team_1/dag_1.py").stat().st_ino == (v2 / "dags/team_1/dag_1.py").stat().st_ino
    saved = json.loads((syncer.manifests / f"{v2.name}.json").read_text())
    assert (saved["version"], saved["sha256"], saved["deployment_id"]) == (2, api.records[2].sha256, UID)
    assert saved["files"] == json.loads(json.dumps(sorted(
        ({"path": k, "size": len(v), "sha256": hashlib.sha256(v.encode()).hexdigest()} for k, v in want.items()),
        key=lambda e: e["path"])))
    assert syncer.metrics.fetches.labels(kind="delta")._value.get() == 1
    assert sorted(p.name for p in syncer.downloads.iterdir()) == []


def test_a_delta_that_fails_verification_falls_back_to_the_whole_bundle(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", MANY))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n"}))
    api.add_delta(2, base=1, sha256="0" * 64)
    syncer.sync(api.announced(1))
    assert syncer.sync(api.announced(2)) == 2
    assert downloads == ["/v1", "/d2", "/v2"]
    assert (syncer.cfg.link / "dags/team_0/dag_0.py").read_text() == "DAG_ID = 'changed'\n"
    assert syncer.metrics.fetches.labels(kind="delta_refused")._value.get() == 1
    assert not list(syncer.versions.glob(".tmp-*")) and not list(syncer.downloads.iterdir())


def test_a_delta_whose_result_differs_from_the_version_falls_back_to_the_whole_bundle(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", MANY))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n"}))
    api.add_delta(2, base=1, removed=["dags/team_1/dag_1.py"])  # would drop a file the version has
    syncer.sync(api.announced(1))
    assert syncer.sync(api.announced(2)) == 2
    assert downloads == ["/v1", "/d2", "/v2"]
    assert (syncer.cfg.link / "dags/team_1/dag_1.py").read_text() == "DAG_ID = 'dag_1'\n"


@pytest.mark.parametrize("base", ["another-number", "another-bundle"])
def test_a_delta_against_anything_but_exactly_the_live_version_is_not_used(env: Any, tmp_path: Path, base: str) -> None:
    syncer, api, downloads = env
    for v in (1, 2, 3):
        api.add(v, bundle_bytes(tmp_path / f"s{v}", {**MANY, "v.py": f"v = {v}\n"}))
    if base == "another-number":
        api.add_delta(3, base=2)
    else:
        api.add_delta(3, base=1, base_sha256="0" * 64)
    syncer.sync(api.announced(1))
    assert syncer.sync(api.announced(3)) == 3
    assert downloads == ["/v1", "/v3"]
    assert (syncer.cfg.link / "v.py").read_text() == "v = 3\n"


def test_an_announcement_with_a_download_url_needs_no_api_lookup(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync(api.announced(1)) == 1
    assert api.lookups == [] and downloads == ["/v1"]


# --- the daemon ------------------------------------------------------------------------------


class DaemonApi(FakeApi):
    """FakeApi with the sidecar routes: registration hands out a secret and the trust material."""

    def __init__(self, base: FakeApi, events: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(base.signer)
        self.records, self.blobs, self.deltas, self.current = base.records, base.blobs, base.deltas, base.current
        self.events = events if events is not None else []
        self.registrations = 0

    def register_sidecar(self, deployment: str, name: str, component: str, secret: str | None = None) -> dict[str, Any]:
        self.registrations += 1
        self.events.append(("register", secret))
        return {"queue_url": "q", "secret": f"secret-{self.registrations}", "deployment_id": self.uid,
                "signing_keys": [{"key_id": self.signer.key_id, "algorithm": "x", "public_key": self.signer.public_key_pem}]}

    def heartbeat(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> dict[str, Any]:
        self.events.append(("heartbeat", {**body, "secret": secret}))
        return {}

    def deregister_sidecar(self, deployment: str, name: str, secret: str | None) -> None:
        self.events.append(("deregister", secret))


def daemon_for(syncer: Syncer, api: DaemonApi, sqs: Any) -> Sidecar:
    daemon = Sidecar(syncer.cfg, api, sqs)  # type: ignore[arg-type]
    daemon.syncer = syncer
    syncer.api = api  # type: ignore[assignment]
    return daemon


def test_a_poll_shortly_before_a_heartbeat_still_long_polls(env: Any) -> None:
    syncer, api, _ = env
    waits: list[int] = []

    class RecordingSqs:
        def receive_message(self, **kwargs: Any) -> dict[str, Any]:
            waits.append(kwargs["WaitTimeSeconds"])
            return {}

    daemon = Sidecar(syncer.cfg, api, RecordingSqs())  # type: ignore[arg-type]
    daemon.queue_url = "q"
    for wait in (0.0, 0.3, 0.999, 19.2, 45.0):
        daemon._poll(wait)
    assert waits == [1, 1, 1, 20, 20], "WaitTimeSeconds=0 would return at once and spin"


def test_after_an_announced_sync_it_reports_first_its_exact_version_with_its_secret(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat right after a swap carries the version's number, sha256 and deployment id and the
    announcement's arrival time, with the sidecar's own secret, and goes out before anything else."""
    import dagcast.sidecar as sidecar_module

    syncer, base, _ = env
    events: list[tuple[str, Any]] = []
    monkeypatch.setattr(sidecar_module, "_now_ms", lambda: 4242)
    api = DaemonApi(base, events)

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            if any(e[0] == "receive" for e in events):
                daemon.stop.set()
                return {}
            events.append(("receive", None))
            api.add(1, versions_of(1, tmp_path))
            return {"Messages": [{"Body": json.dumps(api.message(1)), "ReceiptHandle": "r1"}]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            events.append(("delete", [e["ReceiptHandle"] for e in Entries]))

    syncer.cfg.resync_interval = 3600
    daemon = daemon_for(syncer, api, Sqs())
    daemon.run()
    kinds = [kind for kind, _ in events]
    after = kinds[kinds.index("receive") + 1:]
    assert after[:2] == ["heartbeat", "delete"], kinds
    report = events[kinds.index("receive") + 1][1]
    assert (report["version"], report["sha256"], report["deployment_id"]) == (1, api.records[1].sha256, UID)
    assert report["secret"] == "secret-1" and report["last_notified_at"] == 4242
    assert report["last_sync_at"] is not None and report["last_sync_at"] == syncer.published_at
    assert events[-1] == ("deregister", "secret-1")


def test_the_secret_is_kept_private_and_presented_when_it_registers_again(env: Any) -> None:
    syncer, base, _ = env
    api = DaemonApi(base)

    class Quiet:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            daemon.stop.set()
            return {}

    for _ in range(2):
        daemon = daemon_for(syncer, api, Quiet())
        daemon.run()
    secret_file = syncer.cfg.root / "sidecars" / "t.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text() == "secret-2"
    assert [e for e in api.events if e[0] == "register"] == [("register", None), ("register", "secret-1")]


def test_against_an_older_api_the_heartbeat_leaves_the_notification_time_out(env: Any) -> None:
    syncer, base, _ = env
    sent: list[dict[str, Any]] = []

    class OlderApi(DaemonApi):
        def heartbeat(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> dict[str, Any]:
            sent.append(dict(body))
            if "last_notified_at" in body:
                raise ApiError(400, "invalid_request", "invalid request body: last_notified_at: Extra inputs are not permitted")
            return {}

    daemon = Sidecar(syncer.cfg, OlderApi(base), None)  # type: ignore[arg-type]
    daemon.last_notified_at = 5
    daemon._heartbeat()
    daemon._heartbeat()
    assert ["last_notified_at" in body for body in sent] == [True, False, False]


def test_a_reconcile_that_finds_nothing_new_sends_no_extra_heartbeat(env: Any, tmp_path: Path) -> None:
    syncer, base, _ = env
    base.add(1, versions_of(1, tmp_path))
    api = DaemonApi(base)
    polls: list[int] = []

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            polls.append(1)
            if len(polls) == 5:
                daemon.stop.set()
            return {}

    syncer.cfg.resync_interval = 1e-9  # a reconcile on every pass of the loop
    daemon = daemon_for(syncer, api, Sqs())
    daemon.run()
    beats = [e[1]["version"] for e in api.events if e[0] == "heartbeat"]
    assert len(polls) == 5 and len(api.lookups) >= 5, "it reconciled on every pass"
    assert beats == [1], "one report of v1; the reconciles that found nothing new sent none"


def test_before_the_first_deploy_a_sidecar_is_waiting_not_failing(env: Any) -> None:
    syncer, base, _ = env
    api = DaemonApi(base)

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            daemon.stop.set()
            return {}

    daemon = daemon_for(syncer, api, Sqs())
    daemon.run()
    assert daemon.waiting and daemon.failures == 0 and daemon.last_error is None
    assert daemon.metrics.syncs.labels(result="error")._value.get() == 0


def test_the_daemon_removes_old_versions_only_after_it_reported_the_new_one_and_the_queue_is_quiet(
    env: Any, tmp_path: Path
) -> None:
    """Removing a large old version takes seconds; `dagcast deploy --wait` should not wait for it."""
    syncer, base, _ = env  # keep=2
    for i in (1, 2):
        base.add(i, versions_of(i, tmp_path))
        syncer.sync(base.announced(i))
    on_disk_at_report: list[list[int]] = []

    class Api(DaemonApi):
        def heartbeat(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> dict[str, Any]:
            on_disk_at_report.append(on_disk(syncer))
            return {}

    api = Api(base)
    received: list[int] = []
    on_disk_at_idle_poll: list[list[int]] = []
    idle_waits: list[int] = []

    class Sqs:
        def receive_message(self, **kw: Any) -> dict[str, Any]:
            if received:
                on_disk_at_idle_poll.append(on_disk(syncer))
                idle_waits.append(kw["WaitTimeSeconds"])
                daemon.stop.set()
                return {}
            received.append(1)
            api.add(3, versions_of(3, tmp_path))
            return {"Messages": [{"Body": json.dumps(api.message(3)), "ReceiptHandle": "r3"}]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            pass

    syncer.cfg.resync_interval = 3600
    daemon = daemon_for(syncer, api, Sqs())
    daemon.run()
    assert on_disk_at_report[-1] == [1, 2, 3], "v3 reported before v1 was removed"
    assert on_disk_at_idle_poll == [[1, 2, 3]], "removed only once a poll came back empty"
    assert idle_waits == [2], "a pending removal shortens the next long poll"
    assert on_disk(syncer) == [2, 3]
    assert syncer.live_version() == 3


# --- guarantees: pruning, atomic swaps, backoff ----------------------------------------------


def test_an_old_version_made_live_again_is_never_pruned_though_newer_ones_fill_keep(env: Any, tmp_path: Path) -> None:
    """v1 stays on disk while a reader holds it; a table restored from a backup then makes v1 current
    again, so v1 is live but older than the --keep (2) newest folders. Neither the prune right after
    that swap (a lease still protects v1) nor the daemon's later one (no lease: only the live guard)
    may remove it."""
    from dagcast.lease import Lease

    syncer, api, _ = env  # keep=2
    api.add(1, versions_of(1, tmp_path))
    syncer.sync(api.announced(1))
    v1 = folder_name(1, api.records[1].sha256)
    reader = Lease(syncer.cfg.root, v1)
    reader.acquire()
    for i in (2, 3):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(api.announced(i))
    assert on_disk(syncer) == [1, 2, 3]
    for i in (2, 3):  # the restored table knows v1 only
        del api.records[i]
    api.current = 1
    assert syncer.sync() == 1
    assert os.readlink(syncer.cfg.link).endswith(v1) and on_disk(syncer) == [1, 2, 3]
    reader.release()
    syncer.prune()  # the daemon's prune once the queue is quiet: v1 is now the oldest folder, beyond keep
    assert syncer.live_version() == 1 and on_disk(syncer) == [1, 2, 3]
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 1\n"
    api.add(4, versions_of(4, tmp_path))
    assert syncer.sync() == 4
    assert on_disk(syncer) == [3, 4], "once v1 is not live, pruning removes it like any other"


SWAP_READER = r"""
import json, os, sys
link, stop = sys.argv[1], sys.argv[2]
reads, seen, errors = 0, set(), []
print("ready", flush=True)
while not os.path.exists(stop) and len(errors) < 20:
    reads += 1
    try:
        target = os.readlink(link)
        with open(os.path.join(link, "dag.py")) as f:
            through_link = f.read()
        folder = os.path.join(os.path.dirname(link), target)
        with open(os.path.join(folder, "dag.py")) as f:
            dag = f.read()
        with open(os.path.join(folder, "sql", "q.sql")) as f:
            sql = f.read()
    except OSError as exc:
        errors.append(repr(exc))
        continue
    number = int(os.path.basename(target).split("-")[0])
    if through_link not in ("VERSION = 1\n", "VERSION = 2\n"):
        errors.append(f"read through the link: {through_link!r}")
    if (dag, sql) != (f"VERSION = {number}\n", f"select {number};\n"):
        errors.append(f"{target} holds a mix: {dag!r} {sql!r}")
    seen.add(number)
print(json.dumps({"reads": reads, "seen": sorted(seen), "errors": errors}), flush=True)
"""


def test_a_reader_looping_over_the_link_during_many_swaps_never_sees_it_missing_or_a_mix(env: Any, tmp_path: Path) -> None:
    """Another process resolves the link and reads through it while the link moves between two versions
    thousands of times: the rename of a temp symlink over the link is atomic, so every look finds a link
    and a complete version (an unlink then symlink would show ENOENT in between)."""
    import sys

    syncer, api, _ = env
    folders = []
    for i in (1, 2):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(api.announced(i))
        folders.append(syncer.versions / folder_name(i, api.records[i].sha256))
    stop = tmp_path / "stop-reading"
    reader = subprocess.Popen([sys.executable, "-c", SWAP_READER, str(syncer.cfg.link), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        for n in range(3000):
            syncer._publish(folders[n % 2])
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    result = json.loads(out)
    assert result["errors"] == [], result["errors"][:5]
    assert result["seen"] == [1, 2], "the reader was reading while the link moved"


@pytest.mark.parametrize("answer", ["missing-deployment", "not-the-api"])
def test_a_deployment_that_does_not_exist_is_an_error_not_a_first_deploy_to_wait_for(env: Any, answer: str) -> None:
    """Only the API's own "no version yet" means waiting; a typo in the deployment's name (or a URL that
    is not the API) must fail `--once` and count as a failure in the daemon, with the real reason."""
    from dagcast.sidecar import NoVersionYet

    syncer, base, _ = env
    error = (ApiError(404, "not_found", "deployment 'typo' does not exist") if answer == "missing-deployment"
             else ApiError(404, "not_dagcast", "<html>404 Not Found</html>", from_dagcast=False))

    class Api(DaemonApi):
        def get_version(self, deployment: str, version: int | None) -> dict[str, Any]:
            raise error

    with pytest.raises(SyncError, match="cannot look up version current") as raised:
        Syncer(syncer.cfg, Api(base)).sync()  # type: ignore[arg-type]
    assert not isinstance(raised.value, NoVersionYet)
    daemon = daemon_for(syncer, Api(base), None)
    assert daemon._step(None) is True
    assert not daemon.waiting and daemon.failures == 1 and "404" in (daemon.last_error or "")
    assert daemon.health() == (False, f"no version live yet: {daemon.last_error}")


def test_failed_queue_polls_back_off_on_their_own_count_up_to_a_bound_and_a_good_poll_resets_it(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQS unreachable while the API is fine: each failed poll waits longer than the one before, up to
    1 s + backoff's cap, whatever the sync failures are; a poll that works starts the count again."""
    from botocore.exceptions import EndpointConnectionError

    import dagcast.sidecar as sidecar_module

    syncer, api, _ = env
    monkeypatch.setattr(sidecar_module, "backoff", lambda attempt: min(5.0, 0.2 * 2**attempt))  # jitter's upper bound
    outcomes = ["down"] * 8 + ["up"] + ["down"]

    class FlakySqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            if outcomes.pop(0) == "down":
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
            return {}

    daemon = Sidecar(syncer.cfg, api, FlakySqs())  # type: ignore[arg-type]
    daemon.queue_url = "q"
    daemon.failures = 4  # syncs failing too (the API is not what the queue's backoff is about)
    waits: list[float] = []
    monkeypatch.setattr(daemon.stop, "wait", waits.append)
    for _ in range(10):
        assert daemon._poll(20) is None
    assert waits == pytest.approx([1.2, 1.4, 1.8, 2.6, 4.2, 6.0, 6.0, 6.0, 1.2])
    assert daemon.poll_failures == 1 and daemon.failures == 4
    outcomes.append("down")
    daemon._poll(0.5)
    assert waits[-1] == 0.5, "never past the next heartbeat or reconcile"


def test_a_failed_sync_is_reported_with_its_error_counted_and_cleared_by_the_next_good_one(env: Any, tmp_path: Path) -> None:
    syncer, base, _ = env
    base.add(1, versions_of(1, tmp_path))
    blob = base.blobs.pop(1)  # its download URL now answers 403 (expired)
    api = DaemonApi(base)
    daemon = daemon_for(syncer, api, None)
    daemon._register()
    for n in (1, 2):
        assert daemon._step(None) is True, "an error is reported at once"
        daemon._report()
        beat = api.events[-1][1]
        assert beat["version"] == 0 and "cannot download v1" in beat["last_error"] and beat["secret"] == "secret-1"
        assert daemon.failures == n and daemon.metrics.failures._value.get() == n
        assert syncer.metrics.syncs.labels(result="error")._value.get() == n
    base.blobs[1] = blob
    assert daemon._step(None) is True
    daemon._report()
    beat = api.events[-1][1]
    assert (beat["version"], beat["last_error"]) == (1, None)
    assert daemon.failures == 0 and daemon.metrics.failures._value.get() == 0


def test_a_heartbeat_answered_not_registered_registers_again_and_reconciles(env: Any) -> None:
    """The janitor or an admin removed its registration: the next heartbeat's 404 makes it register
    again (presenting its saved secret) and look at the API at once; it then reports under the new secret."""
    syncer, base, _ = env

    class Forgotten(DaemonApi):
        def heartbeat(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> dict[str, Any]:
            super().heartbeat(deployment, name, body, secret)
            if secret == "secret-1":
                raise ApiError(404, "not_found", "sidecar 't' is not registered in 'd'; register it first")
            return {}

    api = Forgotten(base)
    daemon = daemon_for(syncer, api, None)
    daemon._register()
    daemon._heartbeat()
    assert api.registrations == 2 and daemon.secret == "secret-2" and daemon._reconcile_now
    daemon._heartbeat()
    assert [(kind, e if kind == "register" else e["secret"]) for kind, e in api.events] == [
        ("register", None), ("heartbeat", "secret-1"), ("register", "secret-1"), ("heartbeat", "secret-2")]


def test_the_live_manifest_is_read_from_disk_once_until_it_is_replaced(env: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync() == 1
    live = syncer.installed()
    assert live is not None
    path = syncer.manifests / f"{live.folder}.json"
    reads: list[str] = []
    read_bytes = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    for _ in range(3):  # a sync's look, a heartbeat, a health check
        assert syncer.installed() == live
        assert syncer.files_of(live.folder) == {"dag.py": ANY, "sql/q.sql": ANY}
    assert reads in ([], [path.name])  # at most once (the sync itself may have read it already)
    before = len(reads)
    # replaced (as _save_manifest does): read again, and what it says now is what is returned
    doc = json.loads(read_bytes(path))
    doc["deployment_id"] = "0" * len(doc["deployment_id"])
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    assert syncer.installed().deployment_id == "0" * len(doc["deployment_id"])  # type: ignore[union-attr]
    assert syncer.files_of(live.folder) == {"dag.py": ANY, "sql/q.sql": ANY}
    assert len(reads) == before + 1


def test_what_the_next_sync_reuses_is_made_once_per_live_version_and_again_when_its_manifest_changes(
    env: Any, tmp_path: Path
) -> None:
    """At 10,000 files the live version's reuse map (and the folders its files are in) takes tens of
    milliseconds: warm() makes it while nothing waits, and the next delta sync takes it as it is."""
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync() == 1
    syncer.warm()
    reuse = syncer._reuse()
    assert reuse is not None and syncer._reuse() is reuse
    assert reuse.files == {"dag.py": (ANY, ANY), "sql/q.sql": (ANY, ANY)}
    assert reuse.present == {"dag.py", "sql", "sql/q.sql"}
    live = syncer.installed()
    assert live is not None
    path = syncer.manifests / f"{live.folder}.json"
    doc = json.loads(path.read_bytes())
    doc["files"] = [f for f in doc["files"] if f["path"] == "dag.py"]
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    again = syncer._reuse()
    assert again is not reuse and again is not None and set(again.files) == {"dag.py"}
    assert syncer.files_of(live.folder) == {"dag.py": ANY}
