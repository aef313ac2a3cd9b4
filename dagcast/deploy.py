"""`dagcast deploy --dags`: bundle, validate, request an upload, upload, wait until live."""
from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import httpx

from chalicelib.bundle import BundleInfo
from chalicelib.manifest import diff_manifests, summary
from chalicelib.validation import FileEntry, Limits, Report, validate_stream
from dagcast import bundler, compile_cache, gitinfo
from dagcast.client import ApiClient, backoff
from dagcast.exceptions import ApiError, BundleInvalid, UploadExpired, UploadFailed, WaitTimeout

Say = Callable[[str], None]
Progress = Callable[[int, int], None]  # (bytes sent, total)
LONG_POLL_SECONDS = 10  # each --wait request lets the API hold the answer this long until something changes


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
class Timings:
    """Seconds `dagcast deploy` spent in each stage (None for a stage that did not run); in --json output."""

    bundle_s: float | None = None
    validate_s: float | None = None  # the local run of the server's validator
    diff_s: float | None = None  # looking up the live version and diffing against its manifest
    presign_s: float | None = None  # POST /deploys: the deploy record and its presigned upload
    upload_s: float | None = None
    wait_s: float | None = None  # upload done -> ACTIVE and every live sidecar on it (--wait)
    total_s: float | None = None
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def lap(self, stage: str, since: float) -> float:
        """Record `stage` as the time from `since` (a perf_counter reading) to now; returns now."""
        now = time.perf_counter()
        setattr(self, stage, round(now - since, 3))
        return now

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, round((getattr(self, stage) or 0.0) + seconds, 3))

    def finish(self) -> None:
        self.total_s = round(time.perf_counter() - self._started, 3)

    def to_json(self) -> dict[str, float | None]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


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
    timings: Timings = field(default_factory=Timings)

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
            "timings": self.timings.to_json(),
            **({"files_list": self.files_list} if self.files_list is not None else {}),
        }


def run(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None = None) -> DeployResult:
    timings = Timings()
    try:
        return _run(api, opts, say, progress, timings)
    finally:
        timings.finish()


class _LookAhead(threading.Thread):
    """What the deploy needs from elsewhere, fetched while the bundle is built and validated:
    the live version and its manifest (from the API and S3), and the git checkout's metadata."""

    def __init__(self, api: ApiClient, opts: DeployOptions) -> None:
        super().__init__(name="dagcast-look-ahead", daemon=True)  # never holds up an exit on a local error
        self._api = api
        self._opts = opts
        self.live: dict[str, Any] | None = None
        self.manifest: list[FileEntry] | None = None
        self.git: dict[str, Any] | None = None
        self.limits: Limits | None = None  # the deployment's: what the server validates with
        self.limits_known = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            try:
                self.limits = Limits.model_validate(self._api.get_deployment(self._opts.deployment).get("limits") or {})
            finally:
                self.limits_known.set()
            self.live = _live_version(self._api, self._opts.deployment)
            self.manifest = _live_manifest(self.live)
            self.git = gitinfo.describe(self._opts.dags_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by result()
            self._error = exc

    def result(self) -> _LookAhead:
        """Wait for the look-ahead; raises what it raised (an API error), in the caller's thread."""
        self.join()
        if self._error is not None:
            raise self._error
        return self


def _run(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None, timings: Timings) -> DeployResult:
    ahead = _LookAhead(api, opts)
    ahead.start()
    with tempfile.TemporaryFile(prefix="dagcast-bundle-") as tmp:
        say(f"Bundling {opts.dags_path} ...")
        info, report = _bundle_and_validate(opts, tmp, timings, say, ahead)
        mark = time.perf_counter()
        live = ahead.result().live
        result = DeployResult(None, None, "PENDING", info.sha256, info.files, info.bytes, timings=timings)
        if report is not None:
            diff = diff_manifests(ahead.manifest, report.manifest)
            result.diff = diff.model_dump()
            if live is not None:
                say(f"Changes against live v{live['version']['version']}: {summary(diff)}")
            if diff.dags_removed_count:
                say(f"warning: this deploy removes {diff.dags_removed_count} DAG(s): {', '.join(diff.dags_removed)}")
        timings.lap("diff_s", mark)
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
        git = ahead.git
        description = opts.description or (git or {}).get("subject") or ""
        body: dict[str, Any] = {"sha256": info.sha256, "size": info.size, "description": description[:1024]}
        if git:
            body["git"] = git
        mark = time.perf_counter()
        created = api.create_deploy(opts.deployment, body)
        mark = timings.lap("presign_s", mark)
        deploy_id = created["deploy"]["deploy_id"]
        result.deploy_id = deploy_id
        say(f"Deploy {deploy_id} created; uploading {_size(info.size)}")
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
        elapsed = max(time.perf_counter() - mark, 1e-6)
        mark = timings.lap("upload_s", mark)
        say(f"Uploaded {_size(info.size)} in {elapsed:.1f}s ({_size(int(info.size / elapsed))}/s)")
        if not opts.wait:
            say("Uploaded; not waiting (--no-wait)")
            return result
        return wait(api, opts, deploy_id, result, say)


def _bundle_and_validate(
    opts: DeployOptions, tmp: BinaryIO, timings: Timings, say: Say, ahead: _LookAhead
) -> tuple[BundleInfo, Report | None]:
    """Write the bundle to tmp and (unless skipped) validate it with the server's rules; the validator's
    compile cache is this machine's, and .py files it has never seen are compiled by worker processes
    while the bundle is written. Raises BundleInvalid, with nothing uploaded."""
    validating = not opts.skip_validation or opts.dry_run
    started = time.perf_counter()
    paths = bundler.collect(opts.dags_path)
    collected = time.perf_counter()
    cache = compile_cache.load() if validating else None
    prewarm = compile_cache.Prewarm(opts.dags_path, paths, cache) if cache is not None else None
    setup = time.perf_counter() - collected  # validation's share, counted there
    try:
        info = bundler.build(opts.dags_path, tmp, paths)
    except BaseException:
        if prewarm is not None:
            prewarm.close()
        raise
    mark = timings.lap("bundle_s", started)
    timings.add("bundle_s", -setup)
    say(f"Bundled {info.files} files, {_size(info.bytes)} -> {_size(info.size)} compressed (sha256 {info.sha256[:12]})")
    report = None
    if cache is not None and prewarm is not None:
        prewarm.join()
        ahead.limits_known.wait(30)  # the deployment's limits, read while the bundle was written
        tmp.seek(0)
        report = validate_stream(tmp, ahead.limits, cache=cache)
        compile_cache.save(cache)
        timings.lap("validate_s", mark)
        timings.add("validate_s", setup)
        if not report.valid:
            errors = [e.model_dump() for e in report.errors]
            raise BundleInvalid(f"validation failed with {len(errors)} error(s); nothing was uploaded", errors)
    return info, report


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
    from pydantic import TypeAdapter

    try:
        resp = httpx.get(live["manifest_url"], timeout=30)
        resp.raise_for_status()
        return TypeAdapter(list[FileEntry]).validate_json(resp.content)
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
    started = time.perf_counter()
    try:
        return _wait(api, opts, deploy_id, result, say, started)
    finally:
        result.timings.lap("wait_s", started)


def _wait(api: ApiClient, opts: DeployOptions, deploy_id: str, result: DeployResult, say: Say, started: float) -> DeployResult:
    deadline = time.monotonic() + opts.timeout
    last_state = ""
    seen: tuple[Any, ...] = ()
    while True:
        asked = time.monotonic()
        view = api.get_deploy(opts.deployment, deploy_id, wait=max(0, min(LONG_POLL_SECONDS, int(deadline - asked))))
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
            result.timings.lap("wait_s", started)
            result.timings.finish()
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
        # The API answers a long poll when something changed, so ask again at once; an answer that
        # came back at once with nothing new (an API without long polls) means polling: pause first.
        now = (result.state, view.get("sidecars_on_version"), view.get("live_sidecars"))
        elapsed = time.monotonic() - asked
        if now == seen and elapsed < opts.poll_interval:
            time.sleep(opts.poll_interval - elapsed)
        seen = now


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
