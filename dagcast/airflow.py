"""A DAG bundle for Airflow 3: every DAG run sees one dagcast version, from its first task to its last.

Install with `pip install 'dagcast[airflow]'` and configure it in `[dag_processor] dag_bundle_config_list`:

    [{"name": "dags", "classpath": "dagcast.airflow.DagcastDagBundle",
      "kwargs": {"root": "/opt/airflow/dagcast", "refresh_interval": 5}}]

`root` is the dagcast sidecar's `--root` on a volume shared with the Airflow container; the API
URL, deployment and token come from kwargs or from DAGCAST_API_URL, DAGCAST_DEPLOYMENT and
DAGCAST_TOKEN (a token with the sidecar role is enough), and are only needed to fetch a version
this machine does not have.

Two ways Airflow uses a bundle:

* Without a version (the DAG processor): `refresh()` reads the `current` link the sidecar keeps
  (no network) and pins `path` to that version's folder, `get_current_version()` reports it. A
  lease (`dagcast.lease`) stops the sidecar from pruning the pinned folder while it is parsed.
* With a version (a worker running a task of a DAG run that started on that version):
  `initialize()` makes sure `<dag_bundle_storage_path>/<name>/versions/<n>-<sha16>` exists:
  hard-linked from the sidecar's copy when it has one, otherwise downloaded through the API,
  verified by sha256 and extracted with the limits that version was validated with.

Bundle versions are dagcast's version folder names, `<n>-<sha16>`: the version number and the
start of its bundle's sha256, so a version recorded on a DAG run names exactly one bundle, even
if the dagcast stack is later recreated and numbers its versions from 1 again. Those copies are Airflow's
  own, tracked by its bundle version locks while tasks run and removed by its stale bundle
  cleanup, so a version a task still uses is never removed under it.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from airflow.dag_processing.bundles.base import BaseDagBundle, BundleVersion

from chalicelib.models import Version
from dagcast.client import ApiClient
from dagcast.exceptions import ApiError, ClientError, ConfigError
from dagcast.lease import Lease
from dagcast.sidecar import SidecarConfig, Syncer, parse_folder

log = logging.getLogger("dagcast.airflow")


class DagcastBundleError(ClientError):
    """The bundle cannot provide the requested version."""


class DagcastDagBundle(BaseDagBundle):
    """DAGs deployed by dagcast; versions are dagcast's version folders ("12-3f9a2c1d0e4b5a6c", ...)."""

    supports_versioning = True

    def __init__(
        self,
        *,
        root: str,
        link: str | None = None,
        api_url: str | None = None,
        deployment: str | None = None,
        token: str | None = None,
        console_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.link = Path(link) if link else self.root / "current"
        self.api_url = (api_url or os.environ.get("DAGCAST_API_URL") or "").rstrip("/")
        self.deployment = deployment or os.environ.get("DAGCAST_DEPLOYMENT") or ""
        self._token = token or os.environ.get("DAGCAST_TOKEN") or ""
        self.console_url = (console_url or (self.api_url + "/" if self.api_url else "")).rstrip("/") + "/"
        if self.version is not None and not _is_version(self.version):
            raise DagcastBundleError(
                f"bundle {self.name!r}: {self.version!r} is not a dagcast version (expected <n>-<sha16>, as 12-3f9a2c1d0e4b5a6c)"
            )
        self._pinned: str | None = None  # the version folder the unversioned (DAG processor) instance serves
        self._lease: Lease | None = None

    # --- what Airflow asks ---------------------------------------------------------------

    @property
    def path(self) -> Path:
        if self.version is not None:
            return self.versions_dir / self.version
        live = self._pinned if self._pinned is not None else self._live_version()
        return self.root / "versions" / live if live else self.link

    def get_current_version(self) -> BundleVersion | None:
        version = self.version if self.version is not None else (self._pinned or self._live_version())
        return None if version is None else BundleVersion(version=version)

    def initialize(self) -> None:
        if self.version is not None:
            self._ensure_local(self.version)
        else:
            self._pin()
        super().initialize()

    def refresh(self) -> None:
        """Follow the sidecar's `current` link: a readlink, no network."""
        if self.version is not None:
            raise DagcastBundleError(f"bundle {self.name!r} is pinned to version {self.version}; only an unversioned bundle refreshes")
        self._pin()

    def view_url(self, version: str | None = None) -> str | None:
        template = self.view_url_template()
        return template.format(version=version or "") if template else None

    def view_url_template(self) -> str | None:
        if self._view_url_template:
            return self._view_url_template
        if not self.console_url.startswith(("http://", "https://")) or not self.deployment:
            return None
        deployment = self.deployment.replace("{", "{{").replace("}", "}}")
        return f"{self.console_url}#d={deployment}&tab=history&v={{version}}"

    # --- the DAG processor's view: the sidecar's live version, leased -------------------------

    def _live_version(self) -> str | None:
        try:
            name = Path(os.readlink(self.link)).name
        except OSError:
            return None
        return name if parse_folder(name) else None

    def _pin(self) -> None:
        for _ in range(5):
            live = self._live_version()
            if live is None:
                if self._pinned is not None:
                    log.warning("the sidecar's link %s is missing; staying on version %s", self.link, self._pinned)
                    return
                raise DagcastBundleError(
                    f"no dagcast version at {self.link} yet: is the sidecar running with --root {self.root}?"
                )
            if live == self._pinned:
                return
            lease = Lease(self.root, live)
            lease.acquire()
            if (self.root / "versions" / live).is_dir():
                previous, self._lease, self._pinned = self._lease, lease, live
                if previous is not None:
                    previous.release()
                log.info("bundle %s now on dagcast version %s", self.name, live)
                return
            lease.release()  # pruned between readlink and lease: read the link again
        raise DagcastBundleError(f"the sidecar's versions under {self.root} keep changing; try again")

    # --- a worker's view: one exact version, on local disk -----------------------------------

    def _ensure_local(self, version: str) -> None:
        folder = self.versions_dir / version
        if folder.is_dir():
            return
        with self.lock():  # one process at a time per bundle; the others then find the folder
            if folder.is_dir():
                return
            syncer = self._syncer()
            try:
                syncer.prepare()  # under the lock: leftovers are from processes that died mid-way
                self._drop_orphan_manifests(syncer)
                if self._link_from_sidecar(version, folder):
                    log.info("bundle %s version %s linked from the sidecar's copy", self.name, version)
                    return
                record, url = self._look_up(syncer, version)
                syncer.fetch(record, url)
                log.info("bundle %s version %s fetched and verified", self.name, version)
            finally:
                syncer.http.close()
                syncer.api.close()

    def _link_from_sidecar(self, version: str, folder: Path) -> bool:
        source = self.root / "versions" / version
        if not source.is_dir():
            return False
        tmp = folder.parent / f".tmp-{version}"
        try:
            with Lease(self.root, version):
                if not source.is_dir():
                    return False
                _link_tree(source, tmp)
            os.rename(tmp, folder)
            return True
        except OSError as exc:
            log.warning("cannot copy version %s from %s (%s); fetching it instead", version, source, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            return False

    def _syncer(self) -> Syncer:
        cfg = SidecarConfig(name=self.name, root=self.base_dir, link=self.base_dir / ".unused-link", deployment=self.deployment)
        return Syncer(cfg, self._client())

    @staticmethod
    def _drop_orphan_manifests(syncer: Syncer) -> None:
        """Airflow's stale bundle cleanup removes version folders; drop the manifests they leave."""
        for manifest in syncer.manifests.glob("*.json"):
            if not (syncer.versions / manifest.stem).is_dir():
                manifest.unlink(missing_ok=True)

    def _client(self) -> ApiClient:
        missing = [n for n, v in (("api_url", self.api_url), ("deployment", self.deployment), ("token", self._token)) if not v]
        if missing:
            raise ConfigError(
                f"bundle {self.name!r} needs {', '.join(missing)} to fetch a version it does not have "
                "(bundle kwargs, or DAGCAST_API_URL, DAGCAST_DEPLOYMENT, DAGCAST_TOKEN)"
            )
        return ApiClient(self.api_url, self._token)

    def _look_up(self, syncer: Syncer, version: str) -> tuple[Version, str]:
        """The version's record from the API, which must be the bundle the version string names."""
        number, sha = parse_folder(version) or (0, "")
        try:
            view = syncer.api.get_version(self.deployment, number)
            record = Version.model_validate(view["version"])
        except ApiError as exc:
            if exc.status == 404:
                raise DagcastBundleError(f"deployment {self.deployment!r} has no version {number}") from exc
            raise DagcastBundleError(f"cannot look up version {number} of {self.deployment!r}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise DagcastBundleError(f"the API's answer for version {number} is not a version record") from exc
        if not record.sha256.startswith(sha):
            raise DagcastBundleError(
                f"version {number} of {self.deployment!r} is now bundle {record.sha256[:16]}, not {sha}: the dagcast "
                "stack was recreated or restored, and the version this DAG run started on is gone"
            )
        if not view.get("download_url"):
            raise DagcastBundleError(f"this token may not download bundles of {self.deployment!r}: use a sidecar token")
        return record, str(view["download_url"])

    def __repr__(self) -> str:
        return f"DagcastDagBundle(name={self.name}, root={self.root}, version={self.version})"


def _link_tree(source: Path, dest: Path) -> None:
    """Recreate `source` at `dest` with hard links (files are immutable), copying across filesystems."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _is_version(value: str) -> bool:
    return parse_folder(value) is not None
