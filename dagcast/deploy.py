"""`dagcast deploy --dags`: bundle, validate, request an upload, upload, wait until live."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from chalicelib.validation import validate_stream
from dagcast import bundler
from dagcast.client import ApiClient, backoff
from dagcast.exceptions import BundleInvalid, UploadFailed, WaitTimeout

Say = Callable[[str], None]


@dataclass
class DeployOptions:
    dags_path: Path
    deployment: str
    wait: bool = True
    timeout: float = 300.0
    skip_validation: bool = False
    force: bool = False
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
        }


def run(api: ApiClient, opts: DeployOptions, say: Say) -> DeployResult:
    with tempfile.TemporaryFile(prefix="dagcast-bundle-") as tmp:
        say(f"Bundling {opts.dags_path} ...")
        info = bundler.build(opts.dags_path, tmp)
        say(f"Bundled {info.files} files, {_size(info.bytes)} -> {_size(info.size)} compressed (sha256 {info.sha256[:12]})")
        if not opts.skip_validation:
            tmp.seek(0)
            report = validate_stream(tmp)
            if not report.valid:
                errors = [e.model_dump() for e in report.errors]
                raise BundleInvalid(f"validation failed with {len(errors)} error(s); nothing was uploaded", errors)
        created = api.create_deploy(
            opts.deployment, {"sha256": info.sha256, "size": info.size, "description": opts.description}
        )
        deploy_id = created["deploy"]["deploy_id"]
        say(f"Deploy {deploy_id} created; uploading {_size(info.size)}")
        upload(created["upload"], tmp, opts.upload_attempts, say)
        result = DeployResult(deploy_id, None, "PENDING", info.sha256, info.files, info.bytes)
        if not opts.wait:
            say("Uploaded; not waiting (--no-wait)")
            return result
        return wait(api, opts, deploy_id, result, say)


def upload(form: dict[str, Any], stream: BinaryIO, attempts: int, say: Say) -> None:
    """POST the bundle to the presigned form, rewinding the stream on every attempt."""
    for attempt in range(attempts):
        last = attempt == attempts - 1
        stream.seek(0)
        try:
            resp = httpx.post(
                form["url"],
                data=form["fields"],
                files={"file": ("bundle.tar.gz", stream, "application/gzip")},
                timeout=httpx.Timeout(30.0, write=300.0),
            )
        except httpx.TransportError as exc:
            if last:
                raise UploadFailed(f"upload failed after {attempts} attempts: {exc}") from exc
            _retry(say, f"upload failed ({exc.__class__.__name__})", attempt, attempts)
            continue
        if resp.status_code < 300:
            return
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
