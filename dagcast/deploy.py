"""`dagcast deploy --dags`: bundle, validate, request an upload, upload, wait until live.

Every outcome is in the DeployResult the caller handed in, as far as it got: the CLI prints it
as JSON on every exit path. An interrupt (SIGINT, SIGTERM) before the upload is complete cancels
the deploy on the server, so a deploy this command abandoned never goes live.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import httpx

from dagcast.client import ApiClient, backoff, verify_for
from dagcast.exceptions import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ApiError,
    ApiUnavailable,
    BundleInvalid,
    ClientError,
    DagRemovalRefused,
    ImportErrorsFound,
    Interrupted,
    Terminated,
    UploadExpired,
    UploadFailed,
    WaitTimeout,
)

# What the deploy works with is imported when it starts working (in _run, while the look-ahead waits
# on the API), not with this module: the command creates its DeployResult, whose Timings are the
# deploy's clock, first. httpx and the API client are imported by then anyway (the command made its
# ApiClient); pydantic, the bundler and the validator (chalicelib.bundle: ~70 ms of imports) come
# with the first stage that uses them.
if TYPE_CHECKING:
    from chalicelib.bundle import BundleInfo, DeltaCollector, FileEntry, Limits, Report
    from chalicelib.manifest import DeployDiff
    from dagcast.bundler import Collected

Say = Callable[[str], None]
Progress = Callable[[int, int], None]  # (bytes sent, total)
Confirm = Callable[[str], bool]  # asks a person on a terminal; None when nobody can answer
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
    require_all: bool = False  # --wait also waits for registered sidecars that are stale
    allow_dag_removal: bool = False
    confirm: Confirm | None = None
    upload_attempts: int = 4
    poll_interval: float = 0.2
    allow_import_errors: bool = False  # exit 0, not 5, when Airflow reports new import errors
    full: bool = False  # --full: upload the bundle even when a delta against the live version would do
    parse_locally: bool = False  # --parse: Airflow's loader on the folder before the upload


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
    # epoch seconds: when --wait received the answer that ended its wait (None when it did not wait, or timed out)
    noticed_at: float | None = None
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
    """Everything known about the deploy so far: the --json output, on every exit path."""

    deploy_id: str | None = None
    version: int | None = None
    state: str | None = None  # None until the API was asked; DRY_RUN, UNCHANGED, or the deploy's state
    sha256: str | None = None
    files: int | None = None
    bytes: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    sidecars: list[dict[str, Any]] = field(default_factory=list)
    stale_sidecars: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    parse: dict[str, Any] | None = None  # what Airflow made of it, from the sidecars' reports (--wait)
    diff: dict[str, Any] | None = None
    files_list: list[dict[str, Any]] | None = None
    uploaded: bool = False
    upload: dict[str, Any] | None = None  # what went up: {kind: delta|bundle|promotion, bytes, base_version}
    promoted_from: dict[str, Any] | None = None  # dagcast promote: {deployment, version, deploy_id, sha256}
    rollback_of: str | None = None  # dagcast rollback: the deploy whose bundle it serves again
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
            "stale_sidecars": self.stale_sidecars,
            "converged": self.converged,
            "parse": self.parse,
            "diff": self.diff,
            "upload": self.upload,
            "timings": self.timings.to_json(),
            **({"files_list": self.files_list} if self.files_list is not None else {}),
            **({"promoted_from": self.promoted_from} if self.promoted_from is not None else {}),
            **({"rollback_of": self.rollback_of} if self.rollback_of is not None else {}),
        }


def run(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None = None,
        result: DeployResult | None = None) -> DeployResult:
    result = result or DeployResult()
    try:
        return _run(api, opts, say, progress, result)
    except BundleInvalid as exc:
        result.errors = result.errors or exc.errors
        result.state = result.state or "INVALID"  # refused here: nothing was uploaded
        raise
    except (KeyboardInterrupt, Terminated) as exc:
        raise _interrupted(api, opts, result, say, EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT) from None
    finally:
        result.timings.finish()


def _interrupted(api: ApiClient, opts: DeployOptions, result: DeployResult, say: Say, code: int) -> Interrupted:
    """Before the upload is complete, cancel the deploy (best effort); after it, say it goes on."""
    how = "SIGTERM" if code == EXIT_SIGTERM else "interrupted"
    if result.deploy_id is None:
        return Interrupted(f"{how}: nothing was deployed", code)
    if result.uploaded:
        state = f"{result.state} v{result.version}" if result.version else result.state
        return Interrupted(f"{how} while waiting: deploy {result.deploy_id} goes on on the server ({state}); "
                           f"`dagcast deploys cancel {result.deploy_id}` stops it while it is validating", code)
    try:
        cancelled = api.cancel_deploy(opts.deployment, result.deploy_id)
    except ApiError as exc:  # it raced the upload: it may be validated already, or live
        result.state = _state_of(api, opts, result.deploy_id) or result.state
        return Interrupted(f"{how}: deploy {result.deploy_id} could not be cancelled ({exc.api_message}); "
                           f"it is {result.state}", code)
    except ClientError as exc:
        return Interrupted(f"{how}: cancelling deploy {result.deploy_id} failed ({exc}); it expires unless its "
                           f"upload completed: `dagcast deploys show {result.deploy_id}`", code)
    result.state = cancelled.get("state", "CANCELLED")
    say(f"Deploy {result.deploy_id} cancelled: it will never go live")
    return Interrupted(f"{how}: deploy {result.deploy_id} was cancelled", code)


def _state_of(api: ApiClient, opts: DeployOptions, deploy_id: str) -> str | None:
    try:
        return str(api.get_deploy(opts.deployment, deploy_id)["deploy"]["state"])
    except ClientError:
        return None


class _LookAhead(threading.Thread):
    """What the deploy needs from elsewhere, fetched while the bundle is built and validated: the
    deployment's limits, the live version and its manifest (from the API and S3), and git metadata."""

    def __init__(self, api: ApiClient, opts: DeployOptions) -> None:
        super().__init__(name="dagcast-look-ahead", daemon=True)  # never holds up an exit on a local error
        self._api = api
        self._opts = opts
        self.live: dict[str, Any] | None = None
        self.manifest: list[FileEntry] | None = None
        self.git: dict[str, Any] | None = None
        self.deployment: dict[str, Any] = {}
        self.limits: Limits | None = None  # the deployment's: what the server validates with
        self.limits_known = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            try:
                self.deployment = self._api.get_deployment(self._opts.deployment)
                from chalicelib.bundle import Limits  # imported meanwhile by the main thread, most often

                self.limits = Limits.model_validate(self.deployment.get("limits") or {})
            finally:
                self.limits_known.set()
            self.live = _live_version(self._api, self._opts.deployment)
            self.manifest = _live_manifest(self.live)
            from dagcast import gitinfo

            self.git = gitinfo.describe(self._opts.dags_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by result()
            self._error = exc

    def result(self) -> _LookAhead:
        """Wait for the look-ahead; raises what it raised (an API error), in the caller's thread."""
        self.join()
        if self._error is not None:
            raise self._error
        return self


def _run(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None, result: DeployResult) -> DeployResult:
    ahead = _LookAhead(api, opts)
    ahead.start()
    from dagcast import segment_cache

    bundle_file, written_at = segment_cache.scratch()
    try:
        with bundle_file as tmp:
            return _run_with(api, opts, say, progress, result, ahead, cast(BinaryIO, tmp), written_at)
    finally:
        if written_at is not None:
            Path(written_at).unlink(missing_ok=True)  # unless it was kept (renamed away)


def _run_with(api: ApiClient, opts: DeployOptions, say: Say, progress: Progress | None, result: DeployResult,
              ahead: _LookAhead, tmp: BinaryIO, written_at: str | None) -> DeployResult:
    timings = result.timings
    say(f"Bundling {opts.dags_path} ...")
    collected, info, report, collect = _bundle_and_validate(opts, tmp, timings, say, ahead)
    result.sha256, result.files, result.bytes = info.sha256, info.files, info.bytes
    mark = time.perf_counter()
    live = ahead.result().live
    diff = None
    if report is not None:
        from chalicelib.manifest import diff_manifests, summary

        diff = diff_manifests(ahead.manifest, report.manifest)
        result.diff = diff.model_dump()
        if live is not None:
            say(f"Changes against live v{live['version']['version']}: {summary(diff)}")
    timings.lap("diff_s", mark)
    if opts.dry_run:
        assert report is not None
        if diff is not None and diff.removes_dags:
            say(f"warning: this deploy removes {_removals(diff)}")
        result.state = "DRY_RUN"
        result.files_list = [{"path": f.path, "size": f.size} for f in report.manifest]
        result.files_list += [{"path": p, "size": 0, "link": t} for p, t in sorted(collected.links.items())]
        result.files_list.sort(key=lambda f: f["path"])
        return result
    if live is not None and live["version"]["sha256"] == info.sha256 and not opts.force:
        say(f"No changes to deploy: v{live['version']['version']} already has this bundle (use --force to deploy anyway)")
        result.state = "UNCHANGED"
        result.deploy_id = live["version"]["deploy_id"]
        result.version = live["version"]["version"]
        result.converged = True
        return result
    if diff is not None and diff.removes_dags:
        _confirm_removal(diff, opts, say, ahead.deployment.get("dag_removal") == "confirm")
    git = ahead.git
    description = opts.description or (git or {}).get("subject") or ""
    body: dict[str, Any] = {"sha256": info.sha256, "size": info.size, "description": description[:1024]}
    if git:
        body["git"] = git
    mark = time.perf_counter()
    first = _delta_of(collect, report, live, info.size) if collect and report and live else None
    deploy_id = _ship(api, opts, tmp, info, body, first, ahead.limits, say, result, progress)
    result.uploaded = True
    mark = timings.lap("upload_s", mark)
    keeping = _keep(opts, tmp, written_at, info, report, collected)
    try:
        if report is not None and report.valid:
            from dagcast import manifest_cache

            manifest_cache.save(info.sha256, report.manifest)  # the next deploy's base, when this one goes live
        if not opts.wait:
            return result
        return wait(api, opts, deploy_id, result, say)
    finally:
        if keeping is not None:
            keeping.join()  # before the bundle's file is closed


def _keep(opts: DeployOptions, tmp: BinaryIO, written_at: str | None, info: BundleInfo, report: Report | None,
          collected: Collected) -> threading.Thread | None:
    """Keep the uploaded bundle, written at `written_at`, as the folder's last (its unchanged segments
    and files are the next bundle's), while the deploy is waited for."""
    if written_at is None:
        return None
    from dagcast import bundler, segment_cache

    tmp.flush()
    hashed = {e.path: (e.sha256, collected.stats[e.path]) for e in report.manifest
              if e.path in collected.stats} if report is not None and report.valid else None
    keeping = threading.Thread(target=segment_cache.save, name="dagcast-keep-bundle", args=(
        opts.dags_path, bundler.COMPRESSLEVEL, written_at, info, hashed, collected.walked_ns))
    keeping.start()
    return keeping


RETRY_FULL = ("base_unavailable", "delta_mismatch", "delta_rebuild_mismatch")  # a delta that cannot work: send it all


def _ship(api: ApiClient, opts: DeployOptions, tmp: BinaryIO, info: BundleInfo, body: dict[str, Any],
          delta: _Delta | None, limits: Limits | None, say: Say, result: DeployResult, progress: Progress | None) -> str:
    """Create the deploy and upload it: a delta against the live version when there is one (and it is
    small), else the bundle. A delta the API or ingest refuses because the live version moved is made
    again once against the new live version; after that, or when the delta cannot work, the bundle goes.
    Returns the deploy's id (once a delta was rebuilt into the bundle, or the bundle was uploaded).
    `delta` is the first one to try, made while the bundle was validated."""
    from dagcast.bundler import human_size

    retried = False
    while True:
        mark = time.perf_counter()
        created = _create(api, opts, {**body, **({"delta": delta.announce} if delta else {})}, result)
        if created is None:  # 409 base_moved
            if retried:
                say("the live version moved again; uploading the whole bundle")
            delta = None if retried else _delta_against(api, opts, tmp, limits, info.size, say)
            retried = True
            continue
        result.timings.add("presign_s", time.perf_counter() - mark)
        deploy_id = str(created["deploy"]["deploy_id"])
        result.deploy_id, result.state = deploy_id, created["deploy"].get("state", "PENDING")
        if delta is not None:
            say(f"Deploy {deploy_id} created; uploading delta against v{delta.base_version}: {delta.counts} "
                f"({human_size(len(delta.data))} instead of {human_size(info.size)})")
            stream: BinaryIO = io.BytesIO(delta.data)
            size = len(delta.data)
        else:
            say(f"Deploy {deploy_id} created; uploading {human_size(info.size)}")
            stream, size = tmp, info.size
        mark = time.perf_counter()
        _upload_form(api, opts, deploy_id, created["upload"], stream, size, say, progress)
        elapsed = max(time.perf_counter() - mark, 1e-6)
        say(f"Uploaded {human_size(size)} in {elapsed:.1f}s ({human_size(int(size / elapsed))}/s)")
        result.upload = {"kind": "delta" if delta else "bundle", "bytes": size,
                         **({"base_version": delta.base_version} if delta else {})}
        if delta is None:
            return deploy_id
        refused = _await_rebuild(api, opts, deploy_id)
        if refused is None:
            return deploy_id
        say(f"the delta was refused ({refused['code']}): {refused['message']}")
        if refused["code"] == "base_moved" and not retried:
            delta = _delta_against(api, opts, tmp, limits, info.size, say)
        else:
            say("uploading the whole bundle instead")
            delta = None
        retried = True


@dataclass
class _Delta:
    data: bytes
    base_version: int
    announce: dict[str, Any]
    counts: str


def _delta_of(collect: DeltaCollector, report: Report, live: dict[str, Any], bundle_size: int) -> _Delta | None:
    """The delta `collect` gathered while `report`'s bundle was read, against the live version; None when
    it would not be much smaller than the bundle."""
    from dagcast import bundler

    built = collect.build(report.manifest, report.bytes) if report.valid else None
    if built is None or len(built.data) * 2 > bundle_size:
        return None
    old = collect.base
    version = live["version"]
    changed = sum(1 for f in report.manifest if f.path in old and old[f.path] != f.sha256)
    added = sum(1 for f in report.manifest if f.path not in old)
    return _Delta(
        data=built.data,
        base_version=int(version["version"]),
        announce={"base_version": version["version"], "base_sha256": version["sha256"], "sha256": built.sha256,
                  "size": len(built.data), "files_sha256": built.files_sha256, "removed": built.removed,
                  "compresslevel": bundler.COMPRESSLEVEL},
        counts=f"{changed} changed, {added} added, {len(built.removed)} removed",
    )


def _delta_against(api: ApiClient, opts: DeployOptions, tmp: BinaryIO, limits: Limits | None, bundle_size: int,
                   say: Say) -> _Delta | None:
    """After the live version moved: the delta of the bundle in tmp against the version live now (the
    bundle read once more, without compiling), or None to upload the bundle."""
    from chalicelib.bundle import DeltaCollector, validate_stream

    live = _live_version(api, opts.deployment)
    manifest = _live_manifest(live)
    if live is None or manifest is None:
        return None
    say(f"v{live['version']['version']} went live meanwhile; making the delta against it")
    collect = DeltaCollector({f.path: f.sha256 for f in manifest})
    tmp.seek(0)
    return _delta_of(collect, validate_stream(tmp, limits, check_python=False, collect=collect), live, bundle_size)


def _create(api: ApiClient, opts: DeployOptions, body: dict[str, Any], result: DeployResult) -> dict[str, Any] | None:
    """POST /deploys; None when the API says the delta's base is no longer live."""
    try:
        return api.create_deploy(opts.deployment, body)
    except ApiError as exc:
        if exc.code == "base_moved" and "delta" in body:
            return None
        if exc.code == "bundle_too_large":  # refused by the server for its size: a rejection
            result.state = "REJECTED"
            result.errors = [{"code": exc.code, "path": None, "line": None, "message": exc.api_message}]
            raise BundleInvalid(f"the server refused the bundle: {exc.api_message}", result.errors) from exc
        raise


def _upload_form(api: ApiClient, opts: DeployOptions, deploy_id: str, form: dict[str, Any], stream: BinaryIO,
                 size: int, say: Say, progress: Progress | None) -> None:
    for _ in range(2):
        try:
            upload(form, ProgressReader(stream, size, progress) if progress else stream, opts.upload_attempts, say)
            return
        except UploadExpired:
            say("the upload form expired; asking for a fresh one")
            form = api.renew_upload(opts.deployment, deploy_id)
    raise UploadFailed("the upload form expired twice; check this machine's clock")


def _await_rebuild(api: ApiClient, opts: DeployOptions, deploy_id: str) -> dict[str, Any] | None:
    """Wait until ingest has turned the uploaded delta into the bundle (the deploy leaves PENDING); the
    error that refused the delta when it cannot (REJECTED with a delta's reason), else None."""
    deadline = time.monotonic() + opts.timeout
    while time.monotonic() < deadline:
        try:
            view = api.get_deploy(opts.deployment, deploy_id,
                                  wait=min(LONG_POLL_SECONDS, max(1, int(deadline - time.monotonic()))), dag_ids=False)
        except ApiUnavailable:  # the wait that follows says so, if it lasts
            time.sleep(opts.poll_interval)
            continue
        deploy = view["deploy"]
        if deploy["state"] == "PENDING" or (deploy["state"] == "VALIDATING" and not deploy.get("rebuilt_at")):
            continue  # not rebuilt yet (a refused delta is VALIDATING for a moment before it is REJECTED)
        errors = deploy.get("errors") or []
        if deploy["state"] == "REJECTED" and errors and errors[0]["code"] in ("base_moved", *RETRY_FULL):
            return dict(errors[0])
        return None
    return None  # the wait that follows (or not) says what became of it


def _confirm_removal(diff: DeployDiff, opts: DeployOptions, say: Say, required: bool) -> None:
    """A deploy that removes DAGs goes ahead when --allow-dag-removal says so or a person at a terminal
    says yes. Where nobody can answer it goes ahead with a warning, unless the deployment requires a
    confirmation (dag_removal: confirm): then DagRemovalRefused (exit 2), naming them."""
    removes = _removals(diff)
    if opts.allow_dag_removal:
        say(f"warning: this deploy removes {removes}")
        return
    if opts.confirm is not None:
        if opts.confirm(f"This deploy removes {removes}. Deploy anyway?"):
            return
        raise DagRemovalRefused(f"not confirmed: this deploy removes {removes}; nothing was uploaded")
    if not required:
        say(f"warning: this deploy removes {removes} (--allow-dag-removal says it is meant)")
        return
    raise DagRemovalRefused(f"this deploy removes {removes}, and deployment {opts.deployment!r} needs that confirmed "
                            "(dag_removal: confirm); nothing was uploaded")


def _removals(diff: DeployDiff) -> str:
    what = []
    if diff.dags_removed_count:
        what.append(f"{diff.dags_removed_count} DAG(s): {', '.join(diff.dags_removed)}")
    if diff.dags_maybe_removed:
        what.append(f"maybe {len(diff.dags_maybe_removed)} DAG(s) no longer given by name: {', '.join(diff.dags_maybe_removed)}")
    if diff.dynamic_files_removed:
        what.append(f"the DAGs computed at parse time by {', '.join(diff.dynamic_files_removed)}")
    return "; ".join(what)


def _bundle_and_validate(
    opts: DeployOptions, tmp: BinaryIO, timings: Timings, say: Say, ahead: _LookAhead
) -> tuple[Collected, BundleInfo, Report | None, DeltaCollector | None]:
    """Write the bundle to tmp and (unless skipped) validate it with the server's rules; the validator's
    compile cache is this machine's, and .py files it has never seen are compiled by worker processes
    while the bundle is written. The same pass gathers the delta against the live version (unless --full),
    returned as its collector. Raises BundleInvalid, with nothing uploaded."""
    # the first stage that needs them (pydantic, tarfile, the validator): imported while the look-ahead
    # started by _run waits on the API
    from chalicelib.bundle import DeltaCollector, Limits, validate_stream
    from chalicelib.bundle.format import StaleVouch
    from chalicelib.bundle.written import WrittenCheck
    from dagcast import bundler, compile_cache, segment_cache
    from dagcast.bundler import human_size

    validating = not opts.skip_validation or opts.dry_run
    started = time.perf_counter()
    collected = bundler.collect(opts.dags_path)
    ahead.limits_known.wait(30)  # the deployment's limits, read while the folder was walked
    limits = ahead.limits or Limits()
    bundler.check_sizes(collected, limits)
    collected.raise_problems()  # before a byte is written: a 300 MiB file is refused at once
    paths = collected.paths
    mark = time.perf_counter()
    cache = compile_cache.load() if validating else None
    prewarm = compile_cache.Prewarm(opts.dags_path, paths, cache) if cache is not None else None
    # Checked as it is written (the everyday deploy: its Python is in the compile cache but for a file or
    # two), else read again once written, after the workers compiled what is new (a first deploy).
    check = WrittenCheck(limits, cache=cache) if prewarm is not None and not prewarm.compiling else None
    setup = time.perf_counter() - mark  # validation's share, counted there
    last = segment_cache.load(opts.dags_path, bundler.COMPRESSLEVEL)  # the last bundle: its unchanged segments
    try:
        try:
            info = bundler.build(opts.dags_path, tmp, collected, check, last)
        except StaleVouch as exc:  # the cache's record of a file is wrong: bundled again, hashing every file
            say(f"warning: {exc}; bundling again without the recorded file hashes")
            if check is not None:
                check.close()
                check = WrittenCheck(limits, cache=cache)
            tmp.seek(0)
            tmp.truncate()
            info = bundler.build(opts.dags_path, tmp, collected, check, last, vouch=False)
    except BaseException:
        if prewarm is not None:
            prewarm.close()
        if check is not None:
            check.close()
        raise
    finally:
        if last is not None:
            last.close()
    mark = timings.lap("bundle_s", started)
    timings.add("bundle_s", -setup)
    say(f"Bundled {info.files} files, {human_size(info.bytes)} -> {human_size(info.size)} compressed "
        f"(sha256 {info.sha256[:12]})")
    report = collect = None
    if cache is not None and prewarm is not None:
        prewarm.join()
        if not opts.full and not opts.dry_run:
            ahead.join()  # the live version's file list, fetched while the folder was bundled
            if ahead.manifest is not None:
                collect = DeltaCollector({f.path: f.sha256 for f in ahead.manifest})
        if check is not None:
            report = check.report(info)
            if report.valid and collect is not None:
                collect = _collect_written(opts.dags_path, report, check.symlinks, collect, tmp, limits)
        else:
            tmp.seek(0)
            report = validate_stream(tmp, ahead.limits, cache=cache, collect=collect)
        compile_cache.save(cache)
        timings.lap("validate_s", mark)
        timings.add("validate_s", setup)
        if not report.valid:
            errors = [e.model_dump() for e in report.errors]
            raise BundleInvalid(f"validation failed with {len(errors)} error(s); nothing was uploaded", errors)
    if opts.parse_locally:
        _parse_here(opts, tmp, ahead.limits, say)
    return collected, info, report, collect


def _collect_written(root: Path, report: Report, symlinks: dict[str, str], collect: DeltaCollector, tmp: BinaryIO,
                     limits: Limits) -> DeltaCollector:
    """The delta of a bundle checked as it was written, against the live version `collect` holds: the
    files that differ from it are read again from the folder (few, in the everyday deploy). One that no
    longer has the bytes bundled (edited meanwhile) makes the delta from the bundle itself."""
    from chalicelib.bundle import DeltaCollector, validate_stream

    base = collect.base
    for entry in report.manifest:
        data = None
        if base.get(entry.path) != entry.sha256 and collect.wants(entry.size):
            try:
                with open(root / entry.path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
                    data = fh.read(entry.size + 1)
            except OSError:
                data = None
            if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
                again = DeltaCollector(base)
                tmp.seek(0)
                validate_stream(tmp, limits, check_python=False, collect=again)
                return again
        collect.add_file(entry.path, 0o644, entry.sha256, None if data is None else [data])
    for path, target in sorted(symlinks.items()):
        collect.add_symlink(path, target)
    return collect


def _parse_here(opts: DeployOptions, bundle: BinaryIO, limits: Limits | None, say: Say) -> None:
    """--parse: load the bundle with Airflow's own loader here; its import errors refuse the upload
    (exit 3) unless --allow-import-errors."""
    from dagcast.parse import ParseError
    from dagcast.parse_check import parse_bundle, parse_issues

    say("Loading the DAGs with Airflow here (--parse) ...")
    bundle.seek(0)
    try:
        result = parse_bundle(bundle, limits)
    except ParseError as exc:
        raise ClientError(f"--parse: the parser failed: {exc}") from exc
    issues = parse_issues(result)
    say(f"Airflow loaded {len(result.files) - len(result.import_errors)} of {len(result.files)} files "
        f"({len(result.dag_ids)} DAGs) in {result.seconds:.1f}s")
    if issues and not opts.allow_import_errors:
        raise BundleInvalid(f"Airflow could not load the DAGs here ({len(issues)} problem(s)); nothing was uploaded", issues)
    for issue in issues:
        say(f"warning: {issue['message']}")


def _live_version(api: ApiClient, deployment: str) -> dict[str, Any] | None:
    try:
        return api.get_version(deployment, None)
    except ApiError as exc:
        if exc.status == 404 and exc.code == "not_found":
            return None
        raise


def _live_manifest(live: dict[str, Any] | None) -> list[FileEntry] | None:
    """The live version's file list: kept here when this machine deployed that bundle, else downloaded."""
    if not live:
        return None
    from dagcast import manifest_cache

    kept = manifest_cache.load(str((live.get("version") or {}).get("sha256") or ""))
    if kept is not None:
        return kept
    if not live.get("manifest_url"):
        return None
    from chalicelib.manifest import decode_manifest

    try:
        resp = httpx.get(live["manifest_url"], timeout=30, verify=verify_for(live["manifest_url"]))
        resp.raise_for_status()
        return decode_manifest(resp.content)
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
                verify=verify_for(form["url"]),
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


def promote(api: ApiClient, opts: DeployOptions, source: str, version: int | None, deploy_id: str | None,
            say: Say, result: DeployResult) -> DeployResult:
    """Make opts.deployment run exactly the bundle a version of `source` ran: the API copies it inside S3
    (no byte from here) and validates it against the target's limits; with opts.wait, wait as deploy does.
    A version whose bundle is already live on the target is UNCHANGED unless opts.force."""
    started = time.perf_counter()
    try:
        if deploy_id is None and not opts.force:
            wanted = api.get_version(source, version)["version"]
            live = _live_version(api, opts.deployment)
            if live is not None and live["version"]["sha256"] == wanted["sha256"]:
                result.state, result.converged = "UNCHANGED", True
                result.deploy_id, result.version = live["version"]["deploy_id"], live["version"]["version"]
                result.sha256 = wanted["sha256"]
                result.upload = {"kind": "promotion", "bytes": 0}
                say(f"{opts.deployment} already runs v{wanted['version']} of {source} (its v{result.version}, same "
                    "sha256): nothing to promote")
                return result
        body: dict[str, Any] = {"source": source, "description": opts.description[:1024]}
        if version is not None:
            body["version"] = version
        if deploy_id is not None:
            body["deploy_id"] = deploy_id
        created = api.promote(opts.deployment, body)
        result.timings.lap("presign_s", started)
        result.deploy_id, result.state, result.sha256 = created["deploy_id"], created["state"], created["sha256"]
        result.promoted_from = created.get("promoted_from")
        result.upload = {"kind": "promotion", "bytes": 0}
        result.uploaded = True
        origin = result.promoted_from or {}
        say(f"Deploy {result.deploy_id} created in {opts.deployment}: v{origin.get('version')} of {source} "
            f"(sha256 {str(result.sha256)[:12]}...), copied inside S3; nothing uploaded")
        if not opts.wait:
            return result
        return wait(api, opts, result.deploy_id, result, say)
    finally:
        result.timings.finish()


def wait(api: ApiClient, opts: DeployOptions, deploy_id: str, result: DeployResult, say: Say) -> DeployResult:
    started = time.perf_counter()
    try:
        return _wait(api, opts, deploy_id, result, say)
    finally:
        result.timings.lap("wait_s", started)


def _wait(api: ApiClient, opts: DeployOptions, deploy_id: str, result: DeployResult, say: Say) -> DeployResult:
    deadline = time.monotonic() + opts.timeout
    last_state = ""
    seen: tuple[Any, ...] = ()
    view: dict[str, Any] = {}
    lost = 0  # answers missed in a row: the API restarting, the network down
    while True:
        asked = time.monotonic()
        try:
            # the wait needs the progress, not thousands of DAG ids, and an answer at a change of state or
            # at the end, not at each sidecar's report
            view = api.get_deploy(opts.deployment, deploy_id, wait=max(0, min(LONG_POLL_SECONDS, int(deadline - asked))),
                                  dag_ids=False, until_settled=True)
            received = time.time()
        except ApiUnavailable as exc:
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"timed out after {opts.timeout:g}s: the API did not answer ({exc})") from exc
            if not lost:
                say(f"warning: the API did not answer ({exc}); retrying until the --timeout")
            lost += 1
            time.sleep(min(backoff(min(lost, 5), base=0.5), max(0.0, deadline - time.monotonic())))
            continue
        if lost:
            say("the API answers again")
            lost = 0
        _take(view, result)
        if result.state in ("REJECTED", "CANCELLED", "EXPIRED", "SUPERSEDED"):  # an answer that ends the wait
            result.timings.noticed_at = round(received, 3)
        if result.state != last_state:
            say(f"State {result.state}" + (f" (v{result.version})" if result.version else ""))
            last_state = result.state or ""
        if result.state == "REJECTED":
            raise BundleInvalid(f"the server rejected deploy {deploy_id}", result.errors)
        if result.state in ("CANCELLED", "EXPIRED"):
            raise ClientError(f"deploy {deploy_id} is {result.state}: it will never go live")
        if result.state == "SUPERSEDED":
            say(f"v{result.version} was superseded by a newer deploy before every sidecar ran it")
            return result
        parse = view.get("parse") or {}
        held = set(parse.get("held") or [])
        done = result.converged or (held and all(s["on_it"] or s["name"] in held for s in result.sidecars))
        if (result.state == "ACTIVE" and done and parse.get("status") != "pending"
                and (not opts.require_all or not result.stale_sidecars)):
            result.timings.noticed_at = round(received, 3)
            say(_live_line(view, result))
            if parse.get("status") == "parsed":
                say(_parse_line(result.parse or {}))
            elif parse.get("status") == "unavailable":
                say(_unavailable_line(parse))
            if (parse.get("new_import_errors") or held) and not opts.allow_import_errors:
                raise ImportErrorsFound(_import_errors_text(result.parse or {}))
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(_timeout_line(opts, deploy_id, view, result))
        # The API answers a long poll when something changed, so ask again at once; an answer that
        # came back at once with nothing new (an API without long polls) means polling: pause first.
        # (convergence noted is news too: the API answers it at once, and a pause then would delay the
        # parse report that may follow it)
        now = (result.state, view.get("sidecars_on_version"), view.get("live_sidecars"), len(result.stale_sidecars),
               parse.get("status"), tuple(parse.get("reported") or ()), view["deploy"].get("converged_at"))
        elapsed = time.monotonic() - asked
        if now == seen and elapsed < opts.poll_interval:
            time.sleep(opts.poll_interval - elapsed)
        seen = now


def _take(view: dict[str, Any], result: DeployResult) -> None:
    deploy = view["deploy"]
    result.state = deploy["state"]
    result.version = deploy.get("version")
    result.errors = deploy.get("errors", [])
    result.diff = deploy.get("diff") or result.diff
    result.converged = bool(view["converged"])
    sidecars = view["sidecars"]
    result.sidecars = [_sidecar(s) for s in sidecars if s["live"]]
    result.stale_sidecars = [_sidecar(s) for s in sidecars if not s["live"] and not s.get("on_deploy")]
    parse = view.get("parse")
    if parse:
        result.parse = {
            "status": parse["status"],
            "files": parse.get("files", 0),
            "dags": parse.get("dags", 0),
            "import_errors": [{k: e.get(k) for k in ("path", "line", "type", "message", "sidecars", "new")}
                              for e in parse.get("import_errors", [])],
            "import_errors_total": parse.get("import_errors_total", 0),
            "new_import_errors": parse.get("new_import_errors", 0),
            "duplicates": parse.get("duplicates", []),
            "dags_added": parse.get("dags_added", []),
            "dags_removed": parse.get("dags_removed", []),
            "held": parse.get("held", []),
            "pending": parse.get("pending", []),
            "unavailable": parse.get("unavailable", []),
            "failed": parse.get("failed", {}),
        }


def _parse_line(parse: dict[str, Any]) -> str:
    """`Airflow loaded 998 of 1,000 files: dags/etl_7.py: ModuleNotFoundError: ... (worker-0, worker-1)`."""
    errors = parse.get("import_errors") or []
    files = int(parse.get("files") or 0)
    line = f"Airflow loaded {files - len({e['path'] for e in errors}):,} of {files:,} files ({parse.get('dags', 0):,} DAGs)"
    if errors:
        shown = "; ".join(f"{e['path']}: {e['type']}: {e['message'].splitlines()[0] if e['message'] else ''} "
                          f"({', '.join(e['sidecars'])})" for e in errors[:3])
        more = parse.get("import_errors_total", len(errors)) - min(3, len(errors))
        line += ": " + shown + (f"; and {more} more" if more > 0 else "")
    for d in (parse.get("duplicates") or [])[:3]:
        line += f"; DAG id {d['dag_id']!r} is defined in {', '.join(d['paths'])}"
    return line


def _unavailable_line(parse: dict[str, Any]) -> str:
    parts = []
    if parse.get("unavailable"):
        parts.append(f"no Airflow parser on {', '.join(parse['unavailable'])} (Airflow not importable there, or --parse off)")
    parts += [f"the parser failed on {name}: {why}" for name, why in sorted((parse.get("failed") or {}).items())]
    return f"parse: not available ({'; '.join(parts)})"


def _import_errors_text(parse: dict[str, Any]) -> str:
    held = parse.get("held") or []
    new = [e for e in parse.get("import_errors") or [] if e.get("new")]
    what = ", ".join(f"{e['path']} ({e['type']})" for e in new[:5]) or "see the parse report"
    if held:
        return (f"held: {parse.get('new_import_errors', len(new))} new import errors; {', '.join(held)} stayed on the "
                f"version before: {what}")
    return f"live with {parse.get('new_import_errors', len(new))} new import errors: {what}"


def _sidecar(s: dict[str, Any]) -> dict[str, Any]:
    return {"name": s["name"], "version": s["version"], "live": s["live"], "on_it": bool(s.get("on_deploy")),
            "last_seen_s": s.get("last_seen_s")}


def _stale_text(result: DeployResult) -> str:
    if not result.stale_sidecars:
        return ""
    named = ", ".join(f"{s['name']} on v{s['version']}, last seen {s['last_seen_s'] or 0:.0f} s ago"
                      for s in result.stale_sidecars[:5])
    more = f" and {len(result.stale_sidecars) - 5} more" if len(result.stale_sidecars) > 5 else ""
    return f"; {len(result.stale_sidecars)} stale ({named}{more})"


def _live_line(view: dict[str, Any], result: DeployResult) -> str:
    held = (result.parse or {}).get("held") or []
    return (f"v{result.version} live on {view['sidecars_on_version']}/{view['live_sidecars']} current sidecars"
            + (f"; held back by the parse gate on {', '.join(held)}" if held else "") + _stale_text(result))


def _timeout_line(opts: DeployOptions, deploy_id: str, view: dict[str, Any], result: DeployResult) -> str:
    state = f"{result.state} v{result.version}" if result.version else str(result.state)
    waiting = [s for s in result.sidecars if not s["on_it"]]
    parts = [f"timed out after {opts.timeout:g}s: deploy {deploy_id} is {state}"]
    if result.state == "ACTIVE":
        parts.append(f", live on {view.get('sidecars_on_version', 0)}/{view.get('live_sidecars', 0)} current sidecars")
        if waiting:
            parts.append("; waiting on " + ", ".join(f"{s['name']} (on v{s['version']})" for s in waiting[:10]))
    pending = (result.parse or {}).get("pending") or []
    if result.state == "ACTIVE" and result.converged and pending:
        parts.append("; Airflow has not reported its parse yet on " + ", ".join(pending[:10]))
    parts.append(_stale_text(result))
    if opts.require_all and result.stale_sidecars:
        parts.append(" (--require-all waits for those too)")
    return "".join(parts)
