"""The sidecar: keeps a local folder on the deployment's live version, published atomically.

It installs only versions the API vouches for: a version record read from the API with this
sidecar's token, or an announcement whose statement is signed by a key the API gave it at
registration (see chalicelib.signing). Nothing else in a queue message (URLs, numbers) is
trusted: downloads are checked against the vouched-for sha256 and extracted with the limits the
version was validated with.

A version's identity is the deployment's immutable id, the version number and the bundle's
sha256: folders are named by number and sha256, and a folder belonging to another deployment id
(a stack that was recreated) or a sha256 the API does not know (a table that was restored) is
replaced by the API's current version rather than kept because its number is higher.

Layout under --root:
  versions/<n>-<sha16>/  complete, immutable version folders (never modified once renamed in)
  versions/.tmp-<name>/  an extraction in progress (removed at start if a crash left it)
  manifests/<name>.json  each folder's identity (deployment id, version, sha256) and file list
  downloads/<name>.part  a download in progress
  leases/<name>          readers' shared locks: a version leased by a reader is never pruned
  sidecars/<sidecar>.secret  this sidecar's own secret from its registration (mode 0600)
--link is a symlink with a relative target to versions/<name>, replaced by rename.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, cast

import httpx
from pydantic import ValidationError

from chalicelib.bundle import BundleRejected, FileEntry, Reuse, extract_bundle, extract_delta
from chalicelib.exceptions import DagcastError
from chalicelib.models import Version
from chalicelib.signing import Verifier
from dagcast.client import ApiClient, backoff
from dagcast.exceptions import ApiError, ClientError, SyncError
from dagcast.lease import claim_for_removal
from dagcast.observe import SidecarMetrics
from dagcast.parse_check import ParseCheck

log = logging.getLogger("dagcast.sidecar")

CHUNK = 1 << 20
META_KEPT = 3  # manifests kept parsed in memory: the live version's, the one before it and a new one
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
    parse: str = "auto"  # auto (the deployment's parse_mode), report, gate, off: see dagcast.parse_check
    parse_workers: int | None = None  # parallel parses of a first version (default: the CPUs)


def folder_name(version: int, sha256: str) -> str:
    """The folder of a version: its number and the start of its bundle's sha256."""
    return f"{version}-{sha256[:16]}"


def parse_folder(name: str) -> tuple[int, str] | None:
    """(version, sha256 prefix) of a version folder's name, or None for anything else."""
    number, _, sha = name.partition("-")
    if not number.isdigit() or int(number) <= 0 or len(sha) != 16:
        return None
    return int(number), sha


@dataclass(frozen=True)
class Installed:
    """A version folder on disk, as its manifest records it ("" where an older layout did not say)."""

    folder: str
    version: int
    sha256: str
    deployment_id: str

    def same(self, record: Version) -> bool:
        return (self.version, self.sha256, self.deployment_id) == (record.version, record.sha256, record.deployment_id)


@dataclass(frozen=True)
class Announced:
    """A version an announcement vouches for (its signed statement) and the URLs it came with (unchecked)."""

    record: Version
    download_url: str | None
    delta_url: str | None


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
        # before a version is published: may it be? (the parse check's gate; None: always)
        self.gate: Callable[[str | None, Version, Path], bool] | None = None
        self.last_published: tuple[str | None, Version, Path] | None = None  # (folder before, record, folder)
        # the last few manifests read, by folder name, with the stat they were read at (see _read_meta),
        # and what was made from each (see _made_from)
        self._meta: dict[str, tuple[tuple[int, int, int, int], dict[str, Any], dict[str, Any]]] = {}
        self._meta_lock = threading.Lock()

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

    # --- what is live here ---------------------------------------------------------------

    def installed(self) -> Installed | None:
        """The version the link points at, with the identity its manifest recorded."""
        try:
            name = Path(os.readlink(self.cfg.link)).name
        except OSError:
            return None
        parsed = parse_folder(name)
        if parsed is None:
            return None
        meta = self._read_meta(name)
        sha256 = str(meta.get("sha256", ""))
        return Installed(name, parsed[0], sha256 if sha256.startswith(parsed[1]) else "", str(meta.get("deployment_id", "")))

    def live_version(self) -> int:
        live = self.installed()
        return live.version if live else 0

    def files_of(self, name: str) -> dict[str, str] | None:
        """A version folder's files (path -> sha256) as its manifest records them; None when unknown.
        The mapping is shared: callers read it, never change it."""
        try:
            files: dict[str, str] = self._made_from(
                name, "files_of", lambda doc: {str(e["path"]): str(e["sha256"]) for e in doc["files"]})
            return files
        except (KeyError, TypeError):
            return None

    def _made_from(self, name: str, what: str, make: Callable[[dict[str, Any]], Any]) -> Any:
        """make(the folder's manifest), kept with the parsed manifest (and dropped with it) under `what`:
        at 10,000 files each mapping made from it takes tens of milliseconds."""
        doc = self._read_meta(name)
        with self._meta_lock:
            kept = self._meta.get(name)
            views = kept[2] if kept is not None and kept[1] is doc else None
            if views is not None and what in views:
                return views[what]
        made = make(doc)
        if views is not None:
            with self._meta_lock:
                views[what] = made
        return made

    def _read_meta(self, name: str) -> dict[str, Any]:
        """A version folder's manifest ({} when missing or unreadable). The live one is asked for by every
        sync, heartbeat and health check, and at 10,000 files it is a megabyte of JSON: what was read is
        kept while the file's inode, size, mtime and ctime stay the same (a manifest is replaced, never edited).
        The document is shared: callers read it, never change it."""
        path = self.manifests / f"{name}.json"
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._meta_lock:
                kept = self._meta.get(name)
            if kept is not None and kept[0] == stamp:
                return kept[1]
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        with self._meta_lock:
            self._meta.pop(name, None)
            self._meta[name] = (stamp, doc, {})  # read after the stat: a newer file has another stamp, read again
            while len(self._meta) > META_KEPT:
                del self._meta[next(iter(self._meta))]
        return doc

    # --- syncing -------------------------------------------------------------------------

    def sync(self, announced: Announced | None = None) -> int | None:
        """Bring the link to the version the API vouches for: `announced` (a verified announcement),
        or the deployment's current version read from the API when None.

        Returns the new live version, or None when nothing changed (an older announcement of the
        same deployment is dropped). Raises SyncError; the live version is untouched on any failure.
        """
        live = self.installed()
        self.metrics.current_version.set(live.version if live else 0)
        started = time.monotonic()
        try:
            changed = self._sync(live, announced)
        except VersionHeld:
            self.metrics.syncs.labels(result="held").inc()
            raise
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

    def _sync(self, live: Installed | None, announced: Announced | None) -> int | None:
        if announced is not None:
            record = announced.record
            if live is not None and live.deployment_id == record.deployment_id:
                if live.same(record) or record.version < live.version:
                    log.debug("dropping an announcement of an older or equal version",
                              extra={"version": record.version, "live": live.version})
                    return None
                if record.version == live.version:  # same number, other bundle: ask the API which is right
                    return self._sync(live, None)
            try:
                return self._install(live, record, announced.download_url, announced.delta_url)
            except SyncError as exc:
                log.info("announced URL failed; asking the API", extra={"version": record.version, "error": str(exc)})
            view = self._look_up(record.version)
            if not _same_identity(view[0], record):
                raise SyncError(f"v{record.version} announced as {record.sha256[:12]} is {view[0].sha256[:12]} in the API")
            return self._install(live, view[0], view[1], view[2])
        record, url, delta_url = self._look_up(None)
        if live is not None and live.same(record):
            self.metrics.seconds_behind.set(0)
            return None
        if live is not None and live.deployment_id == record.deployment_id and live.version > record.version:
            # Ahead of the API's current version: fine if the API knows this exact version (a reconcile
            # that raced an announcement), not if it does not (a table restored from a backup).
            try:
                known = self._look_up(live.version)[0]
            except SyncError:
                known = None
            if known is not None and live.same(known):
                return None
            log.warning("the live version is unknown to the API; installing its current version",
                        extra={"live": live.folder, "current": record.version})
        elif live is not None and live.deployment_id and live.deployment_id != record.deployment_id:
            log.warning("the live version belongs to another deployment id; installing the current version",
                        extra={"live": live.folder, "current": record.version})
        return self._install(live, record, url, delta_url)

    def _look_up(self, version: int | None) -> tuple[Version, str | None, str | None]:
        """A version as the API records it (the current one when None), with its download URLs."""
        try:
            view = self.api.get_version(self.cfg.deployment, version)
        except ApiError as exc:
            # only the API's own "no version yet": a deployment that does not exist (a typo) or a URL that
            # is not the API (a 404 page) is an error to report, not a first deploy to wait for
            if exc.status == 404 and version is None and exc.code == "not_found" and "no version yet" in exc.api_message:
                raise NoVersionYet(f"deployment {self.cfg.deployment!r} has no version to sync yet") from exc
            raise SyncError(f"cannot look up version {version or 'current'}: {exc}") from exc
        try:
            record = Version.model_validate(view["version"])
        except (ValidationError, KeyError, TypeError) as exc:
            raise SyncError(f"the API's answer for version {version or 'current'} is not a version record") from exc
        return record, view.get("download_url"), view.get("delta_url")

    def _install(self, live: Installed | None, record: Version, url: str | None, delta_url: str | None) -> int:
        if record.created_at:
            self.metrics.seconds_behind.set(max(0.0, time.time() - record.created_at / 1000))
        folder = self.versions / folder_name(record.version, record.sha256)
        if not folder.is_dir() and not self._fetch_delta(live, record, delta_url):
            if not url:
                raise SyncError(f"no download URL for v{record.version}: this token may not download bundles")
            self.fetch(record, url)
        _crash_point("after-install")
        if self.gate is not None and not self.gate(live.folder if live else None, record, folder):
            raise VersionHeld(f"v{record.version} is held back: Airflow reports import errors the live version "
                              f"v{live.version if live else 0} does not have here")
        self._publish(folder)
        self.published_at = int(time.time() * 1000)
        self.last_published = (live.folder if live else None, record, folder)
        log.info("version live", extra={"version": record.version, "previous": live.version if live else 0})
        if self.prune_after_publish:
            self._prune(folder.name)
        return record.version

    def fetch(self, record: Version, url: str) -> Path:
        """Download, verify against the record's sha256, extract with its limits and rename into
        versions/<n>-<sha16>; return the folder.

        Raises SyncError when the download fails (after bounded retries), the bytes do not match,
        or the extractor refuses the archive; nothing is left behind then.
        """
        name = folder_name(record.version, record.sha256)
        part = self.downloads / f"{name}.part"
        for attempt in range(self.cfg.fetch_attempts):
            try:
                digest = self._download(url, part)
                break
            except (httpx.HTTPError, OSError) as exc:
                if attempt == self.cfg.fetch_attempts - 1 or _not_retried(exc):
                    part.unlink(missing_ok=True)
                    raise SyncError(f"cannot download v{record.version}: {exc}") from exc
                delay = backoff(attempt)
                log.warning("download failed, retrying",
                            extra={"version": record.version, "delay": round(delay, 2), "error": str(exc)})
                time.sleep(delay)
        if digest != record.sha256:
            part.unlink(missing_ok=True)
            self.metrics.refused.labels(reason="checksum").inc()
            raise SyncError(
                f"v{record.version} failed verification: sha256 {digest} does not match the version record {record.sha256}"
            )
        log.debug("downloaded and verified", extra={"version": record.version})
        tmp = self.versions / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with part.open("rb") as f:
                report = extract_bundle(_crash_reader(f, "mid-extract"), tmp, record.limits, reuse=self._reuse())
        except BundleRejected as exc:
            first = exc.report.errors[0] if exc.report.errors else None
            detail = f"{first.path}: {first.message}" if first else "no detail"
            self.metrics.refused.labels(reason="extractor").inc()
            raise SyncError(f"v{record.version} refused by the extractor: {detail}") from exc
        finally:
            part.unlink(missing_ok=True)
        log.debug("extracted", extra={"version": record.version})
        return self._place(record, tmp, report.manifest, "bundle")

    def _fetch_delta(self, live: Installed | None, record: Version, url: str | None) -> bool:
        """Build the version's folder from the live version and the version's delta, when the delta is
        against exactly the live version; True when it did. Any problem (download, checksum, the
        archive's rules, a result that differs from the version's file list) leaves nothing behind and
        returns False: the caller then fetches the whole bundle."""
        delta = record.delta
        if delta is None or not url or live is None or live.deployment_id != record.deployment_id:
            return False
        if delta.base_version != live.version or (delta.base_sha256 and delta.base_sha256 != live.sha256):
            return False
        reuse = self._reuse()
        if reuse is None:
            return False
        name = folder_name(record.version, record.sha256)
        part = self.downloads / f"{name}.delta.part"
        tmp = self.versions / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            digest = self._download(url, part)
            if digest != delta.sha256:
                raise SyncError(f"sha256 {digest} does not match the version record {delta.sha256}")
            with part.open("rb") as f:
                report = extract_delta(_crash_reader(f, "mid-delta"), tmp, reuse, delta.removed, delta.files_sha256, record.limits)
        except (SyncError, DagcastError, httpx.HTTPError, OSError) as exc:
            # extract_delta removes tmp itself on any error
            self.metrics.fetches.labels(kind="delta_refused").inc()
            log.warning("delta not usable; fetching the whole bundle", extra={"version": record.version, "error": str(exc)})
            return False
        finally:
            part.unlink(missing_ok=True)
        log.debug("built from the delta", extra={"version": record.version, "base": live.version, "files": delta.files})
        self._place(record, tmp, report.manifest, "delta")
        return True

    def _place(self, record: Version, tmp: Path, manifest: list[FileEntry], kind: str) -> Path:
        """Rename a complete extraction into its folder (its identity and manifest saved first); return it."""
        folder = self.versions / folder_name(record.version, record.sha256)
        self._save_manifest(folder.name, record, manifest)
        os.rename(tmp, folder)
        _fsync_dir(self.versions)
        self.metrics.fetches.labels(kind=kind).inc()
        return folder

    def _reuse(self) -> Reuse | None:
        """The live version and its manifest, so unchanged files are hard-linked rather than rewritten.
        Made once per version (see warm): the next deploy's sync does not wait for it."""
        live = self.installed()
        if live is None:
            return None
        folder = self.versions / live.folder
        try:
            reuse: Reuse = self._made_from(live.folder, "reuse", lambda doc: Reuse(folder, {
                str(e["path"]): (str(e["sha256"]), int(e["size"])) for e in doc["files"]}))
        except (KeyError, ValueError, TypeError):
            return None
        return reuse

    def warm(self) -> None:
        """Make, while nothing waits, what the next sync from the live version needs: its files to reuse
        (and the folders they are in)."""
        reuse = self._reuse()
        if reuse is not None:
            reuse.present  # noqa: B018  (computed once, kept with it)
            reuse.entries  # noqa: B018

    def _save_manifest(self, name: str, record: Version, manifest: list[FileEntry]) -> None:
        doc = {
            "deployment": record.deployment,
            "deployment_id": record.deployment_id,
            "version": record.version,
            "sha256": record.sha256,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest],
        }
        tmp = self.manifests / f".tmp-{name}.json"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.manifests / f"{name}.json")

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
        _crash_point("mid-publish")
        os.replace(tmp, link)
        _fsync_dir(link.parent)

    def prune(self) -> None:
        """Remove versions beyond --keep around the live one (see _prune)."""
        live = self.installed()
        self._prune(live.folder if live else "")

    def _prune(self, live: str) -> None:
        """Remove the versions beyond the --keep installed last; never the live one, nor one a reader
        holds a lease on."""
        folders = []
        for p in self.versions.iterdir():
            if parse_folder(p.name) is not None:
                try:
                    folders.append((p.stat().st_ctime_ns, p.name))  # renamed in when it was installed
                except FileNotFoundError:
                    continue
        folders.sort(reverse=True)
        for _, name in folders[self.cfg.keep :]:
            current = self.installed()
            if name in (live, current.folder if current else ""):
                continue
            with claim_for_removal(self.cfg.root, name) as claimed:
                if not claimed:
                    log.debug("keeping a version in use", extra={"folder": name})
                    continue
                shutil.rmtree(self.versions / name, ignore_errors=True)
                (self.manifests / f"{name}.json").unlink(missing_ok=True)


class NoVersionYet(SyncError):
    """The deployment has no version yet: nothing to sync, and nothing wrong."""


class VersionHeld(ClientError):
    """The parse check's gate held a version back (it adds import errors): the live version stays,
    and nothing is wrong with this sidecar."""

    code = "held"


def _same_identity(a: Version, b: Version) -> bool:
    return (a.deployment_id, a.version, a.sha256) == (b.deployment_id, b.version, b.sha256)


def _not_retried(exc: BaseException) -> bool:
    """A download refused outright (an expired or revoked URL): asking again will not help."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (400, 401, 403, 404)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Test-only: DAGCAST_TEST_CRASH_AT=<point> makes the sidecar SIGKILL itself at that point, so that the
# crash-safety tests kill it exactly where they mean to rather than after a guessed sleep. Points:
# mid-extract / mid-delta (the extractor asks for the archive's second chunk: versions/.tmp-<name> is
# partly written, for an archive of more than a few hundred bytes), after-install (versions/<name> renamed in, not yet
# published), mid-publish (the temp symlink made, not yet renamed over the link). Never set it elsewhere.
CRASH_AT_ENV = "DAGCAST_TEST_CRASH_AT"


def _crash_point(point: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == point:
        log.warning("test crash point reached", extra={"point": point})
        os.kill(os.getpid(), signal.SIGKILL)


class _CrashOnSecondRead:
    """The archive as the extractor reads it, crashing the process at its second read (see _crash_point)."""

    def __init__(self, f: BinaryIO, point: str) -> None:
        self._f, self._point, self._reads = f, point, 0

    def read(self, n: int = -1) -> bytes:
        self._reads += 1
        if self._reads > 1:
            _crash_point(self._point)
        return self._f.read(n)


def _crash_reader(f: BinaryIO, point: str) -> BinaryIO:
    return cast(BinaryIO, _CrashOnSecondRead(f, point)) if os.environ.get(CRASH_AT_ENV) == point else f


class _Interrupted(BaseException):  # noqa: N818 - not an error: SIGTERM during a long poll
    """Raised by the signal handler during a long poll; a BaseException, so that no library's
    `except Exception` (botocore's retries) swallows it and keeps polling."""


class Trust:
    """What this sidecar learnt at registration: the deployment's id and the keys that sign its
    announcements. `check` turns a queue message into a vouched-for version, or says why not."""

    def __init__(self, deployment: str, deployment_id: str, keys: dict[str, str]) -> None:
        self.deployment = deployment
        self.deployment_id = deployment_id
        self._verifier = Verifier(keys)

    def check(self, doc: Any) -> tuple[Announced | None, str]:
        """(the announcement, "accepted"), or (None, why it is not trusted)."""
        if not isinstance(doc, dict):
            return None, "malformed"
        if doc.get("deployment") != self.deployment:
            return None, "other_deployment"
        statement, signature, key_id = doc.get("statement"), doc.get("signature"), doc.get("key_id")
        if not isinstance(statement, str) or not isinstance(signature, str) or not isinstance(key_id, str):
            return None, "unsigned"
        if not self._verifier.knows(key_id):
            return None, "unknown_key"
        if not self._verifier.verify(key_id, statement.encode(), signature):
            return None, "bad_signature"
        try:
            signed = json.loads(statement)
            if signed.pop("type", None) != "dagcast.version":
                return None, "malformed"
            record = Version.model_validate({**signed, "key": ""})
        except (ValueError, ValidationError, AttributeError):
            return None, "malformed"
        if record.deployment != self.deployment or record.deployment_id != self.deployment_id:
            return None, "other_deployment"
        urls = [doc.get("download_url"), doc.get("delta_url")]
        return Announced(record, *(u if isinstance(u, str) else None for u in urls)), "accepted"


class Sidecar:
    """The daemon: register, reconcile, long-poll the queue, heartbeat; until stopped."""

    def __init__(self, cfg: SidecarConfig, api: ApiClient, sqs: Any, metrics: SidecarMetrics | None = None) -> None:
        self.cfg = cfg
        self.api = api
        self.sqs = sqs
        self.metrics = metrics or SidecarMetrics()
        self.syncer = Syncer(cfg, api, metrics=self.metrics)
        self.parse = ParseCheck(root=cfg.root, mode=cfg.parse, send=self._send_parse, files_of=self.syncer.files_of,
                                metrics=self.metrics, workers=cfg.parse_workers)
        self.syncer.gate = self.parse.gate
        self.held: str | None = None  # the version folder the gate holds back
        self.stop = threading.Event()
        self.queue_url: str | None = None
        self.trust: Trust | None = None
        self.secret: str | None = None
        self.last_error: str | None = None
        self.last_sync_at: int | None = None
        self.last_notified_at: int | None = None  # when it learned of the live version (epoch ms)
        self.failures = 0
        self.poll_failures = 0  # queue polls failed in a row: what their retries back off on
        self.waiting = False  # the deployment has no version yet
        self._polling = False
        self._received: list[str] = []
        self._received_at: int | None = None
        self._unpruned = False  # a version was published and older ones not yet pruned
        self._reconcile_now = False  # a message asked for a look at the API (an unknown key, say)
        self._older_api = False  # its heartbeat refused last_notified_at
        self._secret_file = cfg.root / "sidecars" / f"{cfg.name}.secret"

    def health(self) -> tuple[bool, str]:
        """(ready, why) for /healthz: ready once a version is live."""
        live = self.syncer.installed()
        if live is not None:
            return True, f"ok: v{live.version} live"
        if self.waiting:
            return False, "waiting for the first deploy of this deployment"
        return False, f"no version live yet: {self.last_error}" if self.last_error else "no version live yet"

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop.set()
            if self._polling:
                raise _Interrupted()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        self.syncer.prepare()
        self.parse.start()  # warms Airflow in its own process while this one registers and syncs
        # Removing a large old version takes seconds of disk and CPU: report the swap first, and
        # remove old versions once the queue has been quiet for a moment (see _prune_when_idle).
        self.syncer.prune_after_publish = False
        self._register()
        next_resync = 0.0
        next_heartbeat = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_resync or self._reconcile_now:
                    self._reconcile_now = False
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
                if announced is not None and self._step(announced, self._received_at):
                    self._report()  # report the new version first: `dagcast deploy --wait` is waiting on it
                    next_heartbeat = time.monotonic() + self.cfg.heartbeat_interval
                elif announced is None:
                    self._prune_when_idle()
                self._delete_received()
        except _Interrupted:
            pass
        finally:
            self._deregister()
            self.parse.close()

    def _step(self, announced: Announced | None, notified_at: int | None = None) -> bool:
        """One sync; `notified_at` is when the announcement arrived (a reconcile learns now)."""
        notified_at = notified_at or _now_ms()
        try:
            changed = self.syncer.sync(announced)
        except NoVersionYet:
            if not self.waiting:
                log.info("waiting for the first deploy", extra={"deployment": self.cfg.deployment})
            self.waiting = True
            self.failures = 0
            self.last_error = None
            return False
        except VersionHeld as exc:
            if self.held != str(exc):
                log.warning("version held back", extra={"reason": str(exc)})
            self.held = str(exc)
            self.failures = 0
            self.last_error = None
            return False
        except (ClientError, OSError) as exc:
            self.failures += 1
            self.metrics.failures.set(self.failures)
            self.last_error = str(exc)
            log.error("sync failed", extra={"failures": self.failures, "error": str(exc)})
            return True
        self.waiting = False
        self.failures = 0
        self.metrics.failures.set(0)
        self.last_error = None
        if changed is not None:
            self.last_sync_at = self.syncer.published_at
            self.last_notified_at = notified_at
            self._unpruned = True
            self.held = None
            if self.syncer.last_published is not None:
                self.parse.after_publish(*self.syncer.last_published)
        return changed is not None

    def _report(self) -> None:
        self._heartbeat()
        self.parse.retry_unsent()

    def _send_parse(self, report: dict[str, Any]) -> None:
        self.api.report_parse(self.cfg.deployment, self.cfg.name, report, self.secret)

    def _prune_when_idle(self) -> None:
        """After a swap, remove versions beyond --keep once a poll came back empty: never before the
        swap was reported, and not while a burst of deploys (or other sidecars beside this one on
        the same machine) still has work to do."""
        if not self._unpruned:
            return
        self._unpruned = False
        self.syncer.warm()
        try:
            self.syncer.prune()
        except OSError as exc:
            log.warning("cannot remove old versions", extra={"error": str(exc)})

    def _poll(self, wait: float) -> Announced | None:
        """Long-poll the queue; returns the highest version a verified announcement vouches for.
        Every message is dropped after this poll (see _delete_received): one that is not trusted is
        logged and counted, and never installed."""
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
            self.poll_failures = 0
        except Exception as exc:  # noqa: BLE001 - any transport failure: fall back to resync, with backoff
            self.poll_failures += 1
            delay = min(wait, 1.0 + backoff(min(self.poll_failures - 1, 5)))
            log.warning("queue poll failed", extra={"error": str(exc), "failures": self.poll_failures, "delay": round(delay, 3)})
            if "NonExistentQueue" in str(exc) or "QueueDoesNotExist" in str(exc):
                self._register()  # its queue is gone (a janitor, a revoked token, a recreated stack): ask for one
            self.stop.wait(delay)
            return None
        finally:
            self._polling = False
        messages = out.get("Messages", [])
        trusted: list[Announced] = []
        for m in messages:
            try:
                doc = json.loads(m["Body"])
            except (ValueError, KeyError, TypeError):
                doc = None
            announced, verdict = self.trust.check(doc) if self.trust else (None, "unsigned")
            self.metrics.announcements.labels(result=verdict).inc()
            if announced is not None:
                trusted.append(announced)
            elif verdict == "unknown_key":
                log.info("an announcement signed by a key this sidecar does not know; asking the API")
                self._reconcile_now = True
            elif verdict != "other_deployment":
                log.warning("ignoring an announcement that is not vouched for", extra={"reason": verdict})
        log.debug("messages received", extra={"count": len(messages), "versions": [a.record.version for a in trusted]})
        self._received = [m["ReceiptHandle"] for m in messages]
        return max(trusted, key=lambda a: a.record.version) if trusted else None

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
        """Register (again, with the secret kept from last time when there is one) and learn the
        deployment's id and signing keys; the new secret is kept for the next start."""
        try:
            reg = self.api.register_sidecar(self.cfg.deployment, self.cfg.name, self.cfg.component, self._saved_secret())
            keys = {k["key_id"]: k["public_key"] for k in reg.get("signing_keys", [])}
            self.trust = Trust(self.cfg.deployment, str(reg["deployment_id"]), keys)
            self.secret = str(reg["secret"])
            self._save_secret(self.secret)
            self.queue_url = reg["queue_url"]
            log.info("registered", extra={"sidecar": self.cfg.name, "deployment": self.cfg.deployment})
        except ClientError as exc:
            self.last_error = f"cannot register: {exc}"
            log.error("registration failed; syncing by periodic reconcile only", extra={"error": str(exc)})
        except (KeyError, TypeError, ValueError) as exc:
            self.last_error = "cannot register: the API's answer is not a registration"
            log.error("registration failed; syncing by periodic reconcile only", extra={"error": repr(exc)})

    def _saved_secret(self) -> str | None:
        try:
            return self._secret_file.read_text().strip() or None
        except OSError:
            return None

    def _save_secret(self, secret: str) -> None:
        try:
            self._secret_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._secret_file.with_name(f".{self._secret_file.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret)
            os.replace(tmp, self._secret_file)
        except OSError as exc:
            log.warning("cannot keep the sidecar's secret; it registers anew after a restart", extra={"error": str(exc)})

    def _heartbeat(self) -> None:
        live = self.syncer.installed()
        body: dict[str, Any] = {
            "version": live.version if live else 0,
            "sha256": live.sha256 or None if live else None,
            "deployment_id": live.deployment_id or None if live else None,
            "last_sync_at": self.last_sync_at,
            "last_notified_at": self.last_notified_at,
            "last_error": self.last_error,
            "failures": self.failures,
            "parser": self.parse.label,
        }
        if self._older_api:
            del body["last_notified_at"]
        try:
            self.api.heartbeat(self.cfg.deployment, self.cfg.name, body, self.secret)
        except ApiError as exc:
            if exc.status == 404 or (exc.status == 403 and "secret" in str(exc)):
                # not registered (the janitor removed it, the stack was recreated) or under another secret
                self._register()
                self._reconcile_now = True
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
            self.api.deregister_sidecar(self.cfg.deployment, self.cfg.name, self.secret)
            log.info("deregistered", extra={"sidecar": self.cfg.name})
        except ClientError as exc:
            log.warning("deregistration failed", extra={"error": str(exc)})
