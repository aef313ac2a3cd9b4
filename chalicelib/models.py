"""Pydantic models: API input and output, and the records kept in DynamoDB."""
from __future__ import annotations

import re
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chalicelib.validation import Issue, Limits

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SHA256_RE = r"^[0-9a-f]{64}$"


class DeployState(str, Enum):
    PENDING = "PENDING"
    VALIDATING = "VALIDATING"
    ACTIVE = "ACTIVE"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    SUPERSEDED = "SUPERSEDED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self not in (DeployState.PENDING, DeployState.VALIDATING)


class Mechanism(str, Enum):
    """How a deployment accepts DAG code: IMAGE (full image deploys only) or DAG_ONLY."""

    IMAGE = "IMAGE"
    DAG_ONLY = "DAG_ONLY"


class Role(str, Enum):
    VIEWER = "viewer"
    DEPLOYER = "deployer"
    SIDECAR = "sidecar"
    ADMIN = "admin"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- records ---------------------------------------------------------------------------


class Deployment(BaseModel):
    name: str
    mechanism: Mechanism = Mechanism.IMAGE
    current_version: int = 0
    last_version: int = 0
    current_deploy_id: str | None = None
    limits: Limits = Field(default_factory=Limits)
    keep_versions: int = 20
    retention_days: int = 30
    created_at: int = 0


class GitInfo(Strict):
    sha: str | None = Field(None, max_length=64)
    branch: str | None = Field(None, max_length=256)
    author: str | None = Field(None, max_length=256)
    subject: str | None = Field(None, max_length=1024)
    dirty: bool = False


class DeployDiff(BaseModel):
    """What a deploy changes against the version live when it was validated."""

    dags_added: list[str] = Field(default_factory=list)
    dags_removed: list[str] = Field(default_factory=list)
    dags_added_count: int = 0
    dags_removed_count: int = 0
    files_added: int = 0
    files_removed: int = 0
    files_changed: int = 0
    changed_paths: list[str] = Field(default_factory=list)


class Deploy(BaseModel):
    deployment: str
    deploy_id: str
    state: DeployState
    sha256: str
    size: int
    key: str
    description: str = ""
    git: GitInfo | None = None
    created_by: str = ""
    created_at: int = 0
    uploaded_at: int | None = None
    validation_ms: int | None = None
    activated_at: int | None = None
    version: int | None = None
    files: int | None = None
    bytes: int | None = None
    dag_ids: list[str] = Field(default_factory=list)
    errors: list[Issue] = Field(default_factory=list)
    errors_truncated: int = 0
    rollback_of: str | None = None
    manifest_key: str | None = None
    diff: DeployDiff | None = None
    activations: dict[str, int] = Field(default_factory=dict)
    converged_at: int | None = None
    cancelled_by: str | None = None


class Version(BaseModel):
    deployment: str
    version: int
    deploy_id: str
    sha256: str
    size: int
    key: str
    created_at: int


class Sidecar(BaseModel):
    deployment: str
    name: str
    component: str = "unknown"
    queue_url: str | None = None
    subscription_arn: str | None = None
    version: int = 0
    last_sync_at: int | None = None
    last_error: str | None = None
    last_heartbeat: int = 0
    registered_at: int = 0


class Token(BaseModel):
    token_hash: str
    name: str
    role: Role
    deployments: list[str] = Field(default_factory=lambda: ["*"])
    revoked: bool = False
    created_at: int = 0

    def allows(self, deployment: str) -> bool:
        return "*" in self.deployments or deployment in self.deployments


# --- API input -------------------------------------------------------------------------


class CreateDeployment(Strict):
    name: str = Field(pattern=NAME_RE)
    mechanism: Mechanism = Mechanism.IMAGE


class UpdateDeployment(Strict):
    mechanism: Mechanism | None = None
    limits: Limits | None = None
    keep_versions: int | None = Field(None, ge=1, le=1000)
    retention_days: int | None = Field(None, ge=1, le=3650)


class CreateDeploy(Strict):
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(gt=0)
    description: str = Field("", max_length=1024)
    git: GitInfo | None = None


class RegisterSidecar(Strict):
    name: str = Field(pattern=NAME_RE)
    component: str = Field("unknown", max_length=64)


class Heartbeat(Strict):
    version: int = Field(0, ge=0)
    last_sync_at: int | None = None
    last_error: str | None = Field(None, max_length=2048)


# --- API output ------------------------------------------------------------------------


class SidecarView(BaseModel):
    name: str
    component: str
    version: int
    live: bool
    last_heartbeat: int
    last_sync_at: int | None
    last_error: str | None


class DeployView(BaseModel):
    deploy: Deploy
    sidecars: list[SidecarView]
    live_sidecars: int
    sidecars_on_version: int
    converged: bool


class UploadForm(BaseModel):
    url: str
    fields: dict[str, str]
    expires_at: int


class CreatedDeploy(BaseModel):
    deploy: Deploy
    upload: UploadForm


class VersionView(BaseModel):
    version: Version
    download_url: str
    manifest_url: str | None = None


class Registration(BaseModel):
    sidecar: Sidecar
    queue_url: str


class JanitorReport(BaseModel):
    sidecars_removed: list[str] = Field(default_factory=list)
    deploys_expired: list[str] = Field(default_factory=list)
    bundles_pruned: list[str] = Field(default_factory=list)


class CreateToken(Strict):
    name: str = Field(pattern=NAME_RE)
    role: Role
    deployments: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=100)


class TokenView(BaseModel):
    name: str
    role: Role
    deployments: list[str]
    revoked: bool
    created_at: int


class IssuedToken(BaseModel):
    token: str = Field(description="the secret; shown once, stored only as a hash")
    info: TokenView


class Page(BaseModel):
    items: list[Any]
    next_cursor: str | None = None


DEPLOY_ID_RE = re.compile(r"^[0-9a-f]{11}-[0-9a-f]{6}$")


class IngestEvent(BaseModel):
    """One object-created notification, reduced to what ingest needs."""

    bucket: str
    key: str
    size: int

    @field_validator("key")
    @classmethod
    def _no_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("empty key")
        return v
