"""Lifecycle events: what happened to a deploy, on Amazon EventBridge and to the deployment's webhooks.

Each event is emitted by the function that sees it happen (the API, ingest, the janitor), after the
state change it reports is stored. Its `detail` has one documented shape per type (README: "Events"),
always with `id` (stable: the same happening gives the same id, so consumers de-duplicate on it),
`type`, `deployment`, `deploy_id`, `version`, `sha256`, `git` and `created_by`.

Emitting never fails the operation that caused it: a put that fails is logged and counted
(`EventsFailed`), and the deploy goes on. Webhook deliveries are queued here, one SQS message per
(webhook, event), and sent by the webhooks function (chalicelib.webhooks), at least once.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.bundle import Issue
from chalicelib.models import Deploy, Webhook

logger = Logger(service="dagcast", child=True)

SOURCE = "dagcast"
SCHEMA_VERSION = 1
MAX_ERRORS = 10  # a rejection's first errors; `errors_total` says how many there were
MAX_MESSAGE_CHARS = 500


class EventType(str, Enum):
    CREATED = "deploy.created"
    ACCEPTED = "deploy.accepted"
    REJECTED = "deploy.rejected"
    LIVE = "deploy.live"
    SUPERSEDED = "deploy.superseded"
    ROLLED_BACK = "deploy.rolled_back"
    PROMOTED = "deploy.promoted"
    IMPORT_ERRORS = "deploy.import_errors"
    SIDECAR_STALE = "sidecar.stale"

    @property
    def detail_type(self) -> str:
        return DETAIL_TYPES[self]


DETAIL_TYPES = {
    EventType.CREATED: "Deploy Created",
    EventType.ACCEPTED: "Deploy Accepted",
    EventType.REJECTED: "Deploy Rejected",
    EventType.LIVE: "Deploy Live",
    EventType.SUPERSEDED: "Deploy Superseded",
    EventType.ROLLED_BACK: "Deploy Rolled Back",
    EventType.PROMOTED: "Deploy Promoted",
    EventType.IMPORT_ERRORS: "Import Errors",
    EventType.SIDECAR_STALE: "Sidecar Stale",
}
EVENT_TYPES = frozenset(t.value for t in EventType)


def check_event_types(names: Iterable[str]) -> list[str]:
    """The event types a webhook asks for, checked: known names, or `*` for all. ValueError names the unknown one."""
    out: list[str] = []
    for name in names:
        if name != "*" and name not in EVENT_TYPES:
            raise ValueError(f"unknown event type {name!r}; known: *, {', '.join(sorted(EVENT_TYPES))}")
        if name not in out:
            out.append(name)
    return out


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def deploy_detail(kind: EventType, deploy: Deploy, suffix: str = "", **extra: Any) -> dict[str, Any]:
    """The detail of an event about a deploy; `suffix` tells apart events of one type about one deploy
    (one per sidecar for import errors)."""
    return {
        "id": f"{kind.value}:{deploy.deployment}:{deploy.deploy_id}" + (f":{suffix}" if suffix else ""),
        "type": kind.value,
        "schema": SCHEMA_VERSION,
        "deployment": deploy.deployment,
        "deploy_id": deploy.deploy_id,
        "version": deploy.version,
        "sha256": deploy.sha256,
        "git": deploy.git.model_dump(mode="json") if deploy.git else None,
        "created_by": deploy.created_by,
        "description": deploy.description,
        "promoted_from": deploy.promoted_from.model_dump(mode="json") if deploy.promoted_from else None,
        **extra,
    }


def errors_detail(errors: list[Issue]) -> dict[str, Any]:
    return {
        "errors": [{"code": e.code, "path": e.path, "line": e.line, "message": _clip(e.message)} for e in errors[:MAX_ERRORS]],
        "errors_total": len(errors),
    }


class EventSink:
    """Puts events on the deployment events bus and queues them for the deployment's webhooks.

    `bus_name` None: no EventBridge (a stack without a bus); `webhooks` None: no webhook queue."""

    def __init__(
        self,
        events_client: Any,
        bus_name: str | None,
        sqs_client: Any = None,
        webhook_queue_url: str | None = None,
        list_webhooks: Callable[[str], list[Webhook]] | None = None,
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._events = events_client
        self._bus = bus_name
        self._sqs = sqs_client
        self._queue = webhook_queue_url
        self._list_webhooks = list_webhooks
        self._on_failure = on_failure or (lambda _kind: None)
        self._clock = clock

    def emit(self, kind: EventType, detail: dict[str, Any]) -> None:
        detail = {**detail, "time": detail.get("time") or _iso(self._clock())}
        body = json.dumps(detail, separators=(",", ":"), sort_keys=True)
        if self._bus:
            self._put(kind, body)
        if self._queue and self._list_webhooks is not None and self._sqs is not None:
            self._queue_deliveries(kind, detail, body)

    def _put(self, kind: EventType, body: str) -> None:
        try:
            out = self._events.put_events(Entries=[{"Source": SOURCE, "DetailType": kind.detail_type, "Detail": body,
                                                    "EventBusName": self._bus}])
            failed = [e for e in out.get("Entries", []) if e.get("ErrorCode")]
        except (BotoCoreError, ClientError) as exc:
            failed = [{"ErrorCode": exc.__class__.__name__, "ErrorMessage": str(exc)}]
        if failed:
            logger.error("event not put on the bus", extra={"event_type": kind.value, "error": failed[0].get("ErrorCode"),
                                                            "reason": failed[0].get("ErrorMessage")})
            self._on_failure(kind.value)

    def _queue_deliveries(self, kind: EventType, detail: dict[str, Any], body: str) -> None:
        try:
            hooks = [h for h in self._list_webhooks(detail["deployment"]) if kind.value in h.events or "*" in h.events]  # type: ignore[misc]
            for start in range(0, len(hooks), 10):
                batch = hooks[start:start + 10]
                entries = [{"Id": str(i), "MessageBody": json.dumps({"webhook_id": h.webhook_id, "deployment": h.deployment,
                                                                      "event_type": kind.value, "body": body})}
                           for i, h in enumerate(batch)]
                out = self._sqs.send_message_batch(QueueUrl=self._queue, Entries=entries)
                if out.get("Failed"):
                    raise ClientError({"Error": {"Code": out["Failed"][0].get("Code", "Failed"),
                                                 "Message": out["Failed"][0].get("Message", "")}}, "SendMessageBatch")
        except (BotoCoreError, ClientError) as exc:
            logger.error("webhook deliveries not queued", extra={"event_type": kind.value, "error": str(exc)})
            self._on_failure(kind.value)


class NoEvents(EventSink):
    """A sink that drops everything (unit tests of parts that emit, and stacks without events)."""

    def __init__(self) -> None:
        super().__init__(None, None)

    def emit(self, kind: EventType, detail: dict[str, Any]) -> None:
        return None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"
