"""`dagcast deploy --dags`: bundle, validate, request an upload, upload, wait until live."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import httpx

from chalicelib.manifest import diff_manifests, summary
from chalicelib.validation import FileEntry, validate_stream
from dagcast import bundler, compile_cache, gitinfo
from dagcast.client import ApiClient, backoff
from dagcast.exceptions import ApiError, BundleInvalid, UploadExpired, UploadFailed, WaitTimeout

Say = Callable[[str], None]
Progress = Callable[[int, int], None]  # (bytes sent, total)


class ProgressReader:
    """A file wrapper that reports how much of it was read (httpx streams the upload through it)."""

    def __init__(self, f: BinaryIO, total: int, report: Progress) -> None:
        self._f = f
        self._total = total
        self._report = report

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._report(self._f.tell(), self._total)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


@dataclass
class DeployOptions:
    dags_path: Path
    deployment: str
    wait: bool = True
    timeout: float = 300.0
    skip_validation: bool = False
    force: bool = False
    dry_run: bool = False
    description: str = ""
    upload_attempts: int = 4
    poll_interval: float = 0.2


@dataclass
class DeployResult:
    deploy_id: str | None
    version: int | None
    state: str
    sha256: str
    files: int
    bytes: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    sidecars: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    diff: dict[str, Any] | None = None
    files_list: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "deploy_id": self.deploy_id,
            "version": self.version,
            "state": self.state,
            "sha256": self.sha256,
            "files": self.files,
            "bytes": self.bytes,
            "errors": self.errors,
            "sidecars": self.sidecars,
            "converged": self.converged,
            "diff": self.diff,
            **({"files_list": self.files_list} if self.files_list is not None else {}),
        }


def run(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None = None) -> DeployResult:
    with tempfile.TemporaryFile(prefix="dagcast-bundle-") as tmp:
        say(f"Bundling {opts.dags_path} ...")
        info = bundler.build(opts.dags_path, tmp)
        say(f"Bundled {info.files} files, {_size(info.bytes)} -> {_size(info.size)} compressed (sha256 {info.sha256[:12]})")
        report = None
        if not opts.skip_validation or opts.dry_run:
            tmp.seek(0)
            cache = compile_cache.load()
            report = validate_stream(tmp, cache=cache)
            compile_cache.save(cache)
            if not report.valid:
                errors = [e.model_dump() for e in report.errors]
                raise BundleInvalid(f"validation failed with {len(errors)} error(s); nothing was uploaded", errors)
        live = _live_version(api, opts.deployment)
        result = DeployResult(None, None, "PENDING", info.sha256, info.files, info.bytes)
        if report is not None:
            previous = _live_manifest(live)
            diff = diff_manifests(previous, report.manifest)
            result.diff = diff.model_dump()
            if live is not None:
                say(f"Changes against live v{live['version']['version']}: {summary(diff)}")
            if diff.dags_removed_count:
                say(f"warning: this deploy removes {diff.dags_removed_count} DAG(s): {', '.join(diff.dags_removed)}")
        if opts.dry_run:
            assert report is not None
            result.state = "DRY_RUN"
            result.files_list = [{"path": f.path, "size": f.size} for f in report.manifest]
            return result
        if live is not None and live["version"]["sha256"] == info.sha256 and not opts.force:
            say(f"No changes to deploy: v{live['version']['version']} already has this bundle (use --force to deploy anyway)")
            result.state = "UNCHANGED"
            result.deploy_id = live["version"]["deploy_id"]
            result.version = live["version"]["version"]
            result.converged = True
            return result
        git = gitinfo.describe(opts.dags_path)
        description = opts.description or (git or {}).get("subject") or ""
        body: dict[str, Any] = {"sha256": info.sha256, "size": info.size, "description": description[:1024]}
        if git:
            body["git"] = git
        created = api.create_deploy(opts.deployment, body)
        deploy_id = created["deploy"]["deploy_id"]
        result.deploy_id = deploy_id
        say(f"Deploy {deploy_id} created; uploading {_size(info.size)}")
        started = time.monotonic()
        form = created["upload"]
        for _ in range(2):
            try:
                upload(form, ProgressReader(tmp, info.size, progress) if progress else tmp, opts.upload_attempts, say)
                break
            except UploadExpired:
                say("the upload form expired; asking for a fresh one")
                form = api.renew_upload(opts.deployment, deploy_id)
        else:
            raise UploadFailed("the upload form expired twice; check this machine's clock")
        elapsed = max(time.monotonic() - started, 1e-6)
        say(f"Uploaded {_size(info.size)} in {elapsed:.1f}s ({_size(int(info.size / elapsed))}/s)")
        if not opts.wait:
            say("Uploaded; not waiting (--no-wait)")
            return result
        return wait(api, opts, deploy_id, result, say)


def _live_version(api: ApiClient, deployment: str) -> dict[str, Any] | None:
    try:
        return api.get_version(deployment, None)
    except ApiError as exc:
        if exc.status == 404 and exc.code == "not_found":
            return None
        raise


def _live_manifest(live: dict[str, Any] | None) -> list[FileEntry] | None:
    if not live or not live.get("manifest_url"):
        return None
    try:
        resp = httpx.get(live["manifest_url"], timeout=30)
        resp.raise_for_status()
        return [FileEntry.model_validate(f) for f in resp.json()]
    except (httpx.HTTPError, ValueError):
        return None  # the diff is informational: deploy without it


def upload(form: dict[str, Any], stream: BinaryIO | ProgressReader, attempts: int, say: Say) -> None:
    """POST the bundle to the presigned form, rewinding the stream on every attempt."""
    for attempt in range(attempts):
        last = attempt == attempts - 1
        stream.seek(0)
        try:
            resp = httpx.post(
                form["url"],
                data=form["fields"],
                files={"file": ("bundle.tar.gz", cast(IO[bytes], stream), "application/gzip")},
                timeout=httpx.Timeout(30.0, write=300.0),
            )
        except httpx.TransportError as exc:
            if last:
                raise UploadFailed(f"upload failed after {attempts} attempts: {exc}") from exc
            _retry(say, f"upload failed ({exc.__class__.__name__})", attempt, attempts)
            continue
        if resp.status_code < 300:
            return
        if resp.status_code == 403 and "expired" in resp.text.lower():
            raise UploadExpired("the presigned upload expired")
        if resp.status_code >= 500 and not last:
            _retry(say, f"upload answered {resp.status_code}", attempt, attempts)
            continue
        raise UploadFailed(f"upload refused with HTTP {resp.status_code}: {resp.text[:200]}")


def _retry(say: Say, what: str, attempt: int, attempts: int) -> None:
    delay = backoff(attempt)
    say(f"{what}; retrying in {delay:.1f}s (attempt {attempt + 2}/{attempts})")
    time.sleep(delay)


def wait(api: ApiClient, opts: DeployOptions, deploy_id: str, result: DeployResult, say: Say) -> DeployResult:
    deadline = time.monotonic() + opts.timeout
    last_state = ""
    while True:
        view = api.get_deploy(opts.deployment, deploy_id)
        deploy = view["deploy"]
        result.state = deploy["state"]
        result.version = deploy.get("version")
        result.errors = deploy.get("errors", [])
        result.sidecars = [{"name": s["name"], "version": s["version"], "live": s["live"]} for s in view["sidecars"]]
        result.diff = deploy.get("diff") or result.diff
        result.converged = bool(view["converged"])
        if result.state != last_state:
            say(f"State {result.state}" + (f" (v{result.version})" if result.version else ""))
            last_state = result.state
        if result.state == "REJECTED":
            raise BundleInvalid(f"the server rejected deploy {deploy_id}", result.errors, result.to_json())
        if result.state not in ("PENDING", "VALIDATING", "ACTIVE"):
            return result
        if result.state == "ACTIVE" and result.converged:
            say(f"v{result.version} live on {view['sidecars_on_version']}/{view['live_sidecars']} sidecars")
            return result
        if time.monotonic() >= deadline:
            on = view.get("sidecars_on_version", 0)
            raise WaitTimeout(
                f"timed out after {opts.timeout:g}s: deploy {deploy_id} is {result.state}, "
                f"{on}/{view.get('live_sidecars', 0)} live sidecars on it"
            )
        time.sleep(opts.poll_interval)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
