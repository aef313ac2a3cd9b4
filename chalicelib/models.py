"""Pydantic models: API input and output, and the records kept in DynamoDB."""
from __future__ import annotations

import fnmatch
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator

from chalicelib.bundle import Issue, Limits, Model
from chalicelib.manifest import DeployDiff as DeployDiff  # re-exported: one of the API models

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


class DagRemoval(str, Enum):
    ALLOW = "allow"
    CONFIRM = "confirm"


class ParseMode(str, Enum):
    """When a sidecar with Airflow importable parses a new version with Airflow's own loader."""

    REPORT = "report"  # install it, then parse and report
    GATE = "gate"  # parse first; a version that adds import errors is held back (not installed) and reported


class Accept(str, Enum):
    """What a deployment takes new versions from: uploads (deploys), promotions from another deployment, or both."""

    UPLOADS = "uploads"
    PROMOTIONS = "promotions"
    BOTH = "both"


class Role(str, Enum):
    VIEWER = "viewer"
    DEPLOYER = "deployer"
    SIDECAR = "sidecar"
    ADMIN = "admin"


class Strict(Model):
    model_config = ConfigDict(extra="forbid")


# --- records ---------------------------------------------------------------------------


class Deployment(Model):
    name: str
    uid: str = Field("", description="immutable random id given at creation: part of every version's identity")
    mechanism: Mechanism = Mechanism.IMAGE
    current_version: int = 0
    last_version: int = 0
    current_deploy_id: str | None = None
    limits: Limits = Field(default_factory=Limits)
    keep_versions: int = 20
    retention_days: int = 30
    parse_mode: ParseMode = Field(
        ParseMode.REPORT, description="report: sidecars install, then parse and report; gate: they parse first and "
        "hold back a version that adds import errors (a sidecar's --parse flag can override it)"
    )
    dag_removal: DagRemoval = Field(
        DagRemoval.ALLOW,
        description="allow: a deploy that removes DAGs goes ahead (asked on a terminal, warned elsewhere); "
        "confirm: refused unless the deployer confirms (--allow-dag-removal)",
    )
    accept: Accept = Field(Accept.BOTH, description="uploads, promotions (production takes only what staging ran), or both")
    promotion_min_live_minutes: int = Field(
        0, description="a promotion into this deployment needs its source version live there this long, with no new import errors"
    )
    created_at: int = 0


class GitInfo(Strict):
    sha: str | None = Field(None, max_length=64)
    branch: str | None = Field(None, max_length=256)
    author: str | None = Field(None, max_length=256)
    subject: str | None = Field(None, max_length=1024)
    dirty: bool = False


class PromotedFrom(Model):
    """The version of another deployment whose bundle, byte for byte, a promotion deploys."""

    deployment: str
    version: int
    deploy_id: str
    sha256: str


class Deploy(Model):
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
    stored_at: int | None = None  # when S3 stored the upload (its notification's eventTime)
    uploaded_at: int | None = None  # when ingest first saw the upload
    validation_ms: int | None = None
    activated_at: int | None = None
    version: int | None = None
    files: int | None = None
    bytes: int | None = None
    dag_ids: list[str] = Field(default_factory=list)
    errors: list[Issue] = Field(default_factory=list)
    errors_truncated: int = 0
    rollback_of: str | None = None
    object_version: str | None = Field(None, description="the S3 object version ingest validated")
    manifest_key: str | None = None
    segments_key: str | None = Field(None, description="where ingest keeps the bundle's segment index, which a "
                                     "bundle rebuilt from this one copies its unchanged segments by")
    segments_sha256: str | None = Field(None, description="the sha256 of that index as ingest wrote it")
    diff: DeployDiff | None = None
    activations: dict[str, int] = Field(default_factory=dict)
    parsed: dict[str, int] = Field(default_factory=dict, description="sidecar -> when it reported parsing this version")
    notified: dict[str, int] = Field(
        default_factory=dict, description="when each sidecar learned of this version (before it downloaded it)"
    )
    converged_at: int | None = None
    cancelled_by: str | None = None
    delta: DeltaUpload | None = Field(None, description="the delta this deploy uploads instead of its bundle")
    delta_key: str | None = Field(None, description="where the delta is uploaded; ingest rebuilds the bundle at key")
    rebuilt_at: int | None = Field(None, description="when ingest rebuilt the bundle from the base and the delta")
    delta_object_version: str | None = Field(None, description="the object version of the uploaded delta ingest read")
    promoted_from: PromotedFrom | None = Field(None, description="the version of another deployment this deploy promotes")

    def stages(self) -> DeployStages:
        """Where this deploy's time went, from its own timestamps (None where a stage has not happened)."""

        def span(start: int | None, end: int | None) -> float | None:
            return None if start is None or end is None else max(0, end - start) / 1000

        sidecars = [
            SidecarStages(
                name=name,
                notified_s=span(self.activated_at, self.notified.get(name)),
                sync_s=span(self.notified.get(name), live_at),
                live_s=span(self.activated_at, live_at),
                parse_report_s=span(live_at, self.parsed.get(name)),
            )
            for name, live_at in sorted(self.activations.items())
        ]
        return DeployStages(
            upload_s=span(self.created_at or None, self.stored_at),
            upload_to_ingest_s=span(self.stored_at, self.uploaded_at),
            validation_s=None if self.validation_ms is None else self.validation_ms / 1000,
            ingest_to_active_s=span(self.uploaded_at, self.activated_at),
            active_to_all_live_s=span(self.activated_at, self.converged_at),
            created_to_all_live_s=span(self.created_at or None, self.converged_at),
            sidecars=sidecars,
        )


class SidecarStages(Model):
    name: str
    notified_s: float | None = Field(description="ACTIVE -> the sidecar received the announcement (or reconciled)")
    sync_s: float | None = Field(description="notified -> live: download, verify, extract, swap the link")
    live_s: float | None = Field(description="ACTIVE -> live on this sidecar")
    parse_report_s: float | None = Field(None, description="live -> Airflow's parse of it reported by this sidecar")


class DeployStages(Model):
    """A deploy's stage durations in seconds, computed from the timestamps on its record."""

    upload_s: float | None = Field(description="deploy created (upload presigned) -> S3 stored the upload")
    upload_to_ingest_s: float | None = Field(description="S3 stored the upload -> ingest started")
    validation_s: float | None = Field(description="validating the bundle, within ingest")
    ingest_to_active_s: float | None = Field(description="ingest started -> ACTIVE (validation, manifest, transaction)")
    active_to_all_live_s: float | None = Field(description="ACTIVE -> the last live sidecar ran it")
    created_to_all_live_s: float | None = Field(description="deploy created -> the last live sidecar ran it")
    sidecars: list[SidecarStages] = Field(default_factory=list)


class Delta(Model):
    """A version's changes against the version live before it, as a small archive (see chalicelib.bundle.delta)."""

    base_version: int
    base_sha256: str | None = Field(None, description="the bundle sha256 of the base version")
    key: str
    sha256: str
    size: int
    object_version: str | None = Field(None, description="the S3 object version written (the bucket is versioned)")
    files: int = Field(description="files in the archive: the changed and added ones")
    removed: list[str] = Field(default_factory=list, description="files of the base version this one no longer has")
    files_sha256: str = Field(description="digest of this version's file list that applying the delta must give")


class Version(Model):
    """A published version. Its identity is (deployment_id, version, sha256); it never changes."""

    deployment: str
    version: int
    deploy_id: str
    sha256: str
    size: int
    key: str
    created_at: int
    deployment_id: str = ""
    object_version: str | None = Field(None, description="the S3 object version that was validated: the one served")
    limits: Limits = Field(default_factory=Limits, description="the limits it was validated with: sidecars extract with these")
    delta: Delta | None = None
    parse_mode: ParseMode = Field(ParseMode.REPORT, description="the deployment's parse_mode when it was published")
    validator: str | None = Field(None, description=(
        "the validator that found the bundle valid (CompileCache.TAG): a delta deploy built on this version "
        "reuses its verdicts on the files the delta leaves unchanged only when it is the same one"))


class Sidecar(Model):
    deployment: str
    name: str
    component: str = "unknown"
    queue_url: str | None = None
    subscription_arn: str | None = None
    version: int = 0
    sha256: str | None = None
    deployment_id: str | None = None
    secret_hash: str = ""
    registered_by: str = ""
    last_sync_at: int | None = None
    last_notified_at: int | None = None
    last_error: str | None = None
    last_heartbeat: int = 0
    registered_at: int = 0
    failures: int = 0
    parser: str | None = None


class Token(Model):
    token_hash: str
    name: str
    role: Role
    deployments: list[str] = Field(default_factory=lambda: ["*"])
    sidecar_names: list[str] | None = None
    revoked: bool = False
    created_at: int = 0

    def allows(self, deployment: str) -> bool:
        return "*" in self.deployments or deployment in self.deployments

    def allows_sidecar(self, name: str) -> bool:
        """Whether this token may register a sidecar of this name (patterns like `worker-*`; None: any)."""
        return self.sidecar_names is None or any(fnmatch.fnmatchcase(name, p) for p in self.sidecar_names)


# --- API input -------------------------------------------------------------------------


class CreateDeployment(Strict):
    name: str = Field(pattern=NAME_RE)
    mechanism: Mechanism = Mechanism.IMAGE


class UpdateDeployment(Strict):
    mechanism: Mechanism | None = None
    limits: Limits | None = None
    keep_versions: int | None = Field(None, ge=1, le=1000)
    retention_days: int | None = Field(None, ge=1, le=3650)
    dag_removal: DagRemoval | None = None
    parse_mode: ParseMode | None = None
    accept: Accept | None = None
    promotion_min_live_minutes: int | None = Field(None, ge=0, le=7 * 24 * 60)


class DeltaUpload(Strict):
    """What a deploy that uploads a delta (not its bundle) announces: the live version the delta was made
    against, the delta archive's own size and sha256, the files the base has and this version does not,
    and the digest of this version's file list. The deploy's sha256 and size stay the full bundle's."""

    base_version: int = Field(ge=1)
    base_sha256: str = Field(pattern=SHA256_RE)
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(gt=0)
    files_sha256: str = Field(pattern=SHA256_RE)
    compresslevel: int = Field(1, ge=1, le=9, description="the gzip level the bundle was written with")
    removed: list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=10_000)


class CreateDeploy(Strict):
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(gt=0)
    description: str = Field("", max_length=1024)
    git: GitInfo | None = None
    delta: DeltaUpload | None = Field(None, description="upload a delta against the live version instead of the bundle")


class Promote(Strict):
    """Promote a version of another deployment (its live one unless a version or deploy is named)."""

    source: str = Field(pattern=NAME_RE, description="the deployment to promote from")
    version: int | None = Field(None, ge=1)
    deploy_id: str | None = Field(None, pattern=r"^[0-9a-f]{11}-[0-9a-f]{6}$")
    description: str = Field("", max_length=1024)


class CreateWebhook(Strict):
    url: str = Field(min_length=8, max_length=2048, description="http(s) URL that receives the events, POSTed as JSON")
    events: list[str] = Field(min_length=1, max_length=20, description="event types, e.g. deploy.live, deploy.rejected; * for all")
    description: str = Field("", max_length=256)


class Webhook(Model):
    deployment: str
    webhook_id: str
    url: str
    events: list[str]
    description: str = ""
    created_by: str = ""
    created_at: int = 0


class WebhookCreated(Model):
    webhook: Webhook
    secret: str = Field(description="the HMAC-SHA256 key of the signatures: shown in this response only")


class Delivery(Model):
    """One attempt to deliver an event to a webhook."""

    deployment: str
    webhook_id: str
    event_id: str
    event_type: str
    attempt: int
    at: int
    status: int | None = Field(None, description="the receiver's HTTP status; None when no answer came")
    ok: bool
    error: str | None = None
    duration_ms: int = 0


class RegisterSidecar(Strict):
    name: str = Field(pattern=NAME_RE)
    component: str = Field("unknown", max_length=64)


class Heartbeat(Strict):
    version: int = Field(0, ge=0)
    sha256: str | None = Field(None, pattern=SHA256_RE, description="the bundle sha256 of the live version")
    deployment_id: str | None = Field(None, max_length=64, description="the deployment id the live version belongs to")
    last_sync_at: int | None = Field(None, description="epoch ms when the live version went live here")
    last_notified_at: int | None = Field(
        None, description="epoch ms when this sidecar learned of its live version: the announcement arrived, "
        "or the reconcile that found it started"
    )
    last_error: str | None = Field(None, max_length=2048)
    failures: int = Field(0, ge=0, le=1_000_000, description="syncs failed in a row (0 after a good one)")
    parser: str | None = Field(None, max_length=64, description="the Airflow that parses new versions here "
                               "(\"airflow 3.3.2\"), or None when this sidecar has none")


# --- parse reports: what Airflow made of a version on one sidecar -----------------------

MAX_REPORTED = 50  # import errors, duplicates and new-error paths a report lists (the rest are counted)
_Path = Annotated[str, StringConstraints(max_length=1024)]
_Frame = Annotated[str, StringConstraints(max_length=400)]
_DagId = Annotated[str, StringConstraints(max_length=250)]


class ImportFailure(Strict):
    """One file Airflow could not load: the exception, where, and the traceback's last frames."""

    path: _Path
    line: int | None = Field(None, ge=0)
    type: str = Field(max_length=200)
    message: str = Field(max_length=2000)
    frames: list[_Frame] = Field(default_factory=list, max_length=5)


class DuplicateDag(Strict):
    dag_id: _DagId
    paths: list[_Path] = Field(max_length=MAX_REPORTED)


class ParseReport(Strict):
    """A sidecar's report of parsing one version (sent with its own secret), bounded in size:
    lists hold the first MAX_REPORTED entries and the *_total fields count them all."""

    version: int = Field(ge=1)
    sha256: str = Field(pattern=SHA256_RE)
    status: Literal["parsed", "unavailable", "failed"]
    message: str | None = Field(None, max_length=2000, description="unavailable or failed: why")
    mode: ParseMode = ParseMode.REPORT
    held: bool = Field(False, description="gate: the version adds import errors and was not installed here")
    parser: str | None = Field(None, max_length=64)
    files: int = Field(0, ge=0, description="Python files Airflow parsed")
    dags: int = Field(0, ge=0, description="DAGs loaded")
    import_errors: list[ImportFailure] = Field(default_factory=list, max_length=MAX_REPORTED)
    import_errors_total: int = Field(0, ge=0)
    new_import_errors: list[_Path] = Field(default_factory=list, max_length=MAX_REPORTED,
                                           description="files whose import error the version before did not have here")
    new_import_errors_total: int = Field(0, ge=0)
    duplicates: list[DuplicateDag] = Field(default_factory=list, max_length=MAX_REPORTED)
    dags_added: list[_DagId] = Field(default_factory=list, max_length=MAX_REPORTED)
    dags_removed: list[_DagId] = Field(default_factory=list, max_length=MAX_REPORTED)
    parsed_files: int = Field(0, ge=0, description="files parsed this time; the others' results were reused")
    parse_ms: int = Field(0, ge=0, description="how long the parse took, in milliseconds")


class ParseRecord(ParseReport):
    """A report as stored: whose, and when."""

    model_config = ConfigDict(extra="ignore")
    deployment: str
    deploy_id: str
    sidecar: str
    component: str = "unknown"
    reported_at: int = 0


class ParseErrorView(Model):
    path: str
    line: int | None
    type: str
    message: str
    frames: list[str] = Field(default_factory=list)
    sidecars: list[str] = Field(description="the sidecars that reported this error")
    new: bool = Field(description="some sidecar did not have it on the version it ran before")


class DeployParse(Model):
    """What Airflow made of a deploy's version, over the sidecars that reported it."""

    status: Literal["parsed", "pending", "unavailable", "none"] = Field(
        description="parsed: every live sidecar with a parser reported; pending: some have not yet; unavailable: "
        "no live sidecar can parse (Airflow not importable there); none: nothing reported yet"
    )
    reported: list[str] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list, description="live sidecars with a parser that have not reported")
    unavailable: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict, description="sidecar -> why its parser failed")
    held: list[str] = Field(default_factory=list, description="gate: sidecars that held the version back")
    files: int = 0
    dags: int = 0
    import_errors: list[ParseErrorView] = Field(default_factory=list)
    import_errors_total: int = 0
    new_import_errors: int = Field(0, description="files with an import error new on some sidecar")
    duplicates: list[DuplicateDag] = Field(default_factory=list)
    dags_added: list[str] = Field(default_factory=list)
    dags_removed: list[str] = Field(default_factory=list)


# --- API output ------------------------------------------------------------------------


class SidecarView(Model):
    name: str
    component: str
    version: int
    sha256: str | None = None
    on_current: bool = Field(False, description="it reports the deployment's current version: number, sha256 and id")
    on_deploy: bool | None = Field(None, description="in a deploy's view: it reports exactly that deploy's version")
    live: bool = Field(description="it heartbeat within DAGCAST_SIDECAR_STALE_SECONDS; a sidecar that did not is stale")
    last_seen_s: float = Field(0, description="seconds since its last heartbeat, by the API's clock")
    last_heartbeat: int
    last_sync_at: int | None
    last_error: str | None
    last_notified_at: int | None = None
    failures: int = Field(0, description="syncs failed in a row, as the sidecar reported them")
    parser: str | None = Field(None, description="the Airflow that parses new versions there, if any")


class DeployView(Model):
    deploy: Deploy
    sidecars: list[SidecarView]
    live_sidecars: int
    sidecars_on_version: int
    converged: bool
    stages: DeployStages
    parse: DeployParse = Field(default_factory=lambda: DeployParse(status="none"))


class UploadForm(Model):
    url: str
    fields: dict[str, str]
    expires_at: int


class CreatedDeploy(Model):
    deploy: Deploy
    upload: UploadForm


class VersionView(Model):
    version: Version
    download_url: str | None = Field(None, description="only for tokens that may download bundles (sidecar, admin)")
    manifest_url: str | None = None
    delta_url: str | None = None


class SigningKey(Model):
    key_id: str
    algorithm: str
    public_key: str = Field(description="PEM")


class Registration(Model):
    sidecar: SidecarView
    queue_url: str
    secret: str = Field(description="this sidecar's own secret, shown once: heartbeats and deregistration need it")
    deployment_id: str
    signing_keys: list[SigningKey] = Field(description="the keys that sign version announcements")


class JanitorReport(Model):
    sidecars_removed: list[str] = Field(default_factory=list)
    deploys_expired: list[str] = Field(default_factory=list)
    bundles_pruned: list[str] = Field(default_factory=list)
    late_uploads_deleted: list[str] = Field(default_factory=list)


SIDECAR_PATTERN_RE = r"^[a-z0-9*]([a-z0-9*-]{0,61}[a-z0-9*])?$"


class CreateToken(Strict):
    name: str = Field(pattern=NAME_RE)
    role: Role
    deployments: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=100)
    sidecar_names: list[Annotated[str, Field(pattern=SIDECAR_PATTERN_RE)]] | None = Field(
        None, min_length=1, max_length=100,
        description="sidecar tokens only: the names (or patterns such as `worker-*`) it may register",
    )


class TokenView(Model):
    name: str
    role: Role
    deployments: list[str]
    sidecar_names: list[str] | None = None
    revoked: bool
    created_at: int


class WhoAmI(Model):
    """The token a request was made with: its name (what deploys record as created_by), role and scope."""

    name: str
    role: Role
    deployments: list[str]
    permissions: list[str] = Field(description="what the role may do: read, deploy, sync, admin")


class FileChange(Model):
    path: str
    size: int = Field(description="bytes in this version (in the base version, for a removed file)")
    base_size: int | None = Field(None, description="bytes in the base version, for a changed file")


class DeployFiles(Model):
    """What a version changed, file by file, against the version live before it (version - 1)."""

    deploy_id: str
    version: int
    base_version: int | None = Field(description="None for a deployment's first version: every file is added")
    base_deploy_id: str | None = None
    added: list[FileChange]
    removed: list[FileChange]
    changed: list[FileChange]
    added_total: int
    removed_total: int
    changed_total: int
    truncated: bool = Field(description="a list is cut at max_listed; the totals are exact")
    max_listed: int
    diff_max_bytes: int = Field(description="files larger than this (either side) get no text diff")


class FileDiff(Model):
    """A unified text diff of one file between a version and the version before it."""

    path: str
    version: int
    base_version: int | None
    status: Literal["added", "removed", "changed", "unchanged"]
    size: int | None
    base_size: int | None
    diff: str
    truncated: bool = Field(description="the diff was cut at its line bound")


class IssuedToken(Model):
    token: str = Field(description="the secret; shown once, stored only as a hash")
    info: TokenView


class Page(Model):
    items: list[Any]
    next_cursor: str | None = None


DEPLOY_ID_RE = re.compile(r"^[0-9a-f]{11}-[0-9a-f]{6}$")


class IngestEvent(Model):
    """One object-created notification, reduced to what ingest needs."""

    bucket: str
    key: str
    size: int
    stored_at: int | None = Field(None, description="epoch ms of the notification's eventTime: when S3 stored it")
    version_id: str | None = Field(None, description="the S3 object version this notification is about")

    @field_validator("key")
    @classmethod
    def _no_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("empty key")
        return v
