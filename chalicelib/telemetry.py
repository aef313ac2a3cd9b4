"""Metrics as CloudWatch embedded metric format (EMF), under one namespace; X-Ray traces.

The Lambda functions print EMF lines on stdout; CloudWatch turns them into metrics that
the dashboard and alarms in infra/resources.yaml use. Every metric carries the `service`
dimension; rejections are also counted per reason.

Tracing goes through Powertools' Tracer, built at the first invocation and only where tracing
is on: building it imports aws_xray_sdk and patches boto3, about 0.1 s that a cold start where
tracing is off (tests, the embedded stack) never pays, and that `import app` never pays.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

NAMESPACE = "dagcast"
SERVICE = "dagcast"


class Telemetry:
    """The metrics dagcast emits; one method per event, so names and units live in one place."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics(namespace=NAMESPACE, service=SERVICE)

    def deploy_accepted(self, validation_s: float, bundle_bytes: int, files: int, upload_to_active_s: float | None) -> None:
        m = self.metrics
        m.add_metric(name="DeploysAccepted", unit=MetricUnit.Count, value=1)
        m.add_metric(name="ValidationSeconds", unit=MetricUnit.Seconds, value=validation_s)
        m.add_metric(name="BundleBytes", unit=MetricUnit.Bytes, value=bundle_bytes)
        m.add_metric(name="BundleFiles", unit=MetricUnit.Count, value=files)
        if upload_to_active_s is not None:
            m.add_metric(name="UploadToActiveSeconds", unit=MetricUnit.Seconds, value=upload_to_active_s)

    def deploy_rejected(self, reason: str, validation_s: float) -> None:
        self.metrics.add_metric(name="DeploysRejected", unit=MetricUnit.Count, value=1)
        self.metrics.add_metric(name="ValidationSeconds", unit=MetricUnit.Seconds, value=validation_s)
        with single_metric(
            name="DeploysRejected", unit=MetricUnit.Count, value=1, namespace=NAMESPACE,
            default_dimensions={"service": SERVICE},
        ) as by_reason:
            by_reason.add_dimension(name="reason", value=reason)

    def sidecars_converged(self, active_to_all_s: float) -> None:
        self.metrics.add_metric(name="ActiveToAllSidecarsSeconds", unit=MetricUnit.Seconds, value=active_to_all_s)

    def import_errors(self, total: int, new: int, held: bool) -> None:
        """A sidecar's parse report of a version: the import errors Airflow found, the new ones, a hold."""
        self.metrics.add_metric(name="ImportErrors", unit=MetricUnit.Count, value=total)
        self.metrics.add_metric(name="NewImportErrors", unit=MetricUnit.Count, value=new)
        if held:
            self.metrics.add_metric(name="VersionsHeld", unit=MetricUnit.Count, value=1)

    def event_failed(self, event_type: str) -> None:
        """An event that did not reach the bus, or a webhook delivery that could not be queued."""
        self.metrics.add_metric(name="EventsFailed", unit=MetricUnit.Count, value=1)

    def webhook_delivery(self, ok: bool) -> None:
        self.metrics.add_metric(name="WebhookDeliveries" if ok else "WebhookDeliveryFailures", unit=MetricUnit.Count, value=1)

    def stale_sidecars(self, count: int) -> None:
        self.metrics.add_metric(name="StaleSidecars", unit=MetricUnit.Count, value=count)

    def stuck_deploys(self, count: int) -> None:
        """Deploys still PENDING or VALIDATING long after their upload expired and ingest's retries ran out."""
        self.metrics.add_metric(name="StuckDeploys", unit=MetricUnit.Count, value=count)

    def flush(self) -> None:
        """Print what was collected (nothing when nothing was)."""
        if self.metrics.metric_set:
            self.metrics.flush_metrics()


F = TypeVar("F", bound=Callable[..., Any])


class Tracing:
    """X-Ray subsegments and patched boto3 calls, when `enabled()` says tracing is on; a no-op otherwise."""

    def __init__(self, service: str, enabled: Callable[[], bool]) -> None:
        self.service = service
        self._enabled = enabled
        self.tracer: Any = None  # Powertools' Tracer, once started
        self._decided = False

    def start(self) -> None:
        """Build the tracer (once, at the first invocation) when tracing is on."""
        if self._decided:
            return
        self._decided = True
        if self._enabled():
            from aws_lambda_powertools import Tracer

            self.tracer = Tracer(service=self.service)

    def capture_method(self, fn: F) -> F:
        """Like `Tracer.capture_method`: a subsegment per call while tracing is on."""
        traced: Callable[..., Any] | None = None

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal traced
            self.start()
            if self.tracer is None:
                return fn(*args, **kwargs)
            if traced is None:
                traced = self.tracer.capture_method(fn)
            return traced(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
