"""The sidecar's /healthz and /metrics endpoints (Prometheus text format)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class SidecarMetrics:
    """Every metric the sidecar exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sync_seconds = Histogram(
            "dagcast_sidecar_sync_seconds",
            "Time to download, verify, extract and publish a version",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.syncs = Counter("dagcast_sidecar_syncs", "Sync attempts by result", ["result"], registry=self.registry)
        self.current_version = Gauge("dagcast_sidecar_current_version", "Version the dags link points to", registry=self.registry)
        self.seconds_behind = Gauge(
            "dagcast_sidecar_seconds_behind",
            "Seconds since the deployment's current version became active while this sidecar is not on it",
            registry=self.registry,
        )
        self.failures = Gauge("dagcast_sidecar_consecutive_failures", "Failed syncs in a row", registry=self.registry)
        self.last_sync = Gauge("dagcast_sidecar_last_sync_timestamp_seconds", "When a version was last published",
                               registry=self.registry)
        self.fetches = Counter(
            "dagcast_sidecar_fetches",
            "Versions fetched: the whole bundle, or built from a delta against the live version (or a delta refused)",
            ["kind"],
            registry=self.registry,
        )
        self.announcements = Counter(
            "dagcast_sidecar_announcements",
            "Queue messages by verdict: accepted (signed by the deployment's key), or why they were not trusted",
            ["result"],
            registry=self.registry,
        )
        self.refused = Counter(
            "dagcast_sidecar_refused_downloads",
            "Downloads never installed: bytes that did not match the version record, or an archive the extractor refused",
            ["reason"],
            registry=self.registry,
        )
        self.import_errors = Gauge(
            "dagcast_sidecar_import_errors", "Import errors Airflow reported for the last version parsed here",
            registry=self.registry,
        )
        self.parses = Counter("dagcast_sidecar_parses", "Parse checks by outcome: parsed, held, failed", ["result"],
                              registry=self.registry)
        self.parse_seconds = Histogram(
            "dagcast_sidecar_parse_seconds", "Time for Airflow to load a new version here (only what changed)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry,
        )
        for verdict in ("accepted", "bad_signature", "unsigned", "unknown_key", "other_deployment", "malformed"):
            self.announcements.labels(result=verdict)
        for reason in ("checksum", "extractor"):
            self.refused.labels(reason=reason)
        for result in ("published", "unchanged", "error"):
            self.syncs.labels(result=result)
        for kind in ("bundle", "delta", "delta_refused"):
            self.fetches.labels(kind=kind)


def serve(addr: str, metrics: SidecarMetrics, health: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Start the endpoints on `host:port` in a daemon thread; returns the server (its real port included).
    `health` says whether the sidecar is ready (a version is live) and why, for /healthz."""
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                ok, text = health()
                self._reply(200 if ok else 503, (text.rstrip("\n") + "\n").encode(), "text/plain")
            elif self.path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence access logs
            return

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
