"""Publishing a validated deploy as the next version: manifest, DAG diff, transaction, announcement.

Shared by the ingest function (new uploads) and rollback (an earlier bundle again).
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger
from pydantic import TypeAdapter

from chalicelib.exceptions import Conflict, StorageError
from chalicelib.manifest import DeployDiff, diff_manifests
from chalicelib.models import Deploy, Version
from chalicelib.notify import Notifier
from chalicelib.settings import Settings
from chalicelib.storage import BundleStorage
from chalicelib.store import Store, VersionRace
from chalicelib.validation import FileEntry

logger = Logger(service="dagcast", child=True)

MANIFESTS = TypeAdapter(list[FileEntry])
CACHED_MANIFESTS = 4


def manifest_key(deployment: str, deploy_id: str) -> str:
    return f"manifests/{deployment}/{deploy_id}.json"


class Publisher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        bundles: BundleStorage,
        notifier: Notifier,
        clock: Callable[[], int],
    ) -> None:
        self._settings = settings
        self._store = store
        self._bundles = bundles
        self._notifier = notifier
        self._clock = clock
        # Manifests never change once written (one key per deploy), so a warm function keeps the last
        # few: the one it just saved is the one the next deploy diffs against.
        self._manifests: OrderedDict[str, list[FileEntry]] = OrderedDict()

    def save_manifest(self, deploy: Deploy, manifest: list[FileEntry]) -> str:
        key = manifest_key(deploy.deployment, deploy.deploy_id)
        self._bundles.put(key, MANIFESTS.dump_json(manifest), "application/json")
        self._remember(key, manifest)
        return key

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
        manifest = MANIFESTS.validate_json(raw)
        self._remember(key, manifest)
        return manifest

    def _remember(self, key: str, manifest: list[FileEntry]) -> None:
        self._manifests[key] = manifest
        self._manifests.move_to_end(key)
        while len(self._manifests) > CACHED_MANIFESTS:
            self._manifests.popitem(last=False)

    def diff_against_live(self, deployment: str, manifest: list[FileEntry]) -> DeployDiff:
        current = self._store.get_deployment(deployment)
        previous: list[FileEntry] | None = None
        if current.current_deploy_id:
            prev = self._store.get_deploy_fields(deployment, current.current_deploy_id, ["manifest_key"])
            previous = self.load_manifest(prev.get("manifest_key"))
        return diff_manifests(previous, manifest)

    def publish(self, deploy: Deploy, fields: dict[str, Any]) -> Version | None:
        """VALIDATING -> ACTIVE as the next version; the previous live deploy becomes SUPERSEDED.

        Retries bounded times when another deploy took the number; None when this deploy
        was already finished by another delivery.
        """
        for attempt in range(self._settings.activation_retries):
            current = self._store.get_deployment(deploy.deployment)
            clock = self._clock()
            version = Version(
                deployment=deploy.deployment,
                version=current.last_version + 1,
                deploy_id=deploy.deploy_id,
                sha256=deploy.sha256,
                size=deploy.size,
                key=deploy.key,
                created_at=clock,
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
            url = self._bundles.presigned_download(version.key, self._settings.announce_url_expiry_seconds)
            self._notifier.publish_version(version, url)
            return version
        raise StorageError(
            f"cannot assign a version to deploy {deploy.deploy_id} after {self._settings.activation_retries} attempts"
        )
