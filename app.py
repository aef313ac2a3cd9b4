"""dagcast's Chalice app: routes and the ingest handler, wired to chalicelib. Thin by design."""
from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from chalice import Chalice, Rate, Response
from pydantic import BaseModel, ValidationError

from chalicelib import __version__
from chalicelib.auth import Authenticator, Permission
from chalicelib.events import EventSink
from chalicelib.exceptions import (
    BundleError,
    Conflict,
    DagcastError,
    Forbidden,
    InvalidRequest,
    NotFound,
    StorageError,
    Unauthorized,
)
from chalicelib.models import (
    NAME_RE,
    CreatedDeploy,
    CreateDeploy,
    CreateDeployment,
    CreateToken,
    CreateWebhook,
    Delivery,
    Deploy,
    DeployFiles,
    Deployment,
    DeployView,
    FileDiff,
    Heartbeat,
    IssuedToken,
    Page,
    ParseRecord,
    ParseReport,
    Promote,
    RegisterSidecar,
    Registration,
    SidecarView,
    Token,
    TokenView,
    UpdateDeployment,
    UploadForm,
    VersionView,
    WebhookCreated,
    WhoAmI,
)
from chalicelib.notify import Notifier, SidecarQueues
from chalicelib.openapi import RouteSpec, build_document
from chalicelib.publish import Publisher
from chalicelib.service import ControlPlane, now_ms
from chalicelib.settings import get_settings, tracing_enabled
from chalicelib.signing import FileSigner, KmsSigner, Signer
from chalicelib.storage import BundleStorage
from chalicelib.store import Store
from chalicelib.telemetry import Telemetry, Tracing
from chalicelib.wakeups import DeployWakeups

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

    from chalicelib.ingest import Ingest
    from chalicelib.webhooks import Deliverer

app = Chalice(app_name="dagcast")
logger = Logger(service="dagcast")
tracing = Tracing("dagcast", tracing_enabled)  # X-Ray subsegments and patched boto3 on Lambda; a no-op elsewhere
telemetry = Telemetry()


@app.middleware("all")
def flush_metrics(event: Any, get_response: Callable[[Any], Any]) -> Any:
    """Every invocation, HTTP or event, starts tracing (the first time, where it is on) and ends by
    printing its metrics as EMF."""
    tracing.start()
    try:
        return get_response(event)
    finally:
        telemetry.flush()

HTTP_STATUS: dict[type[DagcastError], int] = {
    InvalidRequest: 400,
    BundleError: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    StorageError: 503,
}

# --- lazily built, cached AWS clients and services ------------------------------------

# A pool as large as the embedded stack's concurrent requests (a Lambda invocation uses one connection at a time)
_AWS_CONFIG = Config(retries={"max_attempts": 5, "mode": "standard"}, signature_version="s3v4", max_pool_connections=64)


@functools.lru_cache(maxsize=1)
def get_wakeups() -> DeployWakeups:
    return DeployWakeups()


@functools.lru_cache(maxsize=1)
def get_store() -> Store:
    table = boto3.resource("dynamodb", config=_AWS_CONFIG).Table(get_settings().table_name)
    return Store(table, on_deploy_change=get_wakeups().changed)


@functools.lru_cache(maxsize=1)
def get_bundles() -> BundleStorage:
    return BundleStorage(boto3.client("s3", config=_AWS_CONFIG), get_settings().bundles_bucket)


@functools.lru_cache(maxsize=1)
def get_sns() -> Any:
    return boto3.client("sns", config=_AWS_CONFIG)


@functools.lru_cache(maxsize=1)
def get_signer() -> Signer:
    s = get_settings()
    if s.signing_key_arn:
        return KmsSigner(boto3.client("kms", config=_AWS_CONFIG), s.signing_key_arn)
    assert s.signing_key_file is not None  # Settings requires one of the two
    return FileSigner(Path(s.signing_key_file))


@functools.lru_cache(maxsize=1)
def get_sqs() -> Any:
    return boto3.client("sqs", config=_AWS_CONFIG)


@functools.lru_cache(maxsize=1)
def get_events() -> EventSink:
    s = get_settings()
    return EventSink(
        boto3.client("events", config=_AWS_CONFIG) if s.event_bus_name else None, s.event_bus_name,
        get_sqs() if s.webhook_queue_url else None, s.webhook_queue_url, get_store().list_webhooks,
        on_failure=telemetry.event_failed,
    )


@functools.lru_cache(maxsize=1)
def get_publisher() -> Publisher:
    s = get_settings()
    return Publisher(s, get_store(), get_bundles(), Notifier(get_sns(), s.topic_arn), now_ms, get_signer(), get_events())


@functools.lru_cache(maxsize=1)
def get_deliverer() -> Deliverer:
    from chalicelib.webhooks import Deliverer

    s = get_settings()
    store = get_store()

    def record(delivery: Delivery) -> None:
        store.put_delivery(delivery, delivery.at // 1000 + s.delivery_retention_days * 86400)
        telemetry.webhook_delivery(delivery.ok)

    return Deliverer(store.get_webhook, record, s.webhook_timeout_seconds, s.webhook_retry_base_seconds,
                     s.webhook_allow_private_hosts)


@functools.lru_cache(maxsize=1)
def get_control() -> ControlPlane:
    s = get_settings()
    queues = SidecarQueues(get_sqs(), get_sns(), s.topic_arn, s.sidecar_queue_prefix)
    return ControlPlane(s, get_store(), get_bundles(), queues, get_publisher(), telemetry=telemetry,
                        forget_token=get_auth().forget, signer=get_signer(), wakeups=get_wakeups())


@functools.lru_cache(maxsize=1)
def get_ingest() -> Ingest:
    from chalicelib.ingest import Ingest  # the ingest function's own code: the API's cold start skips it

    return Ingest(get_settings(), get_store(), get_bundles(), get_publisher(), now_ms, telemetry)


@functools.lru_cache(maxsize=1)
def get_auth() -> Authenticator:
    return Authenticator(get_store(), get_settings().token_cache_seconds)


# --- one wrapper for every route: path checks, auth, body parsing, error mapping -------

ROUTES: list[RouteSpec] = []
MAX_WAIT_SECONDS = 20  # a long poll stays well inside API Gateway's 29 s integration timeout
SIDECAR_SECRET_HEADER = "x-dagcast-sidecar-secret"
_SECRET_DOC = {"X-Dagcast-Sidecar-Secret": "the secret this sidecar's registration returned"}
_PARAM_PATTERNS = {
    "deployment": re.compile(NAME_RE),
    "name": re.compile(NAME_RE),
    "deploy_id": re.compile(r"^[0-9a-f]{11}-[0-9a-f]{6}$"),
    "version": re.compile(r"^[1-9][0-9]{0,9}$"),
    "webhook_id": re.compile(r"^[0-9a-f]{12}$"),
}


@dataclass
class Ctx:
    """What a view gets besides its path parameters."""

    token: Token | None
    body: Any
    query: dict[str, str]
    headers: dict[str, str]

    def sidecar_secret(self) -> str | None:
        """The secret a sidecar was given at registration (X-Dagcast-Sidecar-Secret)."""
        return self.headers.get(SIDECAR_SECRET_HEADER) or None


def error_response(exc: DagcastError) -> Response:
    status = next((code for cls, code in HTTP_STATUS.items() if isinstance(exc, cls)), 500)
    return Response(body={"error": {"code": exc.code, "message": str(exc)}}, status_code=status)


def api(
    path: str,
    method: str,
    summary: str,
    permission: Permission | None,
    *,
    body: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Any]:
    ROUTES.append(RouteSpec(path, method, summary, permission.value if permission else None, body, response, status,
                            query or {}, headers or {}))

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def view(**params: str) -> Response:
            request = app.current_request
            try:
                for key, value in params.items():
                    if not _PARAM_PATTERNS[key].fullmatch(value):
                        raise NotFound(f"no {key.replace('_', ' ')} {value!r}")
                token = None
                if permission is not None:
                    header = request.headers.get("authorization") if request else None
                    token = get_auth().authorize(header, permission, params.get("deployment"))
                parsed = _parse_body(body, request.raw_body if request else b"") if body else None
                headers = {k.lower(): v for k, v in request.headers.items()} if request else {}
                result = fn(Ctx(token, parsed, dict(request.query_params or {}) if request else {}, headers), **params)
            except DagcastError as exc:
                return error_response(exc)
            except BotoCoreError as exc:
                # no traceback: the cause is the storage service, and its class and message say which
                logger.warning("AWS call failed", extra={"error": f"{exc.__class__.__name__}: {exc}"})
                return error_response(StorageError(f"AWS call failed: {exc.__class__.__name__}"))
            if result is None:
                return Response(body="", status_code=204)
            payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
            return Response(body=payload, status_code=status)

        return app.route(path, methods=[method])(view)

    return decorate


def _parse_body(model: type[BaseModel], raw: str | bytes | None) -> BaseModel:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"invalid request body: {where}: {first['msg']} ({exc.error_count()} error(s))") from exc


def _int_query(ctx: Ctx, name: str, default: int, low: int, high: int) -> int:
    raw = ctx.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"query parameter {name!r} must be an integer from {low} to {high}")
    return int(raw)


# --- routes ------------------------------------------------------------------------------


@api("/healthz", "GET", "Liveness of the API", None)
def healthz(ctx: Ctx) -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@api("/openapi.json", "GET", "This OpenAPI document", None)
def openapi(ctx: Ctx) -> dict[str, Any]:
    return build_document(ROUTES, __version__)


@api("/deployments", "GET", "List the deployments the token can see", Permission.READ)
def list_deployments(ctx: Ctx) -> dict[str, Any]:
    assert ctx.token is not None
    return {"items": [d.model_dump(mode="json") for d in get_control().list_deployments(ctx.token.allows)]}


@api("/deployments", "POST", "Create a deployment", Permission.ADMIN, body=CreateDeployment, response=Deployment, status=201)
def create_deployment(ctx: Ctx) -> Deployment:
    return get_control().create_deployment(ctx.body)


@api("/deployments/{deployment}", "GET", "Show a deployment", Permission.READ, response=Deployment)
def get_deployment(ctx: Ctx, deployment: str) -> Deployment:
    return get_control().get_deployment(deployment)


@api("/deployments/{deployment}", "PATCH", "Change a deployment's settings", Permission.ADMIN, body=UpdateDeployment, response=Deployment)
def update_deployment(ctx: Ctx, deployment: str) -> Deployment:
    return get_control().update_deployment(deployment, ctx.body)


@api("/deployments/{deployment}/deploys", "POST", "Start a DAG-only deploy: record it and presign the upload",
     Permission.DEPLOY, body=CreateDeploy, response=CreatedDeploy, status=201)
def create_deploy(ctx: Ctx, deployment: str) -> CreatedDeploy:
    assert ctx.token is not None
    return get_control().create_deploy(deployment, ctx.body, created_by=ctx.token.name)


@api("/deployments/{deployment}/deploys", "GET", "Deploy history, newest first", Permission.READ, response=Page,
     query={"limit": "page size, 1-100", "cursor": "next_cursor of the previous page"})
def list_deploys(ctx: Ctx, deployment: str) -> Page:
    return get_control().list_deploys(deployment, _int_query(ctx, "limit", 20, 1, 100), ctx.query.get("cursor"))


@api("/deployments/{deployment}/deploys/{deploy_id}", "GET", "A deploy with its errors, per-sidecar versions and stages",
     Permission.READ, response=DeployView,
     query={"wait": f"seconds, 0-{MAX_WAIT_SECONDS}: answer when the deploy's state, its sidecars' activations "
                    "or its convergence change (a long poll), or when the time is up",
            "omit": "dag_ids: the deploy without its DAG ids (thousands of them are most of the answer; "
                    "`dagcast deploy --wait` asks this way)",
            "until": "settled: with wait, answer only when the deploy's state changes or it is settled (every "
                     "live sidecar on it, every parse report in), or when the time is up; not at each "
                     "sidecar's report (`dagcast deploy --wait` asks this way)"})
def get_deploy(ctx: Ctx, deployment: str, deploy_id: str) -> DeployView | dict[str, Any]:
    omit, until = ctx.query.get("omit"), ctx.query.get("until")
    if omit not in (None, "", "dag_ids"):
        raise InvalidRequest(f"query parameter 'omit' may only be 'dag_ids', not {omit[:40]!r}")
    if until not in (None, "", "settled"):
        raise InvalidRequest(f"query parameter 'until' may only be 'settled', not {until[:40]!r}")
    view = get_control().get_deploy(deployment, deploy_id, _int_query(ctx, "wait", 0, 0, MAX_WAIT_SECONDS),
                                    dag_ids=omit != "dag_ids", until_settled=until == "settled")
    if omit == "dag_ids":
        return view.model_dump(mode="json", exclude={"deploy": {"dag_ids"}})
    return view


@api("/deployments/{deployment}/deploys/{deploy_id}/files", "GET",
     "The files a deploy's version added, removed and changed against the version before it (from the manifests)",
     Permission.READ, response=DeployFiles)
def deploy_files(ctx: Ctx, deployment: str, deploy_id: str) -> DeployFiles:
    return get_control().deploy_files(deployment, deploy_id)


@api("/deployments/{deployment}/deploys/{deploy_id}/files/diff", "GET",
     "A unified text diff of one file between a deploy's version and the version before it (text files up to a bound)",
     Permission.READ, response=FileDiff, query={"path": "the file's path in the bundle"})
def file_diff(ctx: Ctx, deployment: str, deploy_id: str) -> FileDiff:
    path = ctx.query.get("path")
    if not path:
        raise InvalidRequest("query parameter 'path' is required: the file to diff")
    return get_control().file_diff(deployment, deploy_id, path)


@api("/deployments/{deployment}/deploys/{deploy_id}/upload", "POST", "A fresh presigned upload for a PENDING deploy",
     Permission.DEPLOY, response=UploadForm)
def renew_upload(ctx: Ctx, deployment: str, deploy_id: str) -> UploadForm:
    return get_control().renew_upload(deployment, deploy_id)


@api("/deployments/{deployment}/deploys/{deploy_id}/cancel", "POST", "Cancel a deploy that was never uploaded",
     Permission.DEPLOY, response=Deploy)
def cancel_deploy(ctx: Ctx, deployment: str, deploy_id: str) -> Deploy:
    assert ctx.token is not None
    return get_control().cancel_deploy(deployment, deploy_id, ctx.token.name)


@api("/deployments/{deployment}/deploys/{deploy_id}/rollback", "POST",
     "Roll back: a new version serving this earlier deploy's bundle", Permission.ADMIN, response=Deploy, status=201)
def rollback(ctx: Ctx, deployment: str, deploy_id: str) -> Deploy:
    assert ctx.token is not None
    return get_control().rollback(deployment, deploy_id, ctx.token.name)


@api("/deployments/{deployment}/promotions", "POST",
     "Promote a version of another deployment: its bundle, byte for byte, copied inside S3 and validated here "
     "(deploy rights here, read on the source)", Permission.DEPLOY, body=Promote, response=Deploy, status=201)
def promote(ctx: Ctx, deployment: str) -> Deploy:
    assert ctx.token is not None
    return get_control().promote(deployment, ctx.body, ctx.token)


@api("/deployments/{deployment}/webhooks", "GET", "The deployment's webhooks (never their secrets)", Permission.ADMIN)
def list_webhooks(ctx: Ctx, deployment: str) -> dict[str, Any]:
    return {"items": [h.model_dump(mode="json") for h in get_control().list_webhooks(deployment)]}


@api("/deployments/{deployment}/webhooks", "POST", "Add a webhook; its signing secret is in this response only",
     Permission.ADMIN, body=CreateWebhook, response=WebhookCreated, status=201)
def add_webhook(ctx: Ctx, deployment: str) -> WebhookCreated:
    assert ctx.token is not None
    return get_control().add_webhook(deployment, ctx.body, ctx.token.name)


@api("/deployments/{deployment}/webhooks/{webhook_id}", "DELETE", "Remove a webhook (queued deliveries are dropped)",
     Permission.ADMIN, status=204)
def remove_webhook(ctx: Ctx, deployment: str, webhook_id: str) -> None:
    get_control().remove_webhook(deployment, webhook_id)


@api("/deployments/{deployment}/deliveries", "GET", "The last webhook delivery attempts, newest first", Permission.READ,
     query={"limit": "1-100"})
def list_deliveries(ctx: Ctx, deployment: str) -> dict[str, Any]:
    items = get_control().deliveries(deployment, _int_query(ctx, "limit", 20, 1, 100))
    return {"items": [d.model_dump(mode="json") for d in items]}


@api("/deployments/{deployment}/versions/current", "GET",
     "The live version; download URLs for tokens that may download (sidecar, admin)", Permission.READ,
     response=VersionView)
def current_version(ctx: Ctx, deployment: str) -> VersionView:
    return get_control().get_version(deployment, None, ctx.token)


@api("/deployments/{deployment}/versions/{version}", "GET",
     "A version; download URLs for tokens that may download (sidecar, admin)", Permission.READ,
     response=VersionView)
def get_version(ctx: Ctx, deployment: str, version: str) -> VersionView:
    return get_control().get_version(deployment, int(version), ctx.token)


@api("/deployments/{deployment}/sidecars", "GET", "Registered sidecars and their versions", Permission.READ)
def list_sidecars(ctx: Ctx, deployment: str) -> dict[str, Any]:
    return {"items": [s.model_dump(mode="json") for s in get_control().sidecar_views(deployment)]}


@api("/deployments/{deployment}/sidecars", "POST",
     "Register a sidecar: its queue, its own secret (shown once) and the keys that sign announcements",
     Permission.SYNC, body=RegisterSidecar, response=Registration, status=201, headers=_SECRET_DOC)
def register_sidecar(ctx: Ctx, deployment: str) -> Registration:
    assert ctx.token is not None
    return get_control().register_sidecar(deployment, ctx.body, ctx.token, ctx.sidecar_secret())


@api("/deployments/{deployment}/sidecars/{name}", "PUT",
     "Sidecar heartbeat with its live version (needs the sidecar's X-Dagcast-Sidecar-Secret)", Permission.SYNC,
     body=Heartbeat, response=SidecarView, headers=_SECRET_DOC)
def heartbeat(ctx: Ctx, deployment: str, name: str) -> SidecarView:
    return get_control().heartbeat(deployment, name, ctx.body, ctx.sidecar_secret())


@api("/deployments/{deployment}/sidecars/{name}/parse", "PUT",
     "A sidecar's report of what Airflow made of a version it parsed (needs its X-Dagcast-Sidecar-Secret)",
     Permission.SYNC, body=ParseReport, response=ParseRecord, headers=_SECRET_DOC)
def report_parse(ctx: Ctx, deployment: str, name: str) -> ParseRecord:
    return get_control().report_parse(deployment, name, ctx.body, ctx.sidecar_secret())


@api("/deployments/{deployment}/sidecars/{name}", "DELETE",
     "Deregister a sidecar and remove its queue (its X-Dagcast-Sidecar-Secret, or an admin)", Permission.SYNC, status=204,
     headers=_SECRET_DOC)
def deregister_sidecar(ctx: Ctx, deployment: str, name: str) -> None:
    assert ctx.token is not None
    get_control().deregister_sidecar(deployment, name, ctx.token, ctx.sidecar_secret())


@api("/whoami", "GET", "The token this request carries: its name, role and deployments", Permission.READ,
     response=WhoAmI)
def whoami(ctx: Ctx) -> WhoAmI:
    assert ctx.token is not None
    return get_control().whoami(ctx.token)


@api("/tokens", "GET", "List tokens (never their secrets)", Permission.ADMIN)
def list_tokens(ctx: Ctx) -> dict[str, Any]:
    return {"items": [t.model_dump(mode="json") for t in get_control().list_tokens()]}


@api("/tokens", "POST", "Create a token; the secret is in this response only", Permission.ADMIN,
     body=CreateToken, response=IssuedToken, status=201)
def create_token(ctx: Ctx) -> IssuedToken:
    return get_control().create_token(ctx.body)


@api("/tokens/{name}", "DELETE", "Revoke a token", Permission.ADMIN, response=TokenView)
def revoke_token(ctx: Ctx, name: str) -> TokenView:
    return get_control().revoke_token(name)


# The web console: static files, no token (the page signs in with one and calls the routes above).
# Plain routes, not `api(...)`: they return text, and are left out of the OpenAPI document.


@app.route("/", methods=["GET"])
def console_index() -> Response:
    from chalicelib import console

    page = console.index()
    return Response(body=page.body, status_code=200, headers=dict(page.headers))


@app.route("/console/{asset}", methods=["GET"])
def console_asset(asset: str) -> Response:
    from chalicelib import console

    found = console.asset(asset)
    if found is None:
        return error_response(NotFound(f"no console asset {asset!r}"))
    return Response(body=found.body, status_code=200, headers=dict(found.headers))


# --- events ------------------------------------------------------------------------------


@app.schedule(Rate(5, unit=Rate.MINUTES), name="janitor")
def janitor(event: Any) -> dict[str, Any]:
    """Removes silent sidecars' queues and expires deploys that were never uploaded."""
    report = get_control().janitor()
    logger.info("janitor done", extra=report.model_dump())
    return report.model_dump()


@tracing.capture_method
def _ingest_record(record: SQSRecord) -> None:
    from chalicelib.ingest import parse_notification

    for event in parse_notification(record.body):
        get_ingest().handle(event)


@app.on_sqs_message(queue="dagcast-ingest", batch_size=10, name="ingest")
def ingest(event: Any) -> dict[str, Any]:
    """S3 ObjectCreated -> SQS -> here. Failed records go back to the queue (and its DLQ)."""
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response

    processor = BatchProcessor(event_type=EventType.SQS)
    return dict(
        process_partial_response(
            event=event.to_dict(), record_handler=_ingest_record, processor=processor, context=event.context
        )
    )


def _webhook_record(record: SQSRecord) -> None:
    from chalicelib.webhooks import DeliveryFailed

    attempt = int(record.attributes.approximate_receive_count or 1)
    try:
        get_deliverer().deliver(json.loads(record.body), attempt)
    except DeliveryFailed as exc:
        # exponential backoff: the message comes back after retry_in seconds, until the queue's maxReceiveCount
        with contextlib.suppress(BotoCoreError, ClientError):
            get_sqs().change_message_visibility(QueueUrl=get_settings().webhook_queue_url,
                                                ReceiptHandle=record.receipt_handle, VisibilityTimeout=exc.retry_in)
        raise


@app.on_sqs_message(queue="dagcast-webhooks", batch_size=10, name="webhooks")
def webhooks(event: Any) -> dict[str, Any]:
    """Lifecycle events queued for webhooks -> signed POSTs. Failed ones come back with backoff, then go to the DLQ.
    A receiver that is down is an expected outcome, not a function error: a batch whose every delivery failed
    is answered with its item failures like any other (each attempt is recorded and logged as a warning)."""
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response

    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(
        process_partial_response(
            event=event.to_dict(), record_handler=_webhook_record, processor=processor, context=event.context
        )
    )
