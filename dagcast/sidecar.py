"""The sidecar: keeps a local folder on the deployment's live version, published atomically.

Layout under --root:
  versions/<n>/          complete, immutable version folders (never modified once renamed in)
  versions/.tmp-<n>/     an extraction in progress (removed at start if a crash left it)
  downloads/<n>.part     a download in progress
  leases/<n>             readers' shared locks: a version leased by a reader is never pruned
--link is a symlink with a relative target to versions/<n>, replaced by rename.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from chalicelib.exceptions import DagcastError
from chalicelib.validation import BundleRejected, FileEntry, Reuse, extract_bundle, extract_delta
from dagcast.client import ApiClient, backoff
from dagcast.exceptions import ApiError, ClientError, SyncError
from dagcast.lease import claim_for_removal
from dagcast.observe import SidecarMetrics

log = logging.getLogger("dagcast.sidecar")

CHUNK = 1 << 20
IDLE_BEFORE_PRUNE = 2.0  # seconds of quiet queue after a swap before old versions are removed


@dataclass
class SidecarConfig:
    name: str
    root: Path
    link: Path
    deployment: str
    component: str = "unknown"
    resync_interval: float = 60.0
    heartbeat_interval: float = 15.0
    keep: int = 5
    wait_seconds: int = 20
    fetch_attempts: int = 3


class Syncer:
    """One sync step at a time: fetch, verify, extract, publish, prune. No loops, no timers."""

    def __init__(
        self, cfg: SidecarConfig, api: ApiClient, http: httpx.Client | None = None, metrics: SidecarMetrics | None = None
    ) -> None:
        self.cfg = cfg
        self.api = api
        self.http = http or httpx.Client(timeout=httpx.Timeout(30.0, read=120.0))
        self.versions = cfg.root / "versions"
        self.downloads = cfg.root / "downloads"
        self.manifests = cfg.root / "manifests"
        self.published_at: int | None = None  # epoch ms when the link last moved
        self.prune_after_publish = True  # the daemon turns this off and prunes after it reported the swap
        self.metrics = metrics or SidecarMetrics()

    def prepare(self) -> None:
        """Create the folders and remove leftovers of an interrupted sync."""
        self.versions.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        for leftover in self.manifests.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)
        for leftover in self.versions.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.downloads.iterdir():
            leftover.unlink(missing_ok=True)
        for leftover in self.cfg.link.parent.glob(f".{self.cfg.link.name}.tmp-*"):
            leftover.unlink(missing_ok=True)

    def live_version(self) -> int:
        try:
            target = os.readlink(self.cfg.link)
        except OSError:
            return 0
        name = Path(target).name
        return int(name) if name.isdigit() else 0

    def sync(self, target: int | None = None, announced: dict[str, Any] | None = None) -> int | None:
        """Bring the link to `target` (the deployment's current version when None).

        Returns the new live version, or None when nothing changed (older or equal versions
        are dropped). Raises SyncError; the live version is untouched on any failure.
        """
        live = self.live_version()
        self.metrics.current_version.set(live)
        if target is not None and target <= live:
            log.debug("dropping announcement of an older or equal version", extra={"version": target, "live": live})
            return None
        started = time.monotonic()
        try:
            changed = self._sync(live, target, announced)
        except (ClientError, OSError):
            self.metrics.syncs.labels(result="error").inc()
            raise
        self.metrics.syncs.labels(result="published" if changed else "unchanged").inc()
        if changed:
            self.metrics.sync_seconds.observe(time.monotonic() - started)
            self.metrics.current_version.set(changed)
            self.metrics.last_sync.set(time.time())
            self.metrics.seconds_behind.set(0)
        return changed

    def _sync(self, live: int, target: int | None, announced: dict[str, Any] | None) -> int | None:
        if announced and target is not None and int(announced.get("version", 0)) == target and "download_url" in announced:
            # The announcement carries the version record's sha256 and a presigned URL: no API round trip.
            view = {"version": {**announced, "created_at": 0}, "download_url": announced["download_url"],
                    "delta_url": announced.get("delta_url")}
            try:
                return self._sync_view(live, view)
            except SyncError as exc:
                log.info("announced URL failed; asking the API", extra={"version": target, "error": str(exc)})
        try:
            view = self.api.get_version(self.cfg.deployment, target)
        except ApiError as exc:
            if exc.status == 404:
                raise SyncError(f"deployment {self.cfg.deployment!r} has no version to sync yet") from exc
            raise SyncError(f"cannot look up version {target or 'current'}: {exc}") from exc
        return self._sync_view(live, view)

    def _sync_view(self, live: int, view: dict[str, Any]) -> int | None:
        record = view["version"]
        version = int(record["version"])
        if version <= live:
            self.metrics.seconds_behind.set(0)
            return None
        if record.get("created_at"):
            self.metrics.seconds_behind.set(max(0.0, time.time() - int(record["created_at"]) / 1000))
        folder = self.versions / str(version)
        if not folder.is_dir() and not self._fetch_delta(live, version, record.get("delta"), view.get("delta_url")):
            self.fetch(version, view["download_url"], record["sha256"])
        self._publish(folder)
        self.published_at = int(time.time() * 1000)
        log.info("version live", extra={"version": version, "previous": live})
        if self.prune_after_publish:
            self._prune(version)
        return version

    def fetch(self, version: int, url: str, sha256: str) -> Path:
        """Download, verify against `sha256`, extract and rename into versions/<version>; return it.

        Raises SyncError when the download fails (after bounded retries), the bytes do not match,
        or the extractor refuses the archive; nothing is left behind then.
        """
        part = self.downloads / f"{version}.part"
        for attempt in range(self.cfg.fetch_attempts):
            try:
                digest = self._download(url, part)
                break
            except (httpx.HTTPError, OSError) as exc:
                if attempt == self.cfg.fetch_attempts - 1:
                    part.unlink(missing_ok=True)
                    raise SyncError(f"cannot download v{version}: {exc}") from exc
                delay = backoff(attempt)
                log.warning("download failed, retrying", extra={"version": version, "delay": round(delay, 2), "error": str(exc)})
                time.sleep(delay)
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise SyncError(f"v{version} failed verification: sha256 {digest} does not match the version record {sha256}")
        log.debug("downloaded and verified", extra={"version": version})
        tmp = self.versions / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with part.open("rb") as f:
                report = extract_bundle(f, tmp, reuse=self._reuse())
        except BundleRejected as exc:
            first = exc.report.errors[0] if exc.report.errors else None
            detail = f"{first.path}: {first.message}" if first else "no detail"
            raise SyncError(f"v{version} refused by the extractor: {detail}") from exc
        finally:
            part.unlink(missing_ok=True)
        log.debug("extracted", extra={"version": version})
        return self._install(version, tmp, report.manifest, "bundle")

    def _fetch_delta(self, live: int, version: int, delta: dict[str, Any] | None, url: str | None) -> bool:
        """Build versions/<version> from the live version and the version's delta, when the delta is
        against the live version; True when it did. Any problem (download, checksum, the archive's
        rules, a result that differs from the version's file list) leaves nothing behind and returns
        False: the caller then fetches the whole bundle."""
        if not delta or not url or int(delta.get("base_version", 0)) != live or live == 0:
            return False
        reuse = self._reuse()
        if reuse is None:
            return False
        part = self.downloads / f"{version}.delta.part"
        tmp = self.versions / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            digest = self._download(url, part)
            if digest != delta["sha256"]:
                raise SyncError(f"sha256 {digest} does not match the version record {delta['sha256']}")
            with part.open("rb") as f:
                report = extract_delta(f, tmp, reuse, delta.get("removed", []), delta["files_sha256"])
        except (SyncError, DagcastError, httpx.HTTPError, OSError, KeyError, TypeError) as exc:
            # extract_delta removes tmp itself on any error
            self.metrics.fetches.labels(kind="delta_refused").inc()
            log.warning("delta not usable; fetching the whole bundle", extra={"version": version, "error": str(exc)})
            return False
        finally:
            part.unlink(missing_ok=True)
        log.debug("built from the delta", extra={"version": version, "base": live, "files": delta.get("files")})
        self._install(version, tmp, report.manifest, "delta")
        return True

    def _install(self, version: int, tmp: Path, manifest: list[FileEntry], kind: str) -> Path:
        """Rename a complete extraction into versions/<version> (its manifest saved first); return it."""
        folder = self.versions / str(version)
        self._save_manifest(version, manifest)
        os.rename(tmp, folder)
        _fsync_dir(self.versions)
        self.metrics.fetches.labels(kind=kind).inc()
        return folder

    def _reuse(self) -> Reuse | None:
        """The live version and its manifest, so unchanged files are hard-linked rather than rewritten."""
        live = self.live_version()
        try:
            raw = json.loads((self.manifests / f"{live}.json").read_bytes())
            files = {str(e["path"]): (str(e["sha256"]), int(e["size"])) for e in raw}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Reuse(self.versions / str(live), files)

    def _save_manifest(self, version: int, manifest: list[FileEntry]) -> None:
        tmp = self.manifests / f".tmp-{version}.json"
        tmp.write_text(json.dumps([{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest]))
        os.replace(tmp, self.manifests / f"{version}.json")

    def _download(self, url: str, part: Path) -> str:
        h = hashlib.sha256()
        with self.http.stream("GET", url) as resp, part.open("wb") as out:
            resp.raise_for_status()
            for chunk in resp.iter_bytes(CHUNK):
                h.update(chunk)
                out.write(chunk)
        return h.hexdigest()  # no fsync: the file is verified by hash, extracted, and deleted

    def _publish(self, folder: Path) -> None:
        link = self.cfg.link
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(folder, link.parent.resolve())
        tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)

    def prune(self) -> None:
        """Remove versions beyond --keep around the live one (see _prune)."""
        self._prune(self.live_version())

    def _prune(self, live: int) -> None:
        """Remove versions beyond --keep; never the live one, nor one a reader holds a lease on."""
        numbered = sorted((int(p.name) for p in self.versions.iterdir() if p.name.isdigit()), reverse=True)
        for version in numbered[self.cfg.keep :]:
            if version in (live, self.live_version()):
                continue
            with claim_for_removal(self.cfg.root, version) as claimed:
                if not claimed:
                    log.debug("keeping a version in use", extra={"version": version})
                    continue
                shutil.rmtree(self.versions / str(version), ignore_errors=True)
                (self.manifests / f"{version}.json").unlink(missing_ok=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Interrupted(Exception):
    pass


class Sidecar:
    """The daemon: register, reconcile, long-poll the queue, heartbeat; until stopped."""

    def __init__(self, cfg: SidecarConfig, api: ApiClient, sqs: Any, metrics: SidecarMetrics | None = None) -> None:
        self.cfg = cfg
        self.api = api
        self.sqs = sqs
        self.metrics = metrics or SidecarMetrics()
        self.syncer = Syncer(cfg, api, metrics=self.metrics)
        self.stop = threading.Event()
        self.queue_url: str | None = None
        self.last_error: str | None = None
        self.last_sync_at: int | None = None
        self.last_notified_at: int | None = None  # when it learned of the live version (epoch ms)
        self.failures = 0
        self._polling = False
        self._received: list[str] = []
        self._received_at: int | None = None
        self._unpruned = False  # a version was published and older ones not yet pruned
        self._older_api = False  # its heartbeat refused last_notified_at

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            if self._polling:
                raise _Interrupted()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        self.syncer.prepare()
        # Removing a large old version takes seconds of disk and CPU: report the swap first, and
        # remove old versions once the queue has been quiet for a moment (see _prune_when_idle).
        self.syncer.prune_after_publish = False
        self._register()
        next_resync = 0.0
        next_heartbeat = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_resync:
                    if self._step(None):  # a new version or an error: report it now (nothing new waits its turn)
                        next_heartbeat = 0.0
                    # +-10 %: sidecars started together (a rollout) would otherwise all ask the API at once, for ever
                    next_resync = now + self.cfg.resync_interval * random.uniform(0.9, 1.1)
                if time.monotonic() >= next_heartbeat:
                    self._report()
                    next_heartbeat = time.monotonic() + self.cfg.heartbeat_interval
                wait = max(0.0, min(self.cfg.wait_seconds, next_resync - time.monotonic(), next_heartbeat - time.monotonic()))
                if self._unpruned:
                    wait = min(wait, IDLE_BEFORE_PRUNE)
                announced = self._poll(wait)
                if announced is not None and self._step(int(announced["version"]), announced, self._received_at):
                    self._report()  # report the new version first: `dagcast deploy --wait` is waiting on it
                    next_heartbeat = time.monotonic() + self.cfg.heartbeat_interval
                elif announced is None:
                    self._prune_when_idle()
                self._delete_received()
        except _Interrupted:
            pass
        finally:
            self._deregister()

    def _step(self, target: int | None, announced: dict[str, Any] | None = None, notified_at: int | None = None) -> bool:
        """One sync; `notified_at` is when the announcement arrived (a reconcile learns now)."""
        notified_at = notified_at or _now_ms()
        try:
            changed = self.syncer.sync(target, announced)
        except (ClientError, OSError) as exc:
            self.failures += 1
            self.metrics.failures.set(self.failures)
            self.last_error = str(exc)
            log.error("sync failed", extra={"target": target, "failures": self.failures, "error": str(exc)})
            return True
        self.failures = 0
        self.metrics.failures.set(0)
        self.last_error = None
        if changed is not None:
            self.last_sync_at = self.syncer.published_at
            self.last_notified_at = notified_at
            self._unpruned = True
        return changed is not None

    def _report(self) -> None:
        self._heartbeat()

    def _prune_when_idle(self) -> None:
        """After a swap, remove versions beyond --keep once a poll came back empty: never before the
        swap was reported, and not while a burst of deploys (or other sidecars beside this one on
        the same machine) still has work to do."""
        if not self._unpruned:
            return
        self._unpruned = False
        try:
            self.syncer.prune()
        except OSError as exc:
            log.warning("cannot remove old versions", extra={"error": str(exc)})

    def _poll(self, wait: float) -> dict[str, Any] | None:
        """Long-poll the queue; returns the announcement of the highest version, messages deleted."""
        if self.queue_url is None or self.sqs is None:
            self.stop.wait(wait)
            return None
        try:
            self._polling = True
            if self.stop.is_set():
                return None
            # Round up: WaitTimeSeconds=0 returns at once, and a loop of those is a busy wait.
            out = self.sqs.receive_message(
                QueueUrl=self.queue_url, WaitTimeSeconds=min(20, max(1, math.ceil(wait))), MaxNumberOfMessages=10
            )
            self._received_at = _now_ms()
        except Exception as exc:  # noqa: BLE001 - any transport failure: fall back to resync, with backoff
            if isinstance(exc, _Interrupted):
                raise
            log.warning("queue poll failed", extra={"error": str(exc)})
            self.stop.wait(min(wait, 1.0 + backoff(min(self.failures, 5))))
            return None
        finally:
            self._polling = False
        messages = out.get("Messages", [])
        announcements = []
        for m in messages:
            try:
                doc = json.loads(m["Body"])
                if doc.get("deployment") == self.cfg.deployment:
                    doc["version"] = int(doc["version"])
                    announcements.append(doc)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring malformed message")
        versions = [a["version"] for a in announcements]
        log.debug("messages received", extra={"count": len(messages), "versions": versions})
        self._received = [m["ReceiptHandle"] for m in messages]
        return max(announcements, key=lambda a: int(a["version"])) if announcements else None

    def _delete_received(self) -> None:
        """Delete what the last poll received; done after the sync so it stays off the critical path.
        A crash before this only means a redelivery, which the version check drops."""
        if not self._received or self.queue_url is None:
            return
        entries = [{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(self._received)]
        self._received = []
        try:
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - redelivery is harmless: versions are idempotent
            log.warning("cannot delete messages", extra={"error": str(exc)})

    def _register(self) -> None:
        try:
            reg = self.api.register_sidecar(self.cfg.deployment, self.cfg.name, self.cfg.component)
            self.queue_url = reg["queue_url"]
            log.info("registered", extra={"sidecar": self.cfg.name, "deployment": self.cfg.deployment})
        except ClientError as exc:
            self.last_error = f"cannot register: {exc}"
            log.error("registration failed; syncing by periodic reconcile only", extra={"error": str(exc)})

    def _heartbeat(self) -> None:
        body: dict[str, Any] = {
            "version": self.syncer.live_version(),
            "last_sync_at": self.last_sync_at,
            "last_notified_at": self.last_notified_at,
            "last_error": self.last_error,
        }
        if self._older_api:
            del body["last_notified_at"]
        try:
            self.api.heartbeat(self.cfg.deployment, self.cfg.name, body)
        except ApiError as exc:
            if exc.status == 404:
                self._register()
            elif exc.status == 400 and "last_notified_at" in str(exc) and not self._older_api:
                # an API older than this sidecar (upgraded first) refuses the field: report without it
                log.info("the API does not take notification times; leaving them out")
                self._older_api = True
                self._heartbeat()
            else:
                log.warning("heartbeat failed", extra={"error": str(exc)})
        except ClientError as exc:
            log.warning("heartbeat failed", extra={"error": str(exc)})

    def _deregister(self) -> None:
        if self.queue_url is None:
            return
        try:
            self.api.deregister_sidecar(self.cfg.deployment, self.cfg.name)
            log.info("deregistered", extra={"sidecar": self.cfg.name})
        except ClientError as exc:
            log.warning("deregistration failed", extra={"error": str(exc)})
