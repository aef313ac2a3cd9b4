"""HTTP client of the control API, with bounded retries in the transport."""
from __future__ import annotations

import functools
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

from dagcast.exceptions import ApiError, ApiUnavailable

log = logging.getLogger("dagcast.client")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
SIDECAR_SECRET_HEADER = "X-Dagcast-Sidecar-Secret"  # a sidecar's own secret, from its registration


def backoff(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff."""
    return float(random.uniform(0, min(cap, base * 2**attempt)))


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR), made once per
    process: every httpx client made without one loads the CA certificates again (~25 ms of CPU),
    and a deploy made three (the API's, the manifest's download and the upload's)."""
    return httpx.create_ssl_context()


def verify_for(url: str) -> ssl.SSLContext:
    """The TLS context for requests to `url`: tls_context() for https; for plain http (the embedded
    stack on 127.0.0.1) a context that trusts no certificate, so the CA certificates are not loaded
    for a connection that uses none, and anything that ever tried TLS with it would fail, never go
    unverified."""
    if url.lower().startswith("http://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies (CERT_REQUIRED, hostnames) against no CA
    return tls_context()


class ApiClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        attempts: int = 4,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "dagcast"},
            timeout=timeout,
            verify=verify_for(api_url),
        )
        self._attempts = attempts
        self._on_retry = on_retry or (lambda msg: log.warning(msg))

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        for attempt in range(self._attempts):
            last = attempt == self._attempts - 1
            try:
                resp = self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:
                if last:
                    raise ApiUnavailable(f"cannot reach the API for {method} {path}: {exc}") from exc
                self._retry(f"{method} {path} failed ({exc.__class__.__name__})", attempt)
                continue
            if resp.status_code in RETRY_STATUSES and not last:
                self._retry(f"{method} {path} answered {resp.status_code}", attempt)
                continue
            if resp.status_code >= 400:
                raise _api_error(resp)
            return resp.json() if resp.content else None
        raise AssertionError("unreachable")

    def _retry(self, what: str, attempt: int) -> None:
        delay = backoff(attempt)
        self._on_retry(f"{what}; retrying in {delay:.1f}s (attempt {attempt + 2}/{self._attempts})")
        time.sleep(delay)

    # --- endpoints -------------------------------------------------------------------

    def get_deployment(self, deployment: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/deployments/{deployment}"))

    def update_deployment(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/deployments/{deployment}", json=changes))

    def create_deploy(self, deployment: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/deploys", json=body))

    def get_deploy(self, deployment: str, deploy_id: str, wait: int = 0, dag_ids: bool = True,
                   until_settled: bool = False) -> dict[str, Any]:
        """The deploy; with `wait` seconds, the API answers when it changes (a long poll) or the time is up.
        `dag_ids` False: without the deploy's DAG ids (an API that does not know `omit` sends them).
        `until_settled` (with `wait`): answered at a change of state, once settled, or when the time is up,
        not at each sidecar's report (an API that does not know `until` answers at each)."""
        params: dict[str, Any] = {"wait": wait} if wait > 0 else {}
        if not dag_ids:
            params["omit"] = "dag_ids"
        if until_settled and wait > 0:
            params["until"] = "settled"
        return dict(self.request("GET", f"/deployments/{deployment}/deploys/{deploy_id}", params=params))

    def list_deploys(self, deployment: str, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return dict(self.request("GET", f"/deployments/{deployment}/deploys", params=params))

    def renew_upload(self, deployment: str, deploy_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/deploys/{deploy_id}/upload"))

    def cancel_deploy(self, deployment: str, deploy_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/deploys/{deploy_id}/cancel"))

    def rollback(self, deployment: str, deploy_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/deploys/{deploy_id}/rollback"))

    def list_deployments(self) -> dict[str, Any]:
        return dict(self.request("GET", "/deployments"))

    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/deployments", json=body))

    def list_sidecars(self, deployment: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/deployments/{deployment}/sidecars"))

    def list_tokens(self) -> dict[str, Any]:
        return dict(self.request("GET", "/tokens"))

    def create_token(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/tokens", json=body))

    def revoke_token(self, name: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/tokens/{name}"))

    def promote(self, deployment: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/promotions", json=body))

    def add_webhook(self, deployment: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", f"/deployments/{deployment}/webhooks", json=body))

    def list_webhooks(self, deployment: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/deployments/{deployment}/webhooks"))

    def remove_webhook(self, deployment: str, webhook_id: str) -> None:
        self.request("DELETE", f"/deployments/{deployment}/webhooks/{webhook_id}")

    def list_deliveries(self, deployment: str, limit: int = 20) -> dict[str, Any]:
        return dict(self.request("GET", f"/deployments/{deployment}/deliveries", params={"limit": limit}))

    def get_version(self, deployment: str, version: int | None) -> dict[str, Any]:
        which = "current" if version is None else str(version)
        return dict(self.request("GET", f"/deployments/{deployment}/versions/{which}"))

    def register_sidecar(self, deployment: str, name: str, component: str, secret: str | None = None) -> dict[str, Any]:
        """Register; `secret` (from an earlier registration of this sidecar) lets it take its name back."""
        body = {"name": name, "component": component}
        return dict(self.request("POST", f"/deployments/{deployment}/sidecars", json=body, headers=_secret(secret)))

    def heartbeat(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> dict[str, Any]:
        return dict(self.request("PUT", f"/deployments/{deployment}/sidecars/{name}", json=body, headers=_secret(secret)))

    def report_parse(self, deployment: str, name: str, body: dict[str, Any], secret: str | None) -> None:
        self.request("PUT", f"/deployments/{deployment}/sidecars/{name}/parse", json=body, headers=_secret(secret))

    def deregister_sidecar(self, deployment: str, name: str, secret: str | None) -> None:
        self.request("DELETE", f"/deployments/{deployment}/sidecars/{name}", headers=_secret(secret))


def _secret(secret: str | None) -> dict[str, str] | None:
    return {SIDECAR_SECRET_HEADER: secret} if secret else None


def _api_error(resp: httpx.Response) -> ApiError:
    """The API's own error, or one that says the answer came from something else (a wrong URL:
    API Gateway's "Missing Authentication Token", a web server's 404 page)."""
    try:
        err = resp.json()["error"]
        return ApiError(resp.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
        return ApiError(resp.status_code, "not_dagcast", text, from_dagcast=False)
