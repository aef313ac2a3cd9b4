"""Typed settings of the Lambda functions: the only place that reads the environment.

A plain pydantic model filled from the DAGCAST_* variables (names case-insensitive, values
converted by pydantic): pydantic-settings would do the same, for ~50 ms more of every cold start
(it imports asyncio) and two more packages in the Lambda zip.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "DAGCAST_"


class Settings(BaseModel):
    """What the API and ingest functions need to know about their AWS resources."""

    model_config = ConfigDict(extra="ignore", defer_build=True)

    table_name: str = Field(description="DynamoDB table holding deployments, deploys, versions, sidecars, tokens")
    bundles_bucket: str = Field(description="S3 bucket for uploaded bundles")
    topic_arn: str = Field(description="SNS topic that announces new versions")
    sidecar_queue_prefix: str = Field("dagcast-sidecar-", description="name prefix of per-sidecar SQS queues")
    upload_expiry_seconds: int = Field(600, ge=1, le=3600)
    download_expiry_seconds: int = Field(300, ge=30, le=3600)
    announce_url_expiry_seconds: int = Field(
        300, ge=60, le=3600,
        description="lifetime of the download URLs in announcements: how long a URL a sidecar received keeps working "
        "after its token was revoked",
    )
    signing_key_arn: str | None = Field(None, description="the KMS key (ECC_NIST_P256, SIGN_VERIFY) that signs announcements")
    signing_key_file: str | None = Field(
        None, description="a P-256 PEM private key file instead of KMS (the embedded stack; created when missing)"
    )
    compile_memory_mb: int = Field(
        1024, ge=128, le=16384, description="address space of a process compiling an uploaded bundle's Python"
    )
    compile_cpu_seconds: float = Field(
        10, gt=0, le=300, description="CPU seconds one Python file of an upload may take to compile"
    )
    validation_deadline_seconds: float = Field(
        120, gt=0, le=840, description="an upload not validated by then is rejected (validation_timeout)"
    )
    sidecar_stale_seconds: int = Field(90, ge=1, description="a sidecar silent for longer is not live")
    sidecar_expiry_seconds: int = Field(900, ge=1, description="the janitor removes sidecars silent for longer")
    pending_grace_seconds: int = Field(300, ge=0, description="extra time past the upload expiry before EXPIRED")
    stuck_after_seconds: int = Field(
        1800, ge=0,
        description="a deploy still PENDING or VALIDATING this long past its upload expiry and grace is stuck "
        "(the StuckDeploys metric): longer than ingest's five deliveries, 360 s apart, take",
    )
    activation_retries: int = Field(60, ge=1, description="bound on version-assignment retries under contention")
    wait_check_seconds: float = Field(
        0.1, gt=0, le=5,
        description="a deploy long poll re-reads the deploy this often (a projection GetItem: the CLI waiting "
        "on an upload's validation, or on a rebuilt delta, notices it within this)")
    wait_check_active_seconds: float = Field(0.05, gt=0, le=5, description="the same once the deploy is ACTIVE")
    wait_answer_seconds: float = Field(
        0.5, ge=0, le=5,
        description="while sidecars run an ACTIVE deploy one by one, a long poll answers their reports at most "
        "this often (the first one, and the one that completes the set, at once)",
    )
    wait_wakeups: bool = Field(
        False,
        description="a deploy long poll also wakes when this process wrote to the deploy record (in-process "
        "wake-ups, see chalicelib.wakeups): for one process serving every call (the embedded stack); on Lambda "
        "the writes happen in other invocations, and the long poll's reads alone notice them",
    )
    token_cache_seconds: float = Field(
        5, ge=0, le=300,
        description="a function keeps each token it read this long (0: read on every request); the bound on "
        "how long a token revoked through another function still works on this one",
    )

    event_bus_name: str | None = Field(None, description="the EventBridge bus lifecycle events go to (none: no events)")
    webhook_queue_url: str | None = Field(None, description="the SQS queue webhook deliveries go through (none: no webhooks)")
    webhook_timeout_seconds: float = Field(5, gt=0, le=30, description="one delivery attempt gets an answer within this")
    webhook_retry_base_seconds: int = Field(
        10, ge=0, le=900, description="a failed delivery is tried again after this, then twice as long each time"
    )
    webhook_allow_private_hosts: bool = Field(
        False, description="accept http:// and non-public hosts as webhook URLs (the embedded stack: receivers on loopback)"
    )
    delivery_retention_days: int = Field(14, ge=1, le=365, description="delivery attempts are kept this long")

    @model_validator(mode="after")
    def _one_signing_key(self) -> Self:
        if not self.signing_key_arn and not self.signing_key_file:
            raise ValueError("set DAGCAST_SIGNING_KEY_ARN (a KMS key) or DAGCAST_SIGNING_KEY_FILE: announcements are signed")
        return self


    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """The fields from DAGCAST_<FIELD> variables (DAGCAST_TABLE_NAME -> table_name)."""
        n = len(ENV_PREFIX)
        return cls.model_validate({k[n:].lower(): v for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_environ(os.environ)


def tracing_enabled() -> bool:
    """Whether X-Ray tracing is on, decided as Powertools' Tracer does: in a Lambda function (not
    `sam local` or `chalice local`) unless POWERTOOLS_TRACE_DISABLED is true."""
    env = os.environ
    disabled = env.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower() in ("1", "y", "yes", "t", "true", "on")
    emulated = bool(env.get("AWS_SAM_LOCAL") or env.get("AWS_CHALICE_CLI_MODE"))
    return bool(env.get("LAMBDA_TASK_ROOT")) and not disabled and not emulated
