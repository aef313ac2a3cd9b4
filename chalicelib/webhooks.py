"""Webhook deliveries: signed POSTs of lifecycle events to URLs outside AWS, at least once.

The body is the event's detail as JSON, byte for byte what was signed. Headers:

    X-Dagcast-Event:          deploy.live
    X-Dagcast-Delivery:       the event id (the same on every attempt: de-duplicate on it)
    X-Dagcast-Timestamp:      seconds since the epoch when this attempt was signed
    X-Dagcast-Signature-256:  sha256=HMAC-SHA256(secret, timestamp + "." + body), hex

A receiver recomputes the HMAC with its secret, compares in constant time, and refuses timestamps
older than a few minutes (a replayed request). Redirects are never followed; every attempt has a
timeout. An attempt that does not get a 2xx is recorded and retried by the queue with exponential
backoff, up to the queue's maxReceiveCount, then the message goes to the dead-letter queue.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from aws_lambda_powertools import Logger

from chalicelib.exceptions import DagcastError, InvalidRequest
from chalicelib.models import Delivery

logger = Logger(service="dagcast", child=True)

SIGNATURE_HEADER = "X-Dagcast-Signature-256"
TIMESTAMP_HEADER = "X-Dagcast-Timestamp"
EVENT_HEADER = "X-Dagcast-Event"
DELIVERY_HEADER = "X-Dagcast-Delivery"
REPLAY_TOLERANCE_SECONDS = 300
MAX_BACKOFF_SECONDS = 900
MAX_ERROR_CHARS = 300

Resolve = Callable[[str, int], list[str]]


class DeliveryFailed(DagcastError):
    """An attempt did not get a 2xx answer: the queue delivers the message again in `retry_in` seconds."""

    code = "delivery_failed"

    def __init__(self, message: str, retry_in: int) -> None:
        super().__init__(message)
        self.retry_in = retry_in


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, signature: str, body: bytes, now: float | None = None,
           tolerance: int = REPLAY_TOLERANCE_SECONDS) -> bool:
    """What a receiver does (the README has the same ten lines): a fresh timestamp and a matching HMAC."""
    if not timestamp.isdigit() or abs((now if now is not None else time.time()) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def _resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})


def check_url(url: str, allow_private: bool, resolve: Resolve = _resolve) -> str:
    """A webhook URL, checked: http(s), a host, no credentials in it; unless private hosts are allowed
    (the embedded stack), https only and a host whose every address is public, so a webhook cannot be
    aimed at the function's own network (the instance metadata address, a VPC service)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"webhook URL {url!r} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook URL {url!r} must be http(s)://host/...")
    if parts.username or parts.password:
        raise InvalidRequest("a webhook URL must not carry credentials: the signature authenticates dagcast")
    if allow_private:
        return url
    if parts.scheme != "https":
        raise InvalidRequest(f"webhook URL {url!r} must be https")
    try:
        addresses = resolve(parts.hostname, port)
    except OSError as exc:
        raise InvalidRequest(f"webhook host {parts.hostname!r} does not resolve: {exc}") from exc
    private = [a for a in addresses if not ipaddress.ip_address(a).is_global]
    if not addresses or private:
        raise InvalidRequest(f"webhook host {parts.hostname!r} resolves to a non-public address ({', '.join(private)})")
    return url


def backoff(attempt: int, base: int) -> int:
    """Seconds before attempt `attempt + 1`: base, 2 base, 4 base, ... up to MAX_BACKOFF_SECONDS."""
    return int(min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1)))


class Deliverer:
    """Sends one queued delivery: looks the webhook up (a removed one gets nothing), signs, POSTs, records."""

    def __init__(
        self,
        get_webhook: Callable[[str, str], tuple[Any, str] | None],
        record: Callable[[Delivery], None],
        timeout_seconds: float,
        retry_base_seconds: int,
        allow_private: bool,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
        resolve: Resolve = _resolve,
    ) -> None:
        self._get_webhook = get_webhook
        self._record = record
        self._timeout = timeout_seconds
        self._base = retry_base_seconds
        self._allow_private = allow_private
        self._clock = clock
        self._resolve = resolve
        self._http = httpx.Client(follow_redirects=False, timeout=timeout_seconds, transport=transport,
                                  headers={"User-Agent": "dagcast-webhooks"})

    def deliver(self, message: dict[str, Any], attempt: int) -> Delivery | None:
        """Deliver; None when the webhook no longer exists. Raises DeliveryFailed to be retried."""
        deployment, webhook_id = str(message["deployment"]), str(message["webhook_id"])
        found = self._get_webhook(deployment, webhook_id)
        if found is None:
            logger.info("webhook removed; delivery dropped", extra={"webhook_id": webhook_id})
            return None
        hook, secret = found
        body = str(message["body"]).encode()
        event = json.loads(body)
        started = self._clock()
        status: int | None = None
        error: str | None = None
        try:
            check_url(hook.url, self._allow_private, self._resolve)  # again: DNS may have changed since it was added
            timestamp = int(started)
            resp = self._http.post(hook.url, content=body, headers={
                "Content-Type": "application/json",
                EVENT_HEADER: str(message["event_type"]),
                DELIVERY_HEADER: str(event["id"]),
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(secret, timestamp, body),
            })
            status = resp.status_code
            if resp.is_redirect:
                error = f"answered {status} (redirects are not followed)"
            elif not resp.is_success:
                error = f"answered {status}"
        except httpx.TimeoutException:
            error = f"no answer within {self._timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}"[:MAX_ERROR_CHARS]
        except InvalidRequest as exc:
            error = str(exc)[:MAX_ERROR_CHARS]
        delivery = Delivery(deployment=deployment, webhook_id=webhook_id, event_id=str(event["id"]),
                            event_type=str(message["event_type"]), attempt=attempt, at=int(started * 1000),
                            status=status, ok=error is None, error=error,
                            duration_ms=int((self._clock() - started) * 1000))
        self._record(delivery)
        if error is not None:
            retry_in = backoff(attempt, self._base)
            logger.warning("webhook delivery failed", extra={"webhook_id": webhook_id, "attempt": attempt,
                                                             "error": error, "retry_in": retry_in})
            raise DeliveryFailed(f"delivery to webhook {webhook_id} failed: {error}", retry_in)
        return delivery
