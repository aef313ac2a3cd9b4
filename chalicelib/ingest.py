"""The ingest function's logic: check an uploaded bundle and publish it as a new version.

Idempotent by conditional state transitions: PENDING -> VALIDATING -> ACTIVE | REJECTED.
A second delivery of the same event finds the deploy final and changes nothing; a
delivery after a crash mid-way finds it VALIDATING and finishes the job.

Writes that must not stay are removed: an upload for a deploy that was cancelled or expired,
and a second write to the key of a deploy already decided (its recorded object version is the
one that is served; see chalicelib.storage). Python is compiled within bounds (memory and CPU
per file, a deadline per bundle; see chalicelib.bundle.compile_workers).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, BinaryIO
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import S3Event

from chalicelib.bundle import (
    Bounds,
    BuiltDelta,
    BundleError,
    BundleRejected,
    CompileCache,
    CompileWorkerError,
    CompileWorkers,
    DeltaCollector,
    DeltaMismatch,
    Issue,
    Limits,
    Report,
    validate_stream,
)
from chalicelib.bundle.rebuild import read_delta, rebuild_bundle
from chalicelib.bundle.segments import SegmentIndex, SegmentTracker
from chalicelib.bundle.written import WrittenCheck
from chalicelib.events import EventType, deploy_detail, errors_detail
from chalicelib.exceptions import NotFound, StorageError
from chalicelib.manifest import diff_manifests
from chalicelib.models import Delta, DeltaUpload, Deploy, Deployment, DeployState, IngestEvent, Version
from chalicelib.publish import LiveBase, Publisher
from chalicelib.settings import Settings
from chalicelib.storage import BundleStorage, parse_bundle_key, parse_delta_key
from chalicelib.store import Store
from chalicelib.telemetry import Telemetry

logger = Logger(service="dagcast", child=True)

MAX_STORED_ERRORS = 100
# Python files this container compiled before, by content hash: a warm function validating the
# everyday one-file change compiles one file. Different bytes never hit (see CompileCache).
_COMPILED = CompileCache()
# Bounded compile workers, one per CPU: every large Python file is compiled alone in one of them,
# and a large bundle that is mostly new Python (a first deploy) by all of them. Started with the
# function and kept, like the cache, for the next bundle.
_WORKERS: CompileWorkers | None = None
PARALLEL_MIN_BUNDLE = 2 * 1024 * 1024  # compressed bytes; smaller bundles compile in well under a second
ABANDONED = (DeployState.CANCELLED, DeployState.EXPIRED)
# writes that need not wait on each other (threads start on first use; kept, like the workers, by a warm function)
_BACKGROUND = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dagcast-ingest")


def compile_workers(settings: Settings) -> CompileWorkers:
    global _WORKERS
    if _WORKERS is None:
        _WORKERS = CompileWorkers(bounds=Bounds(settings.compile_memory_mb, settings.compile_cpu_seconds))
        _WORKERS.start()
    return _WORKERS
MAX_STORED_DAG_IDS = 2000


class Outcome(str, Enum):
    ACTIVE = "active"
    REJECTED = "rejected"
    IGNORED = "ignored"


class Ingest:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        bundles: BundleStorage,
        publisher: Publisher,
        clock: Callable[[], int],
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._bundles = bundles
        self._publisher = publisher
        self._clock = clock
        self._telemetry = telemetry or Telemetry()
        self._workers = compile_workers(settings)

    def handle(self, event: IngestEvent) -> Outcome:
        delta = parse_delta_key(event.key)
        if delta is not None and event.bucket == self._bundles.bucket:
            return self._with_keys(event, *delta, self._handle_delta)
        parsed = parse_bundle_key(event.key)
        if parsed is None or event.bucket != self._bundles.bucket:
            logger.warning("ignoring object that is not a bundle", extra={"key": event.key})
            return Outcome.IGNORED
        return self._with_keys(event, *parsed, self._handle)

    def _with_keys(self, event: IngestEvent, deployment: str, deploy_id: str,
                   handler: Callable[[IngestEvent, str, str], Outcome]) -> Outcome:
        logger.append_keys(deployment=deployment, deploy_id=deploy_id)
        logger.set_correlation_id(deploy_id)
        try:
            return handler(event, deployment, deploy_id)
        finally:  # the next record of the batch (or the next invocation of a warm function) is another deploy
            logger.remove_keys(["deployment", "deploy_id"])
            logger.set_correlation_id(None)

    def _handle(self, event: IngestEvent, deployment: str, deploy_id: str) -> Outcome:
        try:
            deploy = self._store.get_deploy(deployment, deploy_id)
        except NotFound:
            logger.warning("ignoring upload with no deploy record", extra={"key": event.key})
            return Outcome.IGNORED
        if deploy.delta is not None and not deploy.state.final:
            # A delta deploy's bundle is written by ingest itself, once validated, and published by that same
            # invocation (or, after a crash, by the delta's redelivery): its arrival here changes nothing, and
            # whatever else is written to the key is not the object version that is published.
            logger.info("a delta deploy's bundle: decided by its delta's handler", extra={"state": deploy.state.value})
            return Outcome.IGNORED
        uploaded_at = None if deploy.state.final else self._store.start_validation(
            deployment, deploy_id, self._clock(), stored_at=event.stored_at
        )
        if uploaded_at is None:
            self._remove_late_write(self._store.get_deploy(deployment, deploy_id), event)
            return Outcome.IGNORED
        return self._validate_and_publish(deploy.model_copy(update={"uploaded_at": uploaded_at}), event.version_id)

    def _handle_delta(self, event: IngestEvent, deployment: str, deploy_id: str) -> Outcome:
        """An uploaded delta: rebuild the deploy's bundle from its base version into a local file, validate
        that like any upload, and store it at the deploy's key only once it is valid, then publish (the
        deploy stays PENDING until it is rebuilt). A delta that cannot give the announced bundle rejects
        the deploy, saying why; a redelivery after a crash while the rebuilt bundle was validated redoes both."""
        try:
            deploy = self._store.get_deploy(deployment, deploy_id)
        except NotFound:
            logger.warning("ignoring delta with no deploy record", extra={"key": event.key})
            return Outcome.IGNORED
        redelivered = deploy.state is DeployState.VALIDATING and deploy.rebuilt_at is not None  # a crash mid-way
        if deploy.delta is None or deploy.delta_key != event.key or not (deploy.state is DeployState.PENDING or redelivered):
            # Once the bundle is rebuilt the delta is kept until the bundle is decided (see _sidecar_delta).
            if deploy.state in ABANDONED or deploy.state is DeployState.REJECTED or deploy.delta_key != event.key:
                self._bundles.delete(event.key)  # cancelled, expired or rejected: the delta has no more use
            logger.info("delta not needed", extra={"state": deploy.state.value})
            return Outcome.IGNORED
        started = time.monotonic()
        with tempfile.TemporaryFile(prefix="dagcast-rebuilt-") as out:
            rebuilt = self._rebuild(deploy, deploy.delta, event.version_id, out, started)
            if isinstance(rebuilt, _Rebuilt):
                # Validated here, from the file just written, and stored only once valid: no second
                # download, no wait for the stored bundle's own notification (which then finds it decided).
                fresh = self._store.start_rebuilt_validation(deployment, deploy_id, self._clock(), rebuilt.read_version,
                                                             stored_at=event.stored_at)
                if fresh is None:
                    logger.info("deploy cancelled or expired while its bundle was rebuilt")
                    self._bundles.delete(event.key)
                    return Outcome.IGNORED
                # The uploaded delta stays until the rebuilt bundle is decided: when its base is still the
                # live version, it is the sidecars' delta too (see _sidecar_delta).
                logger.info("bundle rebuilt from a delta", extra={
                    "base_version": deploy.delta.base_version, "delta_bytes": deploy.delta.size,
                    "bundle_bytes": deploy.size})
                out.seek(0)
                return self._validate_and_publish(fresh, None, rebuilt=out, known=rebuilt)
        if self._store.start_validation(deployment, deploy_id, self._clock(), stored_at=event.stored_at) is None:
            return Outcome.IGNORED
        self._bundles.delete(event.key)
        return self._reject(deploy, [rebuilt], started)

    def _rebuild(self, deploy: Deploy, delta: DeltaUpload, object_version: str | None, out: BinaryIO,
                 started: float) -> Issue | _Rebuilt:
        """Write the rebuilt bundle to `out` (a local file, stored at deploy.key once it is valid): what it
        was rebuilt from, or the Issue that rejects the deploy. The reads go out together: the deployment,
        the base version and the uploaded delta, then the base's file list and its bundle."""
        assert deploy.delta_key is not None
        later_base = _BACKGROUND.submit(self._store.get_version, deploy.deployment, delta.base_version)
        later_delta = _BACKGROUND.submit(self._bundles.open, deploy.delta_key, object_version)
        try:
            return self._rebuild_from(deploy, delta, later_base, later_delta, out, started)
        finally:
            with contextlib.suppress(Exception):  # whatever path was taken, the delta's stream is closed
                later_delta.result()[0].close()

    def _rebuild_from(self, deploy: Deploy, delta: DeltaUpload, later_base: Future[Version],
                      later_delta: Future[tuple[BinaryIO, int, str | None]], out: BinaryIO,
                      started: float) -> Issue | _Rebuilt:
        deployment = self._store.get_deployment(deploy.deployment)
        if deployment.current_version != delta.base_version:
            return _issue("base_moved", f"the delta was made against v{delta.base_version}, but "
                          f"v{deployment.current_version} went live meanwhile; deploy again (the CLI does, once)")
        try:
            base = later_base.result()
        except NotFound:
            return _issue("base_unavailable", f"v{delta.base_version}, the delta's base, is no longer kept")
        if base.sha256 != delta.base_sha256:
            return _issue("base_moved", f"v{delta.base_version} is not the bundle the delta was made against")
        later_body = _BACKGROUND.submit(self._bundles.open, base.key, base.object_version)
        try:
            return self._rebuild_on(deploy, delta, deployment, base, later_delta, later_body, out, started)
        finally:
            with contextlib.suppress(Exception):
                later_body.result()[0].close()

    def _rebuild_on(self, deploy: Deploy, delta: DeltaUpload, deployment: Deployment, base: Version,
                    later_delta: Future[tuple[BinaryIO, int, str | None]],
                    later_body: Future[tuple[BinaryIO, int, str | None]], out: BinaryIO,
                    started: float) -> Issue | _Rebuilt:
        base_deploy = self._store.get_deploy_fields(deploy.deployment, base.deploy_id,
                                                    ["manifest_key", "segments_key", "segments_sha256"])
        later_index = _BACKGROUND.submit(self._publisher.load_segments, base_deploy.get("segments_key"),
                                         base_deploy.get("segments_sha256"))
        manifest = self._publisher.load_manifest(base_deploy.get("manifest_key"))
        if manifest is None:
            return _issue("base_unavailable", f"the file list of v{delta.base_version}, the delta's base, is gone")
        try:
            body, size, read_version = later_delta.result()
        except StorageError:
            return _issue("upload_missing", "the uploaded delta cannot be read")
        if size != delta.size:
            return _issue("size_mismatch", f"uploaded {size} bytes of delta, announced {delta.size}")
        try:
            uploaded = read_delta(body, deployment.limits, [f.path for f in manifest], delta.removed)
        except BundleRejected as exc:
            first = exc.report.errors[0] if exc.report.errors else _issue("invalid_delta", "the delta is not valid")
            return first.model_copy(update={"message": f"the uploaded delta: {first.message}"})
        if uploaded.sha256 != delta.sha256:
            return _issue("checksum_mismatch", f"uploaded delta sha256 {uploaded.sha256} does not match "
                          f"announced {delta.sha256}")
        try:
            base_body, _, base_read = later_body.result()
        except StorageError:
            return _issue("base_unavailable", f"the bundle of v{delta.base_version}, the delta's base, is gone")
        # the base is the live version (checked above): the sidecars' delta and the diff are against it
        live = LiveBase(base.version, base.deploy_id, manifest, base.sha256)
        collect = DeltaCollector({f.path: f.sha256 for f in manifest})
        # Validated as it is written when the bytes read are the ones the base's validation passed, by
        # this validator (see WrittenCheck); else read again once written, like any upload.
        check = None
        pinned = bool(base.object_version) and base_read == base.object_version
        # and the base's segments that the new bundle keeps are copied by its index only from those bytes
        base_index = later_index.result() if pinned else None
        if base.validator == CompileCache.TAG and pinned:
            check = WrittenCheck(deployment.limits, {f.path: f for f in manifest}, cache=_COMPILED,
                                 workers=self._workers, parallel=deploy.size >= PARALLEL_MIN_BUNDLE,
                                 deadline=started + self._settings.validation_deadline_seconds, collect=collect)
        try:
            info = rebuild_bundle(base_body, base.limits, uploaded, delta.removed, delta.files_sha256, out,
                                  {f.path: (f.sha256, f.size) for f in manifest}, delta.compresslevel, check,
                                  base_index)
            if (info.sha256, info.size) != (deploy.sha256, deploy.size):
                return _issue("delta_rebuild_mismatch", f"the bundle rebuilt from v{delta.base_version} and the delta "
                              f"(sha256 {info.sha256}, {info.size} bytes) is not the announced one "
                              f"(sha256 {deploy.sha256}, {deploy.size} bytes)")
            report = check.report(info) if check is not None else None
        except DeltaMismatch as exc:
            return _issue("delta_mismatch", str(exc))
        except BundleError as exc:
            return _issue("delta_mismatch", f"the rebuilt bundle cannot be written: {exc}")
        except OSError as exc:  # the S3 stream broke: let the queue redeliver
            raise StorageError(f"cannot read the base bundle {base.key}: {exc}") from exc
        except CompileWorkerError as exc:  # killed mid-bundle (out of memory?): let the queue redeliver
            raise StorageError(f"cannot validate the bundle rebuilt for {deploy.key}: {exc}") from exc
        finally:
            if check is not None:
                check.close()
        if check is not None:
            logger.info("rebuilt bundle validated as it was written", extra={"reused_verdicts": check.reused})
        # the object version actually read (a notification may not name one): the sidecars' delta is pinned to it
        return _Rebuilt(deployment, live, read_version, collect, report, SegmentIndex(delta.compresslevel, info.segments))

    def _remove_late_write(self, deploy: Deploy, event: IngestEvent) -> None:
        """A write to the key of a deploy already decided: the upload of a cancelled or expired deploy
        is deleted; another object version of a deploy that went live or was rejected is deleted, so
        the recorded one stays current (downloads are pinned to it either way)."""
        if deploy.state in ABANDONED:
            logger.info("deleting the upload of an abandoned deploy", extra={"state": deploy.state.value})
            self._bundles.delete(deploy.key)
            return
        recorded = self._recorded_object_version(deploy)
        if recorded is None or event.version_id == recorded:
            logger.info("deploy already processed", extra={"state": deploy.state.value})
        elif event.version_id:
            logger.warning("deleting a second write to a decided deploy's bundle", extra={"state": deploy.state.value})
            self._bundles.delete_version(deploy.key, event.version_id)
        else:  # a notification that does not say which object version it is about: keep only the recorded one
            removed = self._bundles.delete_other_versions(deploy.key, recorded)
            if removed:
                logger.warning("deleted second writes to a decided deploy's bundle", extra={"removed": len(removed)})

    def _recorded_object_version(self, deploy: Deploy) -> str | None:
        if deploy.version is None:
            return deploy.object_version
        try:
            return self._store.get_version(deploy.deployment, deploy.version).object_version
        except NotFound:
            return None

    def _validate_and_publish(self, deploy: Deploy, object_version: str | None, rebuilt: BinaryIO | None = None,
                              known: _Rebuilt | None = None) -> Outcome:
        """Validate the deploy's bundle (the stored upload, or the `rebuilt` local file, stored at the
        deploy's key only once it is valid) and publish it, or reject it saying why. `known`: the
        deployment and its live version as the rebuild read them, not read again, and the rebuilt
        bundle's report when it was validated as it was written."""
        started = time.monotonic()
        base: LiveBase | None
        collect: DeltaCollector | None
        if known is not None:
            deployment, base, collect = known.deployment, known.base, known.collect
        else:
            deployment = self._store.get_deployment(deploy.deployment)
            base = self._publisher.live_base(deployment)
            collect = DeltaCollector({f.path: f.sha256 for f in base.manifest}) if base else None
        if rebuilt is not None:
            body, size = rebuilt, deploy.size
        else:
            try:
                body, size, object_version = self._bundles.open(deploy.key, object_version)
            except StorageError:
                if self._store.get_deploy(deploy.deployment, deploy.deploy_id).state in ABANDONED:
                    logger.info("deploy cancelled before its upload was read")  # cancel deleted the upload
                    self._bundles.delete(deploy.key)
                    return Outcome.IGNORED
                raise
        try:
            if size != deploy.size:
                return self._reject(deploy, [_issue("size_mismatch", f"uploaded {size} bytes, announced {deploy.size}")], started)
            deadline = started + self._settings.validation_deadline_seconds
            tracker = SegmentTracker() if known is None else None
            try:
                report = known.report if known is not None and known.report is not None else validate_stream(
                    body, deployment.limits, cache=_COMPILED, collect=collect, workers=self._workers,
                    parallel=size >= PARALLEL_MIN_BUNDLE, deadline=deadline, segments=tracker,
                )
            except OSError as exc:  # the S3 stream broke: let the queue redeliver
                raise StorageError(f"cannot read bundle {deploy.key}: {exc}") from exc
            except CompileWorkerError as exc:  # killed mid-bundle (out of memory?): let the queue redeliver
                raise StorageError(f"cannot validate bundle {deploy.key}: {exc}") from exc
        finally:
            if rebuilt is None:
                body.close()
        # A bundle that broke a limit was not read to the end, so its hash covers only a prefix:
        # compare checksums only when every byte was hashed (a valid bundle always is).
        if report.compressed_bytes == size and report.sha256 != deploy.sha256:
            return self._reject(
                deploy,
                [_issue("checksum_mismatch", f"uploaded sha256 {report.sha256} does not match announced {deploy.sha256}")],
                started,
            )
        if not report.valid:
            return self._reject(deploy, report.errors, started, report, object_version)
        storing: Future[str | None] | None = None
        if rebuilt is not None:  # valid: stored now (while the manifest and the delta are made), and its
            rebuilt.seek(0)      # object version is the one published (and pinned)
            storing = _BACKGROUND.submit(self._bundles.put_checked, deploy.key, rebuilt, deploy.sha256)
        segments = known.segments if known is not None else tracker.index() if tracker is not None else None
        try:
            return self._activate(deploy, report, started, base, collect, deployment.limits, object_version, storing,
                                  segments)
        finally:
            if storing is not None:
                wait((storing,))  # never left writing from the file once this returns (it is closed then)

    def _sidecar_delta(self, deploy: Deploy, base: LiveBase | None, built: BuiltDelta | None) -> Delta | None:
        """The delta sidecars get: the uploaded one itself when it was made against the live version and
        is byte for byte the one ingest would write (the same deterministic writer), else ingest's own."""
        if base is None or built is None:
            self._drop_uploaded_delta(deploy)
            return None
        up = deploy.delta
        if (up is not None and deploy.delta_key and deploy.rebuilt_at is not None and up.base_version == base.version
                and up.sha256 == built.sha256 and len(built.data) == up.size):
            logger.info("the uploaded delta is the sidecars' delta", extra={"base_version": base.version})
            return Delta(base_version=base.version, base_sha256=base.sha256 or None, key=deploy.delta_key,
                         sha256=up.sha256, size=up.size, object_version=deploy.delta_object_version,
                         files=built.files, removed=built.removed, files_sha256=built.files_sha256)
        self._drop_uploaded_delta(deploy)
        return self._publisher.save_delta(deploy, base, built)

    def _drop_uploaded_delta(self, deploy: Deploy) -> None:
        if deploy.delta_key:
            self._bundles.delete(deploy.delta_key)

    def _reject(
        self, deploy: Deploy, errors: list[Issue], started: float, report: Report | None = None,
        object_version: str | None = None,
    ) -> Outcome:
        validation_ms = int((time.monotonic() - started) * 1000)
        fields: dict[str, Any] = {
            "errors": [e.model_dump(mode="json") for e in errors[:MAX_STORED_ERRORS]],
            "errors_truncated": max(0, len(errors) - MAX_STORED_ERRORS) + (report.errors_truncated if report else 0),
            "validation_ms": validation_ms,
            **({"object_version": object_version} if object_version else {}),
        }
        if self._store.finish_rejected(deploy.deployment, deploy.deploy_id, fields):
            reason = errors[0].code if errors else "unknown"
            logger.info("deploy rejected", extra={"errors": len(errors), "first": reason})
            self._telemetry.deploy_rejected(reason, validation_ms / 1000)
            total = len(errors) + (report.errors_truncated if report else 0)
            self._publisher.events.emit(EventType.REJECTED, deploy_detail(
                EventType.REJECTED, deploy, **{**errors_detail(errors), "errors_total": total}))
            if deploy.delta is None:  # a rejected delta was deleted, and no bundle was written
                self._bundles.tag(deploy.key, {"dagcast-state": "rejected"})  # the lifecycle rule expires it
            elif deploy.rebuilt_at is not None:  # the rebuilt bundle was invalid: neither it nor the delta is needed
                self._bundles.delete(deploy.key)
                self._drop_uploaded_delta(deploy)
        return Outcome.REJECTED

    def _activate(
        self, deploy: Deploy, report: Report, started: float, base: LiveBase | None, collect: DeltaCollector | None,
        limits: Limits, object_version: str | None, storing: Future[str | None] | None = None,
        segments: SegmentIndex | None = None,
    ) -> Outcome:
        """Publish a valid bundle. `storing`: the write of a rebuilt bundle to the deploy's key, under way
        (its object version is the one published), waited for before anything is published. `segments`:
        the bundle's segment index, kept for the rebuilds of the deltas made against it."""
        # the manifest (and the segment index) are written while the sidecars' delta is made (and written,
        # when it is ingest's own)
        saving = _BACKGROUND.submit(self._publisher.save_manifest, deploy, report.manifest)
        indexing = _BACKGROUND.submit(self._publisher.save_segments, deploy, segments) if segments else None
        built = collect.build(report.manifest, report.bytes) if collect else None
        delta = self._sidecar_delta(deploy, base, built)
        manifest_key = saving.result()
        indexed = indexing.result() if indexing is not None else {}
        if storing is not None:
            object_version = storing.result()
        if collect and collect.abandoned:
            logger.info("no delta for this deploy", extra={"reason": collect.abandoned})
        validation_ms = int((time.monotonic() - started) * 1000)
        fields = {
            "files": report.files,
            "bytes": report.bytes,
            "dag_ids": report.dag_ids[:MAX_STORED_DAG_IDS],
            "validation_ms": validation_ms,
            "manifest_key": manifest_key,
            **indexed,
            "diff": diff_manifests(base.manifest if base else None, report.manifest).model_dump(),
        }
        fields["object_version"] = object_version
        version = self._publisher.publish(deploy, fields, limits, object_version, delta, validator=CompileCache.TAG)
        if version is None:
            final = self._store.get_deploy(deploy.deployment, deploy.deploy_id)
            if final.state in ABANDONED:  # cancelled while it was validated: it never goes live
                logger.info("deploy cancelled during validation; deleting its upload")
                self._bundles.delete(deploy.key)
                if delta is not None:
                    self._bundles.delete(delta.key)
            return Outcome.IGNORED
        uploaded = deploy.uploaded_at
        self._telemetry.deploy_accepted(
            validation_s=validation_ms / 1000,
            bundle_bytes=deploy.size,
            files=report.files,
            upload_to_active_s=(version.created_at - uploaded) / 1000 if uploaded else None,
        )
        return Outcome.ACTIVE


@dataclass(frozen=True)
class _Rebuilt:
    """What a delta deploy's bundle was rebuilt from, as read for it."""

    deployment: Deployment
    base: LiveBase
    read_version: str | None  # the uploaded delta's object version
    collect: DeltaCollector  # the sidecars' delta against `base`: fed by `report`'s check, or by validation
    report: Report | None  # the rebuilt bundle's validation, when it was checked as it was written
    segments: SegmentIndex  # the rebuilt bundle's, as written


def _issue(code: str, message: str) -> Issue:
    return Issue(code=code, path=None, line=None, message=message)


def parse_notification(body: str) -> list[IngestEvent]:
    """The ObjectCreated records of an S3 notification delivered through SQS.

    S3's `s3:TestEvent` (sent when the notification is configured) and non-create
    events yield nothing. Keys arrive URL-encoded (`quote_plus`).
    """
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        logger.warning("ignoring ingest message that is not JSON")
        return []
    if not isinstance(doc, dict) or "Records" not in doc:
        return []
    events = []
    for record in S3Event(doc).records:
        if not record.event_name.startswith("ObjectCreated"):
            continue
        obj = record.s3.get_object
        events.append(IngestEvent(
            bucket=record.s3.bucket.name, key=unquote_plus(obj.key), size=obj.size,
            stored_at=_epoch_ms(record.get("eventTime")), version_id=obj.version_id or None,
        ))
    return events


def _epoch_ms(iso: Any) -> int | None:
    """`2024-01-01T00:00:00.123Z` (S3's eventTime, UTC) in epoch milliseconds; None when absent or malformed."""
    if not isinstance(iso, str):
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)
