"""Publishing a validated deploy as the next version: manifest, delta, DAG diff, transaction, announcement.

Shared by the ingest function (new uploads) and rollback (an earlier bundle again).
"""
from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from chalicelib.bundle import BuiltDelta, FileEntry, Limits
from chalicelib.events import EventSink, EventType, NoEvents, deploy_detail
from chalicelib.exceptions import Conflict, DagcastError, StorageError
from chalicelib.manifest import MANIFEST_CONTENT_TYPE, DeployDiff, ManifestError, decode_manifest, diff_manifests, encode_manifest
from chalicelib.models import Delta, Deploy, Deployment, DeployState, Version
from chalicelib.notify import Notifier
from chalicelib.settings import Settings
from chalicelib.signing import Signer, SigningError, statement_bytes
from chalicelib.storage import BUNDLE_CONTENT_TYPE, BundleStorage, delta_key
from chalicelib.store import Store, VersionRace

if TYPE_CHECKING:
    from chalicelib.bundle.segments import SegmentIndex

logger = Logger(service="dagcast", child=True)

CACHED_MANIFESTS = 4


def new_uid() -> str:
    """A deployment's immutable id: 16 random hex digits."""
    return secrets.token_hex(8)


def version_statement(version: Version) -> dict[str, Any]:
    """What an announcement vouches for: the version's identity, where its bytes are, the limits a
    sidecar extracts it with, and its delta (see chalicelib.signing)."""
    doc = version.model_dump(mode="json", include={"deployment", "deployment_id", "version", "deploy_id", "sha256",
                                                    "size", "object_version", "limits", "delta", "created_at",
                                                    "parse_mode"})
    return {"type": "dagcast.version", **doc}


def manifest_key(deployment: str, deploy_id: str) -> str:
    return f"manifests/{deployment}/{deploy_id}.json.gz"


def segments_key(deployment: str, deploy_id: str) -> str:
    return f"manifests/{deployment}/{deploy_id}.segments.json.gz"


@dataclass(frozen=True)
class LiveBase:
    """The version live when a deploy started validating, with its file list."""

    version: int
    deploy_id: str
    manifest: list[FileEntry]
    sha256: str = ""


class Publisher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        bundles: BundleStorage,
        notifier: Notifier,
        clock: Callable[[], int],
        signer: Signer,
        events: EventSink | None = None,
    ) -> None:
        self.events = events or NoEvents()
        self._settings = settings
        self._store = store
        self._bundles = bundles
        self._notifier = notifier
        self._clock = clock
        self._signer = signer
        # Manifests never change once written (one key per deploy), so a warm function keeps the last
        # few: the one it just saved is the one the next deploy diffs against.
        self._manifests: OrderedDict[str, list[FileEntry]] = OrderedDict()

    def save_manifest(self, deploy: Deploy, manifest: list[FileEntry]) -> str:
        key = manifest_key(deploy.deployment, deploy.deploy_id)
        self._bundles.put(key, encode_manifest(manifest), MANIFEST_CONTENT_TYPE)
        self._remember(key, manifest)
        return key

    def save_segments(self, deploy: Deploy, index: SegmentIndex) -> dict[str, str]:
        """Keep the bundle's segment index; the deploy record's fields that name it (and its sha256,
        which the record vouches for: the object alone is not trusted)."""
        key = segments_key(deploy.deployment, deploy.deploy_id)
        data = index.encode()
        try:
            self._bundles.put(key, data, MANIFEST_CONTENT_TYPE)
        except StorageError as exc:  # it only saves time: the next rebuild reads the whole base instead
            logger.warning("segment index not kept", extra={"segments_key": key, "reason": str(exc)})
            return {}
        return {"segments_key": key, "segments_sha256": hashlib.sha256(data).hexdigest()}

    def load_segments(self, key: str | None, sha256: str | None) -> SegmentIndex | None:
        """The segment index a deploy record names, when it is the one ingest wrote; else None (a
        rebuild then reads the whole base)."""
        if not key or not sha256:
            return None
        try:
            data = self._bundles.read(key)
        except StorageError:
            logger.warning("segment index missing", extra={"segments_key": key})
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            logger.error("segment index is not the one written; not used", extra={"segments_key": key})
            return None
        from chalicelib.bundle.segments import SegmentIndex, SegmentIndexError  # ingest's alone: not at API start

        try:
            return SegmentIndex.decode(data)
        except SegmentIndexError as exc:
            logger.error("segment index unreadable; not used", extra={"segments_key": key, "reason": str(exc)})
            return None

    def load_manifest(self, key: str | None) -> list[FileEntry] | None:
        if not key:
            return None
        if key in self._manifests:
            self._manifests.move_to_end(key)
            return self._manifests[key]
        try:
            raw = self._bundles.read(key)
        except StorageError:
            logger.warning("manifest missing; diff computed against nothing", extra={"manifest_key": key})
            return None
        try:
            manifest = decode_manifest(raw)
        except ManifestError as exc:
            logger.error("manifest unreadable; diff computed against nothing", extra={"manifest_key": key, "reason": str(exc)})
            return None
        self._remember(key, manifest)
        return manifest

    def _remember(self, key: str, manifest: list[FileEntry]) -> None:
        self._manifests[key] = manifest
        self._manifests.move_to_end(key)
        while len(self._manifests) > CACHED_MANIFESTS:
            self._manifests.popitem(last=False)

    def live_base(self, deployment: Deployment) -> LiveBase | None:
        """The deployment's live version and its manifest; None before the first version."""
        if not deployment.current_deploy_id:
            return None
        prev = self._store.get_deploy_fields(deployment.name, deployment.current_deploy_id, ["manifest_key", "sha256"])
        manifest = self.load_manifest(prev.get("manifest_key"))
        if manifest is None:
            return None
        return LiveBase(deployment.current_version, deployment.current_deploy_id, manifest, str(prev.get("sha256", "")))

    def save_delta(self, deploy: Deploy, base: LiveBase, built: BuiltDelta) -> Delta:
        key = delta_key(deploy.deployment, deploy.deploy_id)
        object_version = self._bundles.put(key, built.data, BUNDLE_CONTENT_TYPE)
        return Delta(
            base_version=base.version,
            base_sha256=base.sha256 or None,
            key=key,
            sha256=built.sha256,
            size=len(built.data),
            object_version=object_version,
            files=built.files,
            removed=built.removed,
            files_sha256=built.files_sha256,
        )

    def announce(self, version: Version) -> None:
        """Publish the signed statement of a version, with short-lived download URLs pinned to its
        object versions (a sidecar trusts the statement, never the URLs: it checks what it downloads)."""
        expiry = self._settings.announce_url_expiry_seconds
        url = self._bundles.presigned_download(version.key, expiry, version.object_version)
        delta = version.delta
        delta_url = self._bundles.presigned_download(delta.key, expiry, delta.object_version) if delta else None
        statement = statement_bytes(version_statement(version))
        try:
            signature = self._signer.sign(statement)
            key_id = self._signer.key_id
        except SigningError as exc:
            raise StorageError(f"cannot sign the announcement of version {version.version}: {exc}") from exc
        self._notifier.publish_version(version, statement, signature, key_id, url, delta_url)

    def _emit_activation(self, deploy: Deploy, version: Version, previous: str | None, fields: dict[str, Any]) -> None:
        live = deploy.model_copy(update={"version": version.version, "state": DeployState.ACTIVE})
        diff = fields.get("diff") or {}
        self.events.emit(EventType.ACCEPTED, deploy_detail(
            EventType.ACCEPTED, live, files=fields.get("files"), bytes=fields.get("bytes"),
            validation_ms=fields.get("validation_ms"), rollback_of=deploy.rollback_of,
            changes={k: diff.get(k, 0) for k in ("files_added", "files_changed", "files_removed",
                                                   "dags_added_count", "dags_removed_count")}))
        if deploy.rollback_of:
            to_version = self._store.get_deploy_fields(deploy.deployment, deploy.rollback_of, ["version"]).get("version")
            self.events.emit(EventType.ROLLED_BACK, deploy_detail(
                EventType.ROLLED_BACK, live, rollback_of=deploy.rollback_of,
                to_version=int(to_version) if to_version is not None else None))
        if deploy.promoted_from:
            self.events.emit(EventType.PROMOTED, deploy_detail(EventType.PROMOTED, live))
        if previous and previous != deploy.deploy_id:
            try:
                old = self._store.get_deploy(deploy.deployment, previous, dag_ids=False)  # the event names none
            except DagcastError:
                return
            self.events.emit(EventType.SUPERSEDED, deploy_detail(
                EventType.SUPERSEDED, old, superseded_by={"deploy_id": deploy.deploy_id, "version": version.version}))

    def diff_against_live(self, deployment: str, manifest: list[FileEntry]) -> DeployDiff:
        base = self.live_base(self._store.get_deployment(deployment))
        return diff_manifests(base.manifest if base else None, manifest)

    def publish(
        self,
        deploy: Deploy,
        fields: dict[str, Any],
        limits: Limits,
        object_version: str | None,
        delta: Delta | None = None,
        validator: str | None = None,
    ) -> Version | None:
        """VALIDATING -> ACTIVE as the next version; the previous live deploy becomes SUPERSEDED.

        The version records what makes it itself (the deployment's id, the bundle's sha256 and
        S3 object version), the limits it was validated with and by which validator; the announcement
        is signed.
        Retries bounded times when another deploy took the number; None when this deploy
        was already finished by another delivery (or cancelled meanwhile).
        """
        for attempt in range(self._settings.activation_retries):
            current = self._store.get_deployment(deploy.deployment)
            uid = current.uid or self._store.ensure_uid(deploy.deployment, new_uid())
            clock = self._clock()
            version = Version(
                deployment=deploy.deployment,
                version=current.last_version + 1,
                deploy_id=deploy.deploy_id,
                sha256=deploy.sha256,
                size=deploy.size,
                key=deploy.key,
                created_at=clock,
                deployment_id=uid,
                object_version=object_version,
                limits=limits,
                delta=delta,
                parse_mode=current.parse_mode,
                validator=validator,
            )
            try:
                self._store.activate(version, current.last_version, current.current_deploy_id,
                                     {**fields, "activated_at": clock})
            except VersionRace:
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                continue
            except Conflict:
                logger.info("deploy finished by another delivery")
                return None
            logger.info("version active", extra={"version": version.version})
            self.announce(version)
            self._emit_activation(deploy, version, current.current_deploy_id, fields)
            return version
        raise StorageError(
            f"cannot assign a version to deploy {deploy.deploy_id} after {self._settings.activation_retries} attempts"
        )
