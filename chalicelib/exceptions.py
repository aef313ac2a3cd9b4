"""The one exception family of the server side (API and ingest functions).

Each class names a condition a caller can act on; `app.py` maps them to HTTP
statuses in one place (``HTTP_STATUS``), and the CLI maps them to exit codes.
"""
from __future__ import annotations


class DagcastError(Exception):
    """Base of every error dagcast raises on purpose."""

    code = "error"


class InvalidRequest(DagcastError):
    """The request body or parameters are malformed; fix the input and retry."""

    code = "invalid_request"


class BundleTooLarge(InvalidRequest):
    """The announced bundle is over the deployment's max_bundle_bytes: a rejection, not a malformed request."""

    code = "bundle_too_large"


class DiffRefused(InvalidRequest):
    """No text diff for this file: it is binary, not UTF-8, or over the size bound; compare it locally."""

    code = "diff_refused"


class Unauthorized(DagcastError):
    """No bearer token, or one that is unknown, malformed or revoked."""

    code = "unauthorized"


class Forbidden(DagcastError):
    """The token is valid but its role or deployment scope does not allow this."""

    code = "forbidden"


class NotFound(DagcastError):
    """The deployment, deploy or version does not exist."""

    code = "not_found"


class Conflict(DagcastError):
    """The resource is in a state that forbids this (for example DAG deploys disabled)."""

    code = "conflict"


class BaseMoved(Conflict):
    """A delta upload names a base version that is no longer live: make the delta again against the live one."""

    code = "base_moved"


class PromotionsOnly(Conflict):
    """The deployment takes only promoted versions (accept: promotions): promote one instead of uploading."""

    code = "promotions_only"


class PromotionRefused(Conflict):
    """This promotion is not allowed: the target takes only uploads, or the source version does not qualify."""

    code = "promotion_refused"


class StorageError(DagcastError):
    """An AWS call failed; the message names the step that failed."""

    code = "storage_error"


class BundleError(DagcastError):
    """A bundle could not be built or read (the message names the file; `path` is it, when known)."""

    code = "bundle_error"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
