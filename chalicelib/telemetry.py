"""Metrics as CloudWatch embedded metric format (EMF), under one namespace.

The Lambda functions print EMF lines on stdout; CloudWatch turns them into metrics that
the dashboard and alarms in infra/resources.yaml use. Every metric carries the `service`
dimension; rejections are also counted per reason.
"""
from __future__ import annotations

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
