"""The exception family of the client programs; the CLI's `main` maps them to exit codes."""
from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of every error the CLI and sidecar report as one clean line."""

    hint: str | None = None


class ConfigError(ClientError):
    """A setting is missing or invalid (flag, environment variable or config file)."""


class ApiError(ClientError):
    """The API answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        if status == 401:
            self.hint = "check DAGCAST_TOKEN (or --token)"
        elif status == 403:
            self.hint = "this token's role or deployment scope does not allow it"


class ApiUnavailable(ClientError):
    """The API could not be reached after bounded retries."""

    hint = "check DAGCAST_API_URL (or --api-url) and your network"


class UploadFailed(ClientError):
    """The bundle upload failed after bounded retries."""


class UploadExpired(UploadFailed):
    """The presigned upload form expired; ask the API for a fresh one."""


class BundleInvalid(ClientError):
    """The bundle failed validation (locally or on the server)."""

    def __init__(self, message: str, errors: list[dict[str, Any]], result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors
        self.result = result


class WaitTimeout(ClientError):
    """--wait gave up before the deploy was live on every sidecar."""


class SyncError(ClientError):
    """The sidecar could not fetch, verify or publish a version."""
