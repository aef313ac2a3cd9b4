"""The sidecar's sync step on real files, with the API and bundle downloads faked in memory."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from chalicelib.bundle import write_bundle
from chalicelib.delta import DeltaCollector
from chalicelib.validation import validate_stream
from dagcast.exceptions import ApiError, SyncError
from dagcast.sidecar import Sidecar, SidecarConfig, Syncer


def bundle_bytes(tmp: Path, files: dict[str, str]) -> bytes:
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    buf = io.BytesIO()
    write_bundle(tmp, list(files), buf)
    return buf.getvalue()


class FakeApi:
    """Plays the control API: versions with sha256 and a download URL served by `transport`."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}
        self.sha: dict[int, str] = {}
        self.deltas: dict[int, tuple[dict[str, Any], bytes]] = {}  # version -> (record's delta, archive)
        self.current = 0
        self.lookups: list[int | None] = []

    def add(self, version: int, blob: bytes, sha256: str | None = None) -> None:
        self.blobs[version] = blob
        self.sha[version] = sha256 or hashlib.sha256(blob).hexdigest()
        self.current = max(self.current, version)

    def get_version(self, deployment: str, version: int | None) -> dict[str, Any]:
        self.lookups.append(version)
        v = self.current if version is None else version
        if v not in self.blobs:
            raise ApiError(404, "not_found", "no such version")
        record = {"version": v, "sha256": self.sha[v], "created_at": 0, "deploy_id": f"d{v}", "key": "k", "size": 1}
        if v in self.deltas:
            record["delta"] = self.deltas[v][0]
            return {"version": record, "download_url": f"http://bundles.test/v{v}", "delta_url": f"http://bundles.test/d{v}"}
        return {"version": record, "download_url": f"http://bundles.test/v{v}"}

    def add_delta(self, version: int, base: int, **record: Any) -> None:
        """Build version's delta against base the way the ingest function does."""
        base_report = validate_stream(io.BytesIO(self.blobs[base]), check_python=False)
        collector = DeltaCollector({f.path: f.sha256 for f in base_report.manifest})
        report = validate_stream(io.BytesIO(self.blobs[version]), check_python=False, collect=collector)
        built = collector.build(report.manifest, report.bytes * 4)
        assert built is not None
        delta = {"base_version": base, "key": "dk", "sha256": built.sha256, "size": len(built.data), "files": built.files,
                 "removed": built.removed, "files_sha256": built.files_sha256, **record}
        self.deltas[version] = (delta, built.data)


@pytest.fixture
def env(tmp_path: Path) -> tuple[Syncer, FakeApi, list[str]]:
    api = FakeApi()
    downloads: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        downloads.append(request.url.path)
        kind, n = request.url.path[1], int(request.url.path[2:])
        return httpx.Response(200, content=api.blobs[n] if kind == "v" else api.deltas[n][1])

    cfg = SidecarConfig(name="t", root=tmp_path / "root", link=tmp_path / "dags", deployment="d", keep=2)
    syncer = Syncer(cfg, api, http=httpx.Client(transport=httpx.MockTransport(handler)))  # type: ignore[arg-type]
    syncer.prepare()
    return syncer, api, downloads


def versions_of(i: int, tmp_path: Path) -> bytes:
    src = tmp_path / f"src{i}"
    return bundle_bytes(src, {"dag.py": f"VERSION = {i}\n", "sql/q.sql": f"select {i};\n"})


def test_publishes_a_version_behind_a_relative_link(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    assert syncer.sync(None) == 1
    link = syncer.cfg.link
    assert os.readlink(link) == os.path.relpath(syncer.versions / "1", link.parent)
    assert (link / "dag.py").read_text() == "VERSION = 1\n"
    assert syncer.live_version() == 1


def test_older_equal_and_duplicate_announcements_never_go_backwards_or_download_twice(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    for i in (1, 2):
        api.add(i, versions_of(i, tmp_path))
    assert syncer.sync(2) == 2
    assert syncer.sync(1) is None
    assert syncer.sync(2) is None
    assert syncer.sync(None) is None
    assert downloads == ["/v2"]
    assert syncer.live_version() == 2


def test_poll_takes_the_highest_announced_version_and_every_message_is_deleted_after(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env

    class FakeSqs:
        deleted: list[str] = []

        def receive_message(self, **_: Any) -> dict[str, Any]:
            bodies = ['{"deployment": "d", "version": 3}', '{"deployment": "d", "version": 1}',
                      '{"deployment": "d", "version": 3}', 'not json', '{"deployment": "other", "version": 9}']
            return {"Messages": [{"Body": b, "ReceiptHandle": f"r{i}"} for i, b in enumerate(bodies)]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            self.deleted.extend(e["ReceiptHandle"] for e in Entries)

    sqs = FakeSqs()
    daemon = Sidecar(syncer.cfg, api, sqs)  # type: ignore[arg-type]
    daemon.queue_url = "q"
    announced = daemon._poll(0)
    assert announced is not None and announced["version"] == 3
    assert sqs.deleted == [], "messages are deleted after the sync, off the critical path"
    daemon._delete_received()
    assert sorted(sqs.deleted) == ["r0", "r1", "r2", "r3", "r4"]


def test_a_bundle_failing_verification_is_never_published(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    syncer.sync(None)
    api.add(2, versions_of(2, tmp_path), sha256="0" * 64)
    with pytest.raises(SyncError, match="failed verification"):
        syncer.sync(2)
    assert syncer.live_version() == 1
    assert sorted(p.name for p in syncer.versions.iterdir()) == ["1"]
    assert list(syncer.downloads.iterdir()) == []


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
        syncer.sync(None)
    assert not syncer.cfg.link.exists()
    assert not list(tmp_path.rglob("escaped.py"))
    assert [p.name for p in syncer.versions.iterdir()] == []


def test_running_tasks_keep_their_files_when_a_new_version_is_published(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    syncer.sync(None)
    v1 = syncer.cfg.link.resolve()
    handle = (v1 / "dag.py").open()
    task = subprocess.Popen(["sleep", "30"], cwd=v1)
    try:
        api.add(2, versions_of(2, tmp_path))
        assert syncer.sync(2) == 2
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
        syncer.sync(i)
    assert sorted(p.name for p in syncer.versions.iterdir()) == ["3", "4"]
    assert syncer.live_version() == 4


def test_prepare_removes_leftovers_of_an_interrupted_sync(env: Any) -> None:
    syncer, _, _ = env
    (syncer.versions / ".tmp-7" / "sub").mkdir(parents=True)
    (syncer.downloads / "7.part").write_bytes(b"partial")
    stale_link = syncer.cfg.link.parent / f".{syncer.cfg.link.name}.tmp-123"
    os.symlink("nowhere", stale_link)
    syncer.prepare()
    assert not (syncer.versions / ".tmp-7").exists()
    assert list(syncer.downloads.iterdir()) == []
    assert not os.path.lexists(stale_link)


def test_once_without_any_version_is_a_clear_error(env: Any) -> None:
    syncer, _, _ = env
    with pytest.raises(SyncError, match="no version to sync yet"):
        syncer.sync(None)


def test_unchanged_files_are_hard_linked_from_the_live_version_and_changed_ones_written(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, bundle_bytes(tmp_path / "s1", {"same.py": "x = 1\n", "edit.py": "v = 1\n", "gone.sql": "select 1;\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {"same.py": "x = 1\n", "edit.py": "v = 2\n", "new.py": "n = 1\n"}))
    syncer.sync(1)
    syncer.sync(2)
    v1, v2 = syncer.versions / "1", syncer.versions / "2"
    assert (v1 / "same.py").stat().st_ino == (v2 / "same.py").stat().st_ino
    assert (v1 / "edit.py").stat().st_ino != (v2 / "edit.py").stat().st_ino
    assert files_of_dir(v2) == {"same.py": b"x = 1\n", "edit.py": b"v = 2\n", "new.py": b"n = 1\n"}
    assert files_of_dir(v1) == {"same.py": b"x = 1\n", "edit.py": b"v = 1\n", "gone.sql": b"select 1;\n"}


def test_a_version_without_a_saved_manifest_is_extracted_in_full(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, bundle_bytes(tmp_path / "s1", {"same.py": "x = 1\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {"same.py": "x = 1\n", "b.py": "y = 2\n"}))
    syncer.sync(1)
    (syncer.manifests / "1.json").unlink()
    syncer.sync(2)
    assert (syncer.versions / "1" / "same.py").stat().st_ino != (syncer.versions / "2" / "same.py").stat().st_ino
    assert (syncer.cfg.link / "same.py").read_text() == "x = 1\n"


def files_of_dir(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


MANY = {f"dags/team_{i % 3}/dag_{i}.py": f"DAG_ID = 'dag_{i}'\n" for i in range(12)}


def test_a_version_with_a_delta_against_the_live_one_is_built_from_it(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", {**MANY, "gone.sql": "select 1;\n"}))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n", "new.py": "n = 1\n"}))
    api.add_delta(2, base=1)
    syncer.sync(1)
    assert syncer.sync(2) == 2
    assert downloads == ["/v1", "/d2"]
    v1, v2 = syncer.versions / "1", syncer.versions / "2"
    want = {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n", "new.py": "n = 1\n"}
    assert files_of_dir(v2) == {k: v.encode() for k, v in want.items()}
    assert (v1 / "dags/team_1/dag_1.py").stat().st_ino == (v2 / "dags/team_1/dag_1.py").stat().st_ino
    assert json.loads((syncer.manifests / "2.json").read_text()) == json.loads(json.dumps(sorted(
        ({"path": k, "size": len(v), "sha256": hashlib.sha256(v.encode()).hexdigest()} for k, v in want.items()),
        key=lambda e: e["path"])))
    assert syncer.metrics.fetches.labels(kind="delta")._value.get() == 1
    assert sorted(p.name for p in syncer.downloads.iterdir()) == []


def test_a_delta_that_fails_verification_falls_back_to_the_whole_bundle(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", MANY))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n"}))
    api.add_delta(2, base=1, sha256="0" * 64)
    syncer.sync(1)
    assert syncer.sync(2) == 2
    assert downloads == ["/v1", "/d2", "/v2"]
    assert (syncer.cfg.link / "dags/team_0/dag_0.py").read_text() == "DAG_ID = 'changed'\n"
    assert syncer.metrics.fetches.labels(kind="delta_refused")._value.get() == 1
    assert not list(syncer.versions.glob(".tmp-*")) and not list(syncer.downloads.iterdir())


def test_a_delta_whose_result_differs_from_the_version_falls_back_to_the_whole_bundle(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", MANY))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "dags/team_0/dag_0.py": "DAG_ID = 'changed'\n"}))
    api.add_delta(2, base=1, removed=["dags/team_1/dag_1.py"])  # would drop a file the version has
    syncer.sync(1)
    assert syncer.sync(2) == 2
    assert downloads == ["/v1", "/d2", "/v2"]
    assert (syncer.cfg.link / "dags/team_1/dag_1.py").read_text() == "DAG_ID = 'dag_1'\n"


def test_a_delta_against_another_version_than_the_live_one_is_not_used(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    for v in (1, 2, 3):
        api.add(v, bundle_bytes(tmp_path / f"s{v}", {**MANY, "v.py": f"v = {v}\n"}))
    api.add_delta(3, base=2)
    syncer.sync(1)
    assert syncer.sync(3) == 3
    assert downloads == ["/v1", "/v3"]
    assert (syncer.cfg.link / "v.py").read_text() == "v = 3\n"


def test_an_announcement_with_a_delta_url_builds_from_the_delta_with_no_api_lookup(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, bundle_bytes(tmp_path / "s1", MANY))
    api.add(2, bundle_bytes(tmp_path / "s2", {**MANY, "x.py": "x = 1\n"}))
    api.add_delta(2, base=1)
    syncer.sync(1)
    announced = {"deployment": "d", "version": 2, "sha256": api.sha[2], "download_url": "http://bundles.test/v2",
                 "delta": api.deltas[2][0], "delta_url": "http://bundles.test/d2"}
    assert syncer.sync(2, announced) == 2
    assert api.lookups == [1] and downloads == ["/v1", "/d2"]
    assert (syncer.cfg.link / "x.py").read_text() == "x = 1\n"


def test_an_announcement_with_a_download_url_needs_no_api_lookup(env: Any, tmp_path: Path) -> None:
    syncer, api, downloads = env
    api.add(1, versions_of(1, tmp_path))
    announced = {"deployment": "d", "version": 1, "sha256": api.sha[1], "download_url": "http://bundles.test/v1"}
    assert syncer.sync(1, announced) == 1
    assert api.lookups == [] and downloads == ["/v1"]


def test_an_announcement_with_a_bad_checksum_falls_back_to_the_version_record(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    announced = {"deployment": "d", "version": 1, "sha256": "0" * 64, "download_url": "http://bundles.test/v1"}
    assert syncer.sync(1, announced) == 1
    assert api.lookups == [1]
    assert (syncer.cfg.link / "dag.py").read_text() == "VERSION = 1\n"


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


def test_after_an_announced_sync_it_reports_first_with_when_the_announcement_arrived(
    env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat right after a swap carries the version and the announcement's arrival time (the API
    keeps both on the deploy), and goes out before anything else, messages deleted after it."""
    import dagcast.sidecar as sidecar_module

    syncer, api, _ = env
    events: list[tuple[str, Any]] = []
    blob = versions_of(1, tmp_path)
    monkeypatch.setattr(sidecar_module, "_now_ms", lambda: 4242)

    class Api(FakeApi):
        def register_sidecar(self, deployment: str, name: str, component: str) -> dict[str, Any]:
            return {"queue_url": "q"}

        def heartbeat(self, deployment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            events.append(("heartbeat", dict(body)))
            return {}

        def deregister_sidecar(self, deployment: str, name: str) -> None:
            events.append(("deregister", None))

    fake = Api()
    fake.blobs, fake.sha = api.blobs, api.sha  # the download handler of `env` serves these

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            if any(e[0] == "receive" for e in events):
                daemon.stop.set()
                return {}
            events.append(("receive", None))
            fake.add(1, blob)
            body = {"deployment": "d", "version": 1, "sha256": fake.sha[1], "download_url": "http://bundles.test/v1"}
            return {"Messages": [{"Body": json.dumps(body), "ReceiptHandle": "r1"}]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            events.append(("delete", [e["ReceiptHandle"] for e in Entries]))

    cfg = syncer.cfg
    cfg.resync_interval = 3600
    daemon = Sidecar(cfg, fake, Sqs())  # type: ignore[arg-type]
    daemon.syncer = syncer
    syncer.api = fake  # type: ignore[assignment]
    daemon.run()
    kinds = [kind for kind, _ in events]
    after = kinds[kinds.index("receive") + 1:]
    assert after[:2] == ["heartbeat", "delete"], kinds
    report = events[kinds.index("receive") + 1][1]
    assert report["version"] == 1 and report["last_notified_at"] == 4242
    assert report["last_sync_at"] is not None and report["last_sync_at"] == syncer.published_at
    assert events[-1] == ("deregister", None)


def test_against_an_older_api_the_heartbeat_leaves_the_notification_time_out(env: Any) -> None:
    syncer, _, _ = env
    sent: list[dict[str, Any]] = []

    class OlderApi(FakeApi):
        def heartbeat(self, deployment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            sent.append(dict(body))
            if "last_notified_at" in body:
                raise ApiError(400, "invalid_request", "invalid request body: last_notified_at: Extra inputs are not permitted")
            return {}

    daemon = Sidecar(syncer.cfg, OlderApi(), None)  # type: ignore[arg-type]
    daemon.last_notified_at = 5
    daemon._heartbeat()
    daemon._heartbeat()
    assert ["last_notified_at" in body for body in sent] == [True, False, False]


def test_a_reconcile_that_finds_nothing_new_sends_no_extra_heartbeat(env: Any, tmp_path: Path) -> None:
    syncer, api, _ = env
    api.add(1, versions_of(1, tmp_path))
    beats: list[int] = []
    polls: list[int] = []

    class Api(FakeApi):
        def register_sidecar(self, deployment: str, name: str, component: str) -> dict[str, Any]:
            return {"queue_url": "q"}

        def heartbeat(self, deployment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            beats.append(body["version"])
            return {}

        def deregister_sidecar(self, deployment: str, name: str) -> None:
            pass

    fake = Api()
    fake.blobs, fake.sha, fake.current = api.blobs, api.sha, api.current

    class Sqs:
        def receive_message(self, **_: Any) -> dict[str, Any]:
            polls.append(1)
            if len(polls) == 5:
                daemon.stop.set()
            return {}

    syncer.cfg.resync_interval = 1e-9  # a reconcile on every pass of the loop
    daemon = Sidecar(syncer.cfg, fake, Sqs())  # type: ignore[arg-type]
    daemon.syncer = syncer
    syncer.api = fake  # type: ignore[assignment]
    daemon.run()
    assert len(polls) == 5 and len(fake.lookups) >= 5, "it reconciled on every pass"
    assert beats == [1], "one report of v1; the reconciles that found nothing new sent none"


def test_the_daemon_removes_old_versions_only_after_it_reported_the_new_one_and_the_queue_is_quiet(
    env: Any, tmp_path: Path
) -> None:
    """Removing a large old version takes seconds; `dagcast deploy --wait` should not wait for it."""
    syncer, api, _ = env  # keep=2
    for i in (1, 2):
        api.add(i, versions_of(i, tmp_path))
        syncer.sync(i)
    on_disk_at_report: list[list[str]] = []

    class Api(FakeApi):
        def register_sidecar(self, deployment: str, name: str, component: str) -> dict[str, Any]:
            return {"queue_url": "q"}

        def heartbeat(self, deployment: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            on_disk_at_report.append(sorted(p.name for p in syncer.versions.iterdir()))
            return {}

        def deregister_sidecar(self, deployment: str, name: str) -> None:
            pass

    fake = Api()
    fake.blobs, fake.sha, fake.current = api.blobs, api.sha, api.current
    received: list[int] = []
    on_disk_at_idle_poll: list[list[str]] = []
    idle_waits: list[int] = []

    class Sqs:
        def receive_message(self, **kw: Any) -> dict[str, Any]:
            if received:
                on_disk_at_idle_poll.append(sorted(p.name for p in syncer.versions.iterdir()))
                idle_waits.append(kw["WaitTimeSeconds"])
                daemon.stop.set()
                return {}
            received.append(1)
            fake.add(3, versions_of(3, tmp_path))
            body = {"deployment": "d", "version": 3, "sha256": fake.sha[3], "download_url": "http://bundles.test/v3"}
            return {"Messages": [{"Body": json.dumps(body), "ReceiptHandle": "r3"}]}

        def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> None:  # noqa: N803
            pass

    syncer.cfg.resync_interval = 3600
    daemon = Sidecar(syncer.cfg, fake, Sqs())  # type: ignore[arg-type]
    daemon.syncer = syncer
    syncer.api = fake  # type: ignore[assignment]
    daemon.run()
    assert on_disk_at_report[-1] == ["1", "2", "3"], "v3 reported before v1 was removed"
    assert on_disk_at_idle_poll == [["1", "2", "3"]], "removed only once a poll came back empty"
    assert idle_waits == [2], "a pending removal shortens the next long poll"
    assert sorted(p.name for p in syncer.versions.iterdir()) == ["2", "3"]
    assert syncer.live_version() == 3
