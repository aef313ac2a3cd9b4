"""Webhook deliveries: the signature, the URL checks that keep a webhook off private networks, and one
delivery attempt against a receiver (redirects never followed, a timeout, a removed webhook)."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chalicelib.exceptions import InvalidRequest
from chalicelib.models import Delivery, Webhook
from chalicelib.webhooks import MAX_BACKOFF_SECONDS, Deliverer, DeliveryFailed, backoff, check_url, sign, verify

SECRET = "whsec_test"
BODY = json.dumps({"id": "deploy.live:prod:0190-abc", "type": "deploy.live", "deployment": "prod"}).encode()


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    want = "sha256=" + hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, BODY) == want


def test_verify_refuses_a_changed_body_another_secret_and_a_replayed_timestamp() -> None:
    sig = sign(SECRET, 1700000000, BODY)
    assert verify(SECRET, "1700000000", sig, BODY, now=1700000010)
    assert not verify(SECRET, "1700000000", sig, BODY + b" ", now=1700000010)
    assert not verify("other", "1700000000", sig, BODY, now=1700000010)
    assert not verify(SECRET, "1700000000", sig, BODY, now=1700000000 + 301), "replayed after 5 minutes"
    assert not verify(SECRET, "17e8", sig, BODY, now=1700000010)


def resolve_to(*addresses: str) -> Any:
    return lambda host, port: list(addresses)


@pytest.mark.parametrize("url, addresses, why", [
    ("http://hooks.example.com/x", ["93.184.216.34"], "must be https"),
    ("https://metadata.example/x", ["169.254.169.254"], "non-public address"),
    ("https://internal.example/x", ["10.0.0.7"], "non-public address"),
    ("https://loop.example/x", ["127.0.0.1"], "non-public address"),
    ("https://mixed.example/x", ["93.184.216.34", "192.168.1.2"], "non-public address"),
    ("https://u:p@hooks.example.com/x", ["93.184.216.34"], "credentials"),
    ("file:///etc/passwd", [], r"must be http\(s\)"),
])
def test_webhook_urls_on_aws_are_https_to_public_hosts_only(url: str, addresses: list[str], why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        check_url(url, allow_private=False, resolve=resolve_to(*addresses))


def test_a_public_https_url_is_accepted_and_loopback_only_where_private_hosts_are_allowed() -> None:
    assert check_url("https://ci.example.com/hook", False, resolve_to("93.184.216.34")) == "https://ci.example.com/hook"
    assert check_url("http://127.0.0.1:8080/hook", True, resolve_to()) == "http://127.0.0.1:8080/hook"


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 10) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff(30, 10) == MAX_BACKOFF_SECONDS


HOOK = Webhook(deployment="prod", webhook_id="0123456789ab", url="http://127.0.0.1:9/hook", events=["*"])
MESSAGE = {"webhook_id": HOOK.webhook_id, "deployment": "prod", "event_type": "deploy.live", "body": BODY.decode()}


def deliverer(handler: Any, recorded: list[Delivery], hook: Webhook | None = HOOK) -> Deliverer:
    return Deliverer(lambda d, w: (hook, SECRET) if hook else None, recorded.append, timeout_seconds=1,
                     retry_base_seconds=10, allow_private=True, transport=httpx.MockTransport(handler))


def test_a_delivery_is_the_signed_body_with_the_event_id_and_is_recorded() -> None:
    seen: list[httpx.Request] = []
    recorded: list[Delivery] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    out = deliverer(handler, recorded).deliver(MESSAGE, attempt=1)
    [request] = seen
    assert request.content == BODY
    assert request.headers["X-Dagcast-Delivery"] == "deploy.live:prod:0190-abc"
    assert request.headers["X-Dagcast-Event"] == "deploy.live"
    assert verify(SECRET, request.headers["X-Dagcast-Timestamp"], request.headers["X-Dagcast-Signature-256"], request.content)
    assert out is not None and out.ok and out.status == 204 and recorded == [out]


def test_a_redirect_is_never_followed_and_the_attempt_fails_with_backoff() -> None:
    seen: list[str] = []
    recorded: list[Delivery] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    with pytest.raises(DeliveryFailed) as failed:
        deliverer(handler, recorded).deliver(MESSAGE, attempt=3)
    assert seen == [HOOK.url], "only the registered URL was asked"
    assert failed.value.retry_in == 40
    assert recorded[0].status == 302 and not recorded[0].ok and "not followed" in (recorded[0].error or "")


def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt() -> None:
    recorded: list[Delivery] = []

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(DeliveryFailed):
        deliverer(handler, recorded).deliver(MESSAGE, attempt=1)
    assert recorded[0].status is None and "no answer within 1 s" in (recorded[0].error or "")


def test_a_removed_webhook_gets_nothing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request for a removed webhook")

    recorded: list[Delivery] = []
    assert deliverer(handler, recorded, hook=None).deliver(MESSAGE, attempt=1) is None
    assert recorded == []


def test_the_readme_verification_snippet_accepts_a_real_delivery_and_refuses_a_forged_one() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "def verified" in b]
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # noqa: S102 - the README's own code
    stamp = int(time.time())
    headers = {"X-Dagcast-Timestamp": str(stamp), "X-Dagcast-Signature-256": sign(SECRET, stamp, BODY)}
    assert scope["verified"](SECRET, headers, BODY)
    assert not scope["verified"](SECRET, headers, BODY.replace(b"prod", b"dev!"))
    assert not scope["verified"]("another", headers, BODY)
