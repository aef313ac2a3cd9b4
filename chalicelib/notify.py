"""SNS fan-out of new versions and the per-sidecar SQS queues subscribed to it."""
from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.exceptions import StorageError
from chalicelib.models import Version


class Notifier:
    """Publishes version announcements. Takes a boto3 SNS client."""

    def __init__(self, sns: Any, topic_arn: str) -> None:
        self._sns = sns
        self._topic_arn = topic_arn

    def publish_version(
        self,
        version: Version,
        statement: bytes,
        signature: str,
        key_id: str,
        download_url: str | None = None,
        delta_url: str | None = None,
    ) -> None:
        """Announce a version: its signed statement (what a sidecar may trust), and presigned URLs of
        the bundle and its delta so that sidecars fetch without asking the API first. `deployment`
        and `version` outside the statement are only for routing and logs."""
        body: dict[str, Any] = {
            "deployment": version.deployment,
            "version": version.version,
            "statement": statement.decode(),
            "signature": signature,
            "key_id": key_id,
            **({"download_url": download_url} if download_url else {}),
            **({"delta_url": delta_url} if delta_url and version.delta is not None else {}),
        }
        try:
            self._sns.publish(
                TopicArn=self._topic_arn,
                Message=json.dumps(body),
                MessageAttributes={"deployment": {"DataType": "String", "StringValue": version.deployment}},
            )
        except ClientError as exc:
            raise StorageError(f"cannot announce version {version.version} of {version.deployment!r}: {exc}") from exc


class SidecarQueues:
    """Creates and removes one SQS queue per sidecar, subscribed to the topic with a deployment filter."""

    def __init__(self, sqs: Any, sns: Any, topic_arn: str, prefix: str) -> None:
        self._sqs = sqs
        self._sns = sns
        self._topic_arn = topic_arn
        self._prefix = prefix

    def queue_name(self, deployment: str, name: str) -> str:
        return f"{self._prefix}{deployment}--{name}"[:80]

    def create(self, deployment: str, name: str) -> tuple[str, str]:
        """Create (or reuse) the queue and its subscription; returns (queue_url, subscription_arn)."""
        qname = self.queue_name(deployment, name)
        try:
            url = self._sqs.create_queue(
                QueueName=qname,
                Attributes={"MessageRetentionPeriod": "3600", "ReceiveMessageWaitTimeSeconds": "20"},
            )["QueueUrl"]
            arn = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "sns.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": arn,
                        "Condition": {"ArnEquals": {"aws:SourceArn": self._topic_arn}},
                    }
                ],
            }
            self._sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
            sub = self._sns.subscribe(
                TopicArn=self._topic_arn,
                Protocol="sqs",
                Endpoint=arn,
                Attributes={
                    "RawMessageDelivery": "true",
                    "FilterPolicy": json.dumps({"deployment": [deployment]}),
                },
                ReturnSubscriptionArn=True,
            )
        except ClientError as exc:
            raise StorageError(f"cannot create the queue of sidecar {name!r}: {exc}") from exc
        return str(url), str(sub["SubscriptionArn"])

    def delete(self, queue_url: str | None, subscription_arn: str | None) -> None:
        try:
            if subscription_arn:
                self._sns.unsubscribe(SubscriptionArn=subscription_arn)
            if queue_url:
                self._sqs.delete_queue(QueueUrl=queue_url)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("AWS.SimpleQueueService.NonExistentQueue", "NotFound", "QueueDoesNotExist"):
                raise StorageError(f"cannot remove sidecar queue {queue_url}: {exc}") from exc
