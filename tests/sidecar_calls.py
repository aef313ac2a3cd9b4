"""One sidecar as the app sees it, through chalice.test.Client: it registers, then acts with its own secret."""
from __future__ import annotations

import json
from typing import Any

from chalice.test import Client

import app as app_module

SECRET_HEADER = "X-Dagcast-Sidecar-Secret"


class SidecarCalls:
    def __init__(self, client: Client, deployment: str, token: str, name: str, component: str = "worker") -> None:
        self.client = client
        self.deployment = deployment
        self.token = token
        self.name = name
        resp = self._call("POST", f"/deployments/{deployment}/sidecars", {"name": name, "component": component}, secret=None)
        assert resp.status_code == 201, resp.body
        self.registration: dict[str, Any] = resp.json_body
        self.secret: str = self.registration["secret"]
        self.deployment_id: str = self.registration["deployment_id"]

    def _call(self, method: str, path: str, body: Any = None, secret: str | None = "") -> Any:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        secret = self.secret if secret == "" else secret
        if secret:
            headers[SECRET_HEADER] = secret
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["body"] = json.dumps(body)
        return getattr(self.client.http, method.lower())(path, **kwargs)

    def report(self, body: dict[str, Any], secret: str | None = "") -> Any:
        """A heartbeat with exactly this body (and this sidecar's secret unless told otherwise)."""
        return self._call("PUT", f"/deployments/{self.deployment}/sidecars/{self.name}", body, secret)

    def report_running(self, version: int, **fields: Any) -> Any:
        """A heartbeat saying it runs exactly `version`: its number, bundle sha256 and deployment id."""
        _, sha256, uid = app_module.get_store().version_identity(self.deployment, version)
        resp = self.report({"version": version, "sha256": sha256, "deployment_id": uid or self.deployment_id, **fields})
        assert resp.status_code == 200, resp.body
        return resp

    def deregister(self, secret: str | None = "") -> Any:
        return self._call("DELETE", f"/deployments/{self.deployment}/sidecars/{self.name}", secret=secret)
