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
from chalicelib.models import Deploy, DeployDiff, Version
from chalicelib.notify import Notifier
from chalicelib.settings import Settings
from chalicelib.storage import BundleStorage
from chalicelib.store import Store, VersionRace
from chalicelib.validation import FileEntry

logger = Logger(service="dagcast", child=True)

MAX_LISTED = 50


def manifest_key(deployment: str, deploy_id: str) -> str:
    return f"manifests/{deployment}/{deploy_id}.json"


def diff_manifests(old: list[FileEntry] | None, new: list[FileEntry]) -> DeployDiff:
    """DAGs added and removed, files added, removed and changed, between two manifests."""
    old = old or []
    before = {f.path: f for f in old}
    after = {f.path: f for f in new}
    old_dags = {d for f in old for d in f.dag_ids}
    new_dags = {d for f in new for d in f.dag_ids}
    changed = sorted(p for p in before.keys() & after.keys() if before[p].sha256 != after[p].sha256)
    return DeployDiff(
        dags_added=sorted(new_dags - old_dags)[:MAX_LISTED],
        dags_removed=sorted(old_dags - new_dags)[:MAX_LISTED],
        dags_added_count=len(new_dags - old_dags),
        dags_removed_count=len(old_dags - new_dags),
        files_added=len(after.keys() - before.keys()),
        files_removed=len(before.keys() - after.keys()),
        files_changed=len(changed),
        changed_paths=changed[:MAX_LISTED],
    )


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
            self._notifier.publish_version(version)
            return version
        raise StorageError(
            f"cannot assign a version to deploy {deploy.deploy_id} after {self._settings.activation_retries} attempts"
        )
