"""Publishing a validated deploy as the next version: manifest, DAG diff, transaction, announcement.

Shared by the ingest function (new uploads) and rollback (an earlier bundle again).
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger

from chalicelib.exceptions import Conflict, StorageError
from chalicelib.manifest import diff_manifests
from chalicelib.models import Deploy, DeployDiff, Version
from chalicelib.notify import Notifier
from chalicelib.settings import Settings
from chalicelib.storage import BundleStorage
from chalicelib.store import Store, VersionRace
from chalicelib.validation import FileEntry

logger = Logger(service="dagcast", child=True)

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

    def save_manifest(self, deploy: Deploy, manifest: list[FileEntry]) -> str:
        key = manifest_key(deploy.deployment, deploy.deploy_id)
        body = json.dumps([f.model_dump() for f in manifest], separators=(",", ":")).encode()
        self._bundles.put(key, body, "application/json")
        return key

    def load_manifest(self, key: str | None) -> list[FileEntry] | None:
        if not key:
            return None
        try:
            raw = self._bundles.read(key)
        except StorageError:
            logger.warning("manifest missing; diff computed against nothing", extra={"manifest_key": key})
            return None
        return [FileEntry.model_validate(f) for f in json.loads(raw)]

    def diff_against_live(self, deployment: str, manifest: list[FileEntry]) -> DeployDiff:
        current = self._store.get_deployment(deployment)
        previous: list[FileEntry] | None = None
        if current.current_deploy_id:
            prev = self._store.get_deploy(deployment, current.current_deploy_id)
            previous = self.load_manifest(prev.manifest_key)
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
