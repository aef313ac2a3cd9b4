"""The exception family of the client programs; the CLI's `main` maps them to exit codes.

Each class says which exit code it means (`exit_code`) and names its condition for `--json`
(`code`); `main` prints one clean line (and a hint), or the JSON object, and exits with it.
"""
from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1  # API, network, configuration
EXIT_USAGE = 2  # a wrong flag, a missing or empty folder, a refused DAG removal
EXIT_REJECTED = 3  # the bundle was rejected, locally or by the server, for any reason
EXIT_TIMEOUT = 4  # --wait gave up
EXIT_IMPORT_ERRORS = 5  # live, but Airflow reported new import errors
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class ClientError(Exception):
    """Base of every error the CLI and sidecar report as one clean line."""

    hint: str | None = None
    code = "error"
    exit_code = EXIT_ERROR


class ConfigError(ClientError):
    """A setting is missing or invalid (flag, environment variable or config file)."""

    code = "config_error"


class MissingExtra(ConfigError):
    """The command needs packages of an extra that is not installed (`pip install dagcast` is the
    CLI alone): the message is the one line that says which extra to install."""

    code = "missing_extra"

    def __init__(self, what: str, extra: str, missing: str) -> None:
        super().__init__(f"{what} needs the [{extra}] extra ({missing} is not installed): pip install 'dagcast[{extra}]'")
        self.extra = extra


class UsageProblem(ClientError):
    """The command cannot run as asked (a missing or empty folder, say): exit 2."""

    code = "usage"
    exit_code = EXIT_USAGE


class ApiError(ClientError):
    """The API answered with an error status."""

    def __init__(self, status: int, code: str, message: str, from_dagcast: bool = True) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.api_message = message
        self.hint = _hint(status, code, message, from_dagcast)


def _hint(status: int, code: str, message: str, from_dagcast: bool) -> str | None:
    if not from_dagcast:
        return ("the answer did not come from a dagcast API: check DAGCAST_API_URL (or --api-url); on AWS it ends with "
                "the stage, as https://<api-id>.execute-api.<region>.amazonaws.com/api")
    if status == 401:
        if "revoked" in message:
            return "this token was revoked: ask an admin for a new one (dagcast tokens create)"
        if "unknown token" in message:
            return "this API does not know the token: check DAGCAST_TOKEN (or --token), and that DAGCAST_API_URL is the API that issued it"
        return "check DAGCAST_TOKEN (or --token): it should be the whole token, dgc_..."
    if status == 403:
        if "not scoped to" in message:
            return "this token is limited to other deployments: check DAGCAST_DEPLOYMENT, or use a token for this one"
        if "may not" in message:
            return "this token's role does not allow it: deploys need a deployer token, settings and rollbacks an admin token"
        return None
    return None


class ApiUnavailable(ClientError):
    """The API could not be reached after bounded retries."""

    code = "api_unavailable"
    hint = "check DAGCAST_API_URL (or --api-url) and your network"


class UploadFailed(ClientError):
    """The bundle upload failed after bounded retries."""

    code = "upload_failed"


class UploadExpired(UploadFailed):
    """The presigned upload form expired; ask the API for a fresh one."""

    code = "upload_expired"


class BundleInvalid(ClientError):
    """The bundle failed validation (locally or on the server): exit 3."""

    code = "rejected"
    exit_code = EXIT_REJECTED

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


class DagRemovalRefused(ClientError):
    """The deploy would remove DAGs and nobody confirmed it (--allow-dag-removal): exit 2."""

    code = "dag_removal_not_confirmed"
    exit_code = EXIT_USAGE
    hint = "deploy again with --allow-dag-removal (or --yes) if removing them is intended"


class WaitTimeout(ClientError):
    """--wait gave up before the deploy was live on every sidecar."""

    code = "wait_timeout"
    exit_code = EXIT_TIMEOUT


class ImportErrorsFound(ClientError):
    """The deploy went live (or was held back by a gating sidecar) with import errors Airflow
    reported and the version before did not have: exit 5 (--allow-import-errors: 0)."""

    code = "import_errors"
    exit_code = EXIT_IMPORT_ERRORS
    hint = "fix the files named and deploy again; --allow-import-errors accepts them"


class Interrupted(ClientError):
    """SIGINT or SIGTERM arrived; the message says what became of the deploy."""

    code = "interrupted"

    def __init__(self, message: str, signal_exit: int) -> None:
        super().__init__(message)
        self.exit_code = signal_exit


class SyncError(ClientError):
    """The sidecar could not fetch, verify or publish a version."""

    code = "sync_error"


class Terminated(BaseException):  # noqa: N818 - it mirrors KeyboardInterrupt, raised by the SIGTERM handler
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it)."""
