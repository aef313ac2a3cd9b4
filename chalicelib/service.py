"""The control plane's domain logic: deployments, deploys, versions, sidecars, tokens.

Handlers call one method here with plain values; this layer decides, the store persists.
"""
from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chalicelib import filediff
from chalicelib.auth import ROLE_PERMISSIONS, Permission, hash_token, new_token
from chalicelib.bundle import FileEntry
from chalicelib.events import EventSink, EventType, check_event_types, deploy_detail
from chalicelib.exceptions import (
    BaseMoved,
    BundleTooLarge,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PromotionRefused,
    PromotionsOnly,
    StorageError,
)
from chalicelib.models import (
    Accept,
    CreatedDeploy,
    CreateDeploy,
    CreateDeployment,
    CreateToken,
    CreateWebhook,
    Delivery,
    DeltaUpload,
    Deploy,
    DeployFiles,
    Deployment,
    DeployParse,
    DeployState,
    DeployView,
    DuplicateDag,
    FileDiff,
    Heartbeat,
    IssuedToken,
    JanitorReport,
    Mechanism,
    Page,
    ParseErrorView,
    ParseRecord,
    ParseReport,
    Promote,
    PromotedFrom,
    RegisterSidecar,
    Registration,
    Role,
    Sidecar,
    SidecarView,
    SigningKey,
    Token,
    TokenView,
    UpdateDeployment,
    UploadForm,
    Version,
    VersionView,
    Webhook,
    WebhookCreated,
    WhoAmI,
)
from chalicelib.notify import SidecarQueues
from chalicelib.publish import Publisher, new_uid
from chalicelib.settings import Settings
from chalicelib.signing import ALGORITHM, Signer, SigningError
from chalicelib.storage import BundleStorage, bundle_key, uploaded_delta_key
from chalicelib.store import Store
from chalicelib.telemetry import Telemetry
from chalicelib.wakeups import DeployWakeups, Sleeper, Waiter

MAX_WEBHOOKS = 20


def now_ms() -> int:
    return int(time.time() * 1000)


def _require_dag_only(dep: Deployment) -> None:
    """New versions (uploads and promotions alike) only once an admin switched the mechanism to DAG_ONLY."""
    if dep.mechanism is not Mechanism.DAG_ONLY:
        raise Conflict(
            f"DAG-only deploys are disabled for deployment {dep.name!r} (mechanism {dep.mechanism.value}); "
            f"an admin can enable them with `dagcast deployment update --deployment {dep.name} --dag-deploy enabled`"
        )


def new_deploy_id(clock_ms: int) -> str:
    """Time-ordered id: 11 hex digits of milliseconds, then 6 random hex digits."""
    return f"{clock_ms:011x}-{secrets.token_hex(3)}"


class ControlPlane:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        bundles: BundleStorage,
        queues: SidecarQueues,
        publisher: Publisher,
        clock: Callable[[], int] = now_ms,
        telemetry: Telemetry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        forget_token: Callable[[str], None] | None = None,
        signer: Signer | None = None,
        wakeups: DeployWakeups | None = None,
    ) -> None:
        self._wakeups = wakeups  # the store signals it after writes to a deploy record (one process serving all calls)
        # the independent reads of a view (the deploy, its sidecars, its parse reports) and of a report,
        # made at the same time: one round trip to DynamoDB instead of three (threads start on first use).
        # Views have threads of their own: the view a `--wait` is answered with never queues behind the
        # reads of a burst of heartbeats (50 sidecars reporting a version at once queued 100).
        self._reads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dagcast-reads")
        self._view_reads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dagcast-view")
        self._checks: dict[tuple[str, str], bool] = {}  # convergence checks in flight -> run again when done
        self._checks_lock = threading.Lock()
        self._signer = signer
        self._telemetry = telemetry or Telemetry()
        self._forget_token = forget_token  # drops a revoked token from this process's authenticator cache
        self._sleep = sleep
        self._settings = settings
        self._store = store
        self._bundles = bundles
        self._queues = queues
        self._publisher = publisher
        self._clock = clock

    @property
    def _events(self) -> EventSink:
        return self._publisher.events

    # --- deployments -----------------------------------------------------------------

    def create_deployment(self, req: CreateDeployment) -> Deployment:
        dep = Deployment(name=req.name, uid=new_uid(), mechanism=req.mechanism, created_at=self._clock())
        self._store.create_deployment(dep)
        return dep

    def get_deployment(self, name: str) -> Deployment:
        return self._store.get_deployment(name)

    def list_deployments(self, visible: Callable[[str], bool]) -> list[Deployment]:
        return [d for d in self._store.list_deployments() if visible(d.name)]

    def update_deployment(self, name: str, req: UpdateDeployment) -> Deployment:
        changes = req.model_dump(mode="json", exclude_none=True)
        # Switching the mechanism only changes what new deploys are accepted; the current
        # version and its pointer stay as they are, so sidecars keep serving their DAGs.
        return self._store.update_deployment(name, changes)

    # --- deploys ---------------------------------------------------------------------

    def create_deploy(self, deployment: str, req: CreateDeploy, created_by: str) -> CreatedDeploy:
        dep = self._store.get_deployment(deployment)
        _require_dag_only(dep)
        if dep.accept is Accept.PROMOTIONS:
            raise PromotionsOnly(
                f"deployment {deployment!r} accepts only promoted versions (accept: promotions); promote one that "
                f"another deployment ran: `dagcast promote --from <staging> --to {deployment}`"
            )
        if req.size > dep.limits.max_bundle_bytes:
            raise BundleTooLarge(
                f"the bundle is {_mib(req.size)} compressed, over the deployment's limit of {_mib(dep.limits.max_bundle_bytes)}"
            )
        if req.delta is not None:
            self._check_delta_base(dep, req.delta)
        clock = self._clock()
        deploy_id = new_deploy_id(clock)
        key = bundle_key(deployment, deploy_id)
        upload_key = uploaded_delta_key(deployment, deploy_id) if req.delta else key
        deploy = Deploy(
            deployment=deployment,
            deploy_id=deploy_id,
            state=DeployState.PENDING,
            sha256=req.sha256,
            size=req.size,
            key=key,
            description=req.description,
            git=req.git,
            created_by=created_by,
            created_at=clock,
            activations={},
            parsed={},
            delta=req.delta,
            delta_key=upload_key if req.delta else None,
        )
        expires = self._settings.upload_expiry_seconds
        url, fields = self._presign(deploy, expires)
        self._store.create_deploy(deploy)
        self._events.emit(EventType.CREATED, deploy_detail(EventType.CREATED, deploy, size=deploy.size,
                                                           upload="delta" if req.delta else "bundle"))
        return CreatedDeploy(deploy=deploy, upload=UploadForm(url=url, fields=fields, expires_at=clock + expires * 1000))

    def get_deploy(self, deployment: str, deploy_id: str, wait_seconds: float = 0, dag_ids: bool = True,
                   until_settled: bool = False) -> DeployView:
        """The deploy with its sidecars. With `wait_seconds`, a long poll: while the deploy is still on
        its way (PENDING, VALIDATING, or ACTIVE with live sidecars not on it yet, or parse reports
        due), answer when its state, its sidecars' activations, its parse reports or its convergence
        change, or when the time is up.

        Each answer is a full view (the whole deploy record and every sidecar), so while sidecars run
        an ACTIVE deploy one by one, their reports are gathered: the first one, and the one after which
        every live sidecar has run it, are answered at once; the others once the poll has lasted
        `wait_answer_seconds`. Parse reports likewise: the one that completes the set at once, those
        before it gathered.

        The poll re-reads the deploy's progress fields (a projection GetItem) every
        `wait_check_*_seconds`; with in-process wake-ups (see chalicelib.wakeups) the pause between
        two reads also ends as soon as this process wrote to the deploy record.

        `dag_ids` False: the view's deploy is read without its DAG ids (its `dag_ids` is then empty;
        the API leaves the field out), for a caller that waits on the deploy's progress.

        `until_settled`: a long poll for a caller that waits for the end (`dagcast deploy --wait`): it
        is answered when the deploy's state changes or it is settled (see _settled: every live sidecar
        on it, every parse report in), or when the time is up; sidecars' activations, convergence
        noted and parse reports that leave it unsettled are not answered (each answer is a full view,
        and the caller's next poll reads another)."""
        if wait_seconds <= 0:
            return self._deploy_view(deployment, deploy_id, dag_ids=dag_ids)
        with self._watch(deployment, deploy_id) as waiter:  # from before the first read: no change slips by
            view = self._deploy_view(deployment, deploy_id, dag_ids=dag_ids)
            if _settled(view):
                return view
            return self._long_poll(deployment, deploy_id, view, wait_seconds, waiter, dag_ids, until_settled)

    def _watch(self, deployment: str, deploy_id: str) -> contextlib.AbstractContextManager[Waiter]:
        if self._wakeups is not None and self._settings.wait_wakeups:
            return self._wakeups.watch(deployment, deploy_id)
        return contextlib.nullcontext(Sleeper(self._sleep))

    def _long_poll(self, deployment: str, deploy_id: str, view: DeployView, wait_seconds: float,
                   waiter: Waiter, dag_ids: bool = True, until_settled: bool = False) -> DeployView:
        started = self._clock()
        deadline = started + wait_seconds * 1000
        gather_until = started + self._settings.wait_answer_seconds * 1000
        seen = _progress(view.deploy.model_dump(mode="json", include=set(PROGRESS_FIELDS)))
        active = view.deploy.state is DeployState.ACTIVE
        waiting_on, parsers = _awaited(view)
        gathered = False
        while self._clock() < deadline:
            # Before ACTIVE nothing waits on this answer but the CLI's next message; once ACTIVE the
            # last sidecar's report ends the wait, so look more often.
            waiter.wait(self._settings.wait_check_active_seconds if active else self._settings.wait_check_seconds)
            now = _progress(self._store.get_deploy_fields(deployment, deploy_id, list(PROGRESS_FIELDS)))
            if now == seen:
                if gathered and self._clock() >= gather_until:
                    break
                continue
            state, activations, converged_at, parsed = now
            if state != seen[0]:
                return self._deploy_view(deployment, deploy_id, parses=bool(parsed), dag_ids=dag_ids)
            # the reports that may complete the set (all the awaited activations and parse reports are in)
            complete = waiting_on <= set(activations) and parsers <= set(parsed)
            if until_settled:
                if complete:
                    view = self._deploy_view(deployment, deploy_id, parses=bool(parsed), dag_ids=dag_ids)
                    if _settled(view):
                        return view
                    waiting_on, parsers = _awaited(view)  # sidecars came or went meanwhile: wait on those
                    now = _progress(view.deploy.model_dump(mode="json", include=set(PROGRESS_FIELDS)))
                seen = now
                continue
            if (converged_at != seen[2]
                    or (activations != seen[1] and (not seen[1] or waiting_on <= set(activations)))):
                return self._deploy_view(deployment, deploy_id, parses=bool(parsed), dag_ids=dag_ids)
            if parsed != seen[3] and parsers <= set(parsed):
                # the parse report that completes the set: the answer `--wait` ends on
                return self._deploy_view(deployment, deploy_id, parses=True, dag_ids=dag_ids)
            gathered, seen = True, now
            if self._clock() >= gather_until:
                break
        return self._deploy_view(deployment, deploy_id, parses=bool(seen[3]), dag_ids=dag_ids)

    def _deploy_view(self, deployment: str, deploy_id: str, partial_convergence: bool = True,
                     parses: bool | None = None, dag_ids: bool = True) -> DeployView:
        """`parses`: whether the deploy has parse reports, when the caller knows (they are then read
        with the rest); None: read after the deploy record, if it names any. `dag_ids` False: the
        deploy without its DAG ids."""
        reads = self._view_reads
        later_deploy = reads.submit(self._store.get_deploy, deployment, deploy_id, dag_ids)
        later_sidecars = reads.submit(self._store.list_sidecars, deployment)
        later_parses = reads.submit(self._store.list_parses, deployment, deploy_id) if parses else None
        dep = self._store.get_deployment(deployment)
        uid = dep.uid or self._store.ensure_uid(deployment, new_uid())
        deploy = later_deploy.result()
        sidecars = sorted(later_sidecars.result(), key=lambda s: s.name)
        views = self._views(dep, uid, sidecars)
        for view, s in zip(views, sidecars, strict=True):
            # "on it" means exactly this version: its number, its bundle's sha256 and the deployment's id,
            # as the sidecar itself reported them (see heartbeat)
            view.on_deploy = _runs(s, uid, deploy.version, deploy.sha256)
        live = [s for s in views if s.live]
        on_version = [s for s in live if s.on_deploy]
        converged = deploy.state is DeployState.ACTIVE and len(on_version) == len(live)
        reports = []
        if deploy.parsed:
            reports = later_parses.result() if later_parses else self._store.list_parses(deployment, deploy_id)
        if converged and live and deploy.converged_at is None:
            at = self._note_convergence(deploy, live, partial_convergence)
            if at is not None:
                deploy = deploy.model_copy(update={"converged_at": at})
        return DeployView(
            deploy=deploy,
            sidecars=views,
            live_sidecars=len(live),
            sidecars_on_version=len(on_version),
            converged=converged,
            stages=deploy.stages(),
            parse=_parse_view(deploy, views, reports),
        )

    def list_deploys(self, deployment: str, limit: int, cursor: str | None) -> Page:
        self._store.get_deployment(deployment)
        deploys, next_cursor = self._store.list_deploys(deployment, limit, cursor)
        items = [{**d.model_dump(mode="json"), "stages": d.stages().model_dump(mode="json")} for d in deploys]
        return Page(items=items, next_cursor=next_cursor)

    def renew_upload(self, deployment: str, deploy_id: str) -> UploadForm:
        """A fresh presigned POST for a PENDING deploy whose form expired (same key, size and checksum)."""
        deploy = self._store.get_deploy(deployment, deploy_id)
        if deploy.state is not DeployState.PENDING:
            raise Conflict(f"deploy {deploy_id} is {deploy.state.value}; only a PENDING deploy takes an upload")
        expires = self._settings.upload_expiry_seconds
        url, fields = self._presign(deploy, expires)
        return UploadForm(url=url, fields=fields, expires_at=self._clock() + expires * 1000)

    def _presign(self, deploy: Deploy, expires: int) -> tuple[str, dict[str, str]]:
        """The upload form of a deploy: bound to its bundle's key, size and sha256, or to its delta's."""
        if deploy.delta is not None and deploy.delta_key is not None:
            return self._bundles.presigned_upload(deploy.delta_key, deploy.delta.size, deploy.delta.sha256, expires)
        return self._bundles.presigned_upload(deploy.key, deploy.size, deploy.sha256, expires)

    def _check_delta_base(self, dep: Deployment, delta: DeltaUpload) -> None:
        """A delta is accepted against the live version only (BaseMoved otherwise: the CLI makes it again)."""
        if delta.size > dep.limits.max_bundle_bytes:
            raise BundleTooLarge(f"the delta is {_mib(delta.size)} compressed, over the deployment's limit of "
                                 f"{_mib(dep.limits.max_bundle_bytes)}")
        if not dep.current_version or dep.current_version != delta.base_version:
            live = f"v{dep.current_version} is live" if dep.current_version else "no version is live"
            raise BaseMoved(f"the delta was made against v{delta.base_version}, but {live}; make it again "
                            "against the live version, or upload the whole bundle")
        live_sha = self._store.get_version(dep.name, dep.current_version).sha256
        if live_sha != delta.base_sha256:
            raise BaseMoved(f"the delta was made against a bundle with sha256 {delta.base_sha256}, but the live "
                            f"v{dep.current_version} is {live_sha}")

    def cancel_deploy(self, deployment: str, deploy_id: str, by: str) -> Deploy:
        """PENDING or VALIDATING -> CANCELLED; the deploy never goes live, and its upload is deleted
        (now, and by ingest or the janitor if it arrives later)."""
        deploy = self._store.cancel_deploy(deployment, deploy_id, by)
        if _owns_key(deploy):  # a rollback serves an earlier deploy's bundle: that one is not its to delete
            self._bundles.delete(deploy.key)
        if deploy.delta_key:
            self._bundles.delete(deploy.delta_key)
        return deploy

    def rollback(self, deployment: str, deploy_id: str, created_by: str) -> Deploy:
        """A new version that serves an earlier deploy's bundle again (revert semantics, no upload)."""
        target = self._store.get_deploy(deployment, deploy_id)
        if target.version is None or target.state not in (DeployState.ACTIVE, DeployState.SUPERSEDED):
            raise Conflict(f"deploy {deploy_id} is {target.state.value}; only a deploy that went live can be rolled back to")
        if not self._bundles.exists(target.key):  # a version past retention: no sidecar could install it again
            raise Conflict(
                f"the bundle of deploy {deploy_id} (v{target.version}) was removed by the retention policy "
                "(keep_versions, retention_days); it cannot be rolled back to: deploy its DAGs again instead"
            )
        clock = self._clock()
        deploy = Deploy(
            deployment=deployment,
            deploy_id=new_deploy_id(clock),
            state=DeployState.VALIDATING,
            sha256=target.sha256,
            size=target.size,
            key=target.key,
            description=f"rollback to v{target.version}" + (f": {target.description}" if target.description else ""),
            git=target.git,
            created_by=created_by,
            created_at=clock,
            uploaded_at=clock,
            rollback_of=target.deploy_id,
            activations={},
            parsed={},
        )
        served = self._store.get_version(deployment, target.version)
        self._store.create_rollback(deploy)
        manifest = self._publisher.load_manifest(target.manifest_key) or []
        fields = {
            "files": target.files,
            "bytes": target.bytes,
            "dag_ids": target.dag_ids,
            "validation_ms": 0,
            "manifest_key": target.manifest_key,
            "segments_key": target.segments_key,  # the same bundle: a delta against the rollback copies from it
            "segments_sha256": target.segments_sha256,
            "diff": self._publisher.diff_against_live(deployment, manifest).model_dump(),
        }
        self._publisher.publish(deploy, fields, served.limits, served.object_version, validator=served.validator)
        return self._store.get_deploy(deployment, deploy.deploy_id)

    # --- promotion -------------------------------------------------------------------

    def promote(self, target: str, req: Promote, caller: Token) -> Deploy:
        """A deploy in `target` of exactly the bundle a version of `req.source` ran: the object is copied
        inside S3 (nothing from the client), and ingest validates it against the target's limits and
        checks it is byte for byte the source's (its sha256). The caller deploys to `target` (checked by
        the route) and must be able to read the source."""
        if req.source == target:
            raise InvalidRequest("a deployment cannot be promoted to itself")
        if not caller.allows(req.source):
            raise Forbidden(f"token {caller.name!r} is not scoped to deployment {req.source!r}, the promotion's source")
        dep = self._store.get_deployment(target)
        _require_dag_only(dep)
        if dep.accept is Accept.UPLOADS:
            raise PromotionRefused(f"deployment {target!r} accepts only uploads (accept: uploads); an admin can allow "
                                   f"promotions with `dagcast deployment update --deployment {target} --accept both`")
        source_dep = self._store.get_deployment(req.source)
        source = self._promoted_deploy(source_dep, req)
        assert source.version is not None
        record = self._store.get_version(req.source, source.version)
        if record.size > dep.limits.max_bundle_bytes:
            raise BundleTooLarge(f"v{record.version} of {req.source!r} is {_mib(record.size)} compressed, over "
                                 f"{target!r}'s limit of {_mib(dep.limits.max_bundle_bytes)}")
        self._check_promotable(dep, source_dep, source)
        if not self._bundles.exists(record.key):
            raise Conflict(f"the bundle of {req.source!r} v{record.version} was removed by the retention policy; "
                           "it cannot be promoted")
        clock = self._clock()
        deploy_id = new_deploy_id(clock)
        deploy = Deploy(
            deployment=target,
            deploy_id=deploy_id,
            state=DeployState.PENDING,
            sha256=record.sha256,
            size=record.size,
            key=bundle_key(target, deploy_id),
            description=req.description or f"promoted from {req.source} v{record.version}"
            + (f": {source.description}" if source.description else ""),
            git=source.git,
            created_by=caller.name,
            created_at=clock,
            activations={},
            parsed={},
            promoted_from=PromotedFrom(deployment=req.source, version=record.version, deploy_id=source.deploy_id,
                                       sha256=record.sha256),
        )
        self._store.create_deploy(deploy)
        self._events.emit(EventType.CREATED, deploy_detail(EventType.CREATED, deploy, size=deploy.size, upload="promotion"))
        try:
            self._bundles.copy(record.key, record.object_version, deploy.key)
        except StorageError:
            self._store.cancel_deploy(target, deploy_id, "dagcast (the copy failed)")
            raise
        return deploy

    def _promoted_deploy(self, source: Deployment, req: Promote) -> Deploy:
        if req.deploy_id is not None:
            deploy = self._store.get_deploy(source.name, req.deploy_id)
            if req.version is not None and deploy.version != req.version:
                raise InvalidRequest(f"deploy {req.deploy_id} is v{deploy.version}, not v{req.version}")
        else:
            number = req.version or source.current_version
            if not number:
                raise NotFound(f"deployment {source.name!r} has no live version to promote")
            deploy = self._store.get_deploy(source.name, self._store.get_version(source.name, number).deploy_id)
        if deploy.version is None or deploy.state not in (DeployState.ACTIVE, DeployState.SUPERSEDED):
            raise PromotionRefused(f"deploy {deploy.deploy_id} of {source.name!r} is {deploy.state.value}; only a version "
                                   "that went live can be promoted")
        return deploy

    def _check_promotable(self, target: Deployment, source_dep: Deployment, source: Deploy) -> None:
        """The target's bar for promotions: live on every sidecar of the source for promotion_min_live_minutes,
        with no new import errors reported there."""
        minutes = target.promotion_min_live_minutes
        if not minutes:
            return
        name = f"{source_dep.name!r} v{source.version}"
        if source.converged_at is None:
            raise PromotionRefused(f"{name} never ran on every sidecar of {source_dep.name!r}; {target.name!r} takes "
                                   f"versions that were live there for {minutes} min")
        until = self._clock()
        if source_dep.current_version != source.version and source.version is not None:
            try:
                until = self._store.get_version(source_dep.name, source.version + 1).created_at
            except NotFound:
                until = self._clock()
        live_minutes = max(0, until - source.converged_at) / 60_000
        if live_minutes < minutes:
            raise PromotionRefused(f"{name} was live for {live_minutes:.1f} min; {target.name!r} takes versions that were "
                                   f"live for {minutes} min (promotion_min_live_minutes)")
        broken = [p.sidecar for p in self._store.list_parses(source_dep.name, source.deploy_id) if p.new_import_errors_total]
        if broken:
            raise PromotionRefused(f"{name} has new import errors on {', '.join(sorted(broken))}; fix them before promoting")

    # --- webhooks --------------------------------------------------------------------

    def add_webhook(self, deployment: str, req: CreateWebhook, created_by: str) -> WebhookCreated:
        self._store.get_deployment(deployment)
        try:
            events = check_event_types(req.events)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        from chalicelib.webhooks import check_url  # httpx: only for this route, not on every cold start

        url = check_url(req.url, self._settings.webhook_allow_private_hosts)
        if len(self._store.list_webhooks(deployment)) >= MAX_WEBHOOKS:
            raise Conflict(f"deployment {deployment!r} has {MAX_WEBHOOKS} webhooks already; remove one first")
        hook = Webhook(deployment=deployment, webhook_id=secrets.token_hex(6), url=url, events=events,
                       description=req.description, created_by=created_by, created_at=self._clock())
        secret = "whsec_" + secrets.token_urlsafe(32)
        self._store.put_webhook(hook, secret)
        return WebhookCreated(webhook=hook, secret=secret)

    def list_webhooks(self, deployment: str) -> list[Webhook]:
        self._store.get_deployment(deployment)
        return sorted(self._store.list_webhooks(deployment), key=lambda h: h.created_at)

    def remove_webhook(self, deployment: str, webhook_id: str) -> Webhook:
        return self._store.delete_webhook(deployment, webhook_id)

    def deliveries(self, deployment: str, limit: int) -> list[Delivery]:
        self._store.get_deployment(deployment)
        return self._store.list_deliveries(deployment, limit)

    def _note_convergence(self, deploy: Deploy, live: list[SidecarView], partial: bool = True) -> int | None:
        """Record (once) when the last live sidecar ran the deploy, from their activation times;
        returns that time when this call recorded it. A live sidecar on the version with no activation
        on record counts from when it reported going live (its last sync, as its heartbeat gave it, and
        never before the deploy went ACTIVE): a sidecar that was on the version when it registered, or a
        view read between its heartbeat and its activation record, which holds that same time. With
        `partial` False (a heartbeat's own check) such a sidecar's heartbeat notes it instead."""
        if deploy.activated_at is None or deploy.version is None:
            return None
        seen = [deploy.activations.get(s.name) for s in live]
        if None in seen and not partial:
            return None
        at = max(t if t is not None else max(s.last_sync_at or s.last_heartbeat, deploy.activated_at)
                 for t, s in zip(seen, live, strict=True))
        if not self._store.mark_converged(deploy.deployment, deploy.deploy_id, at):
            return None
        self._announce_convergence(deploy.model_copy(update={"converged_at": at}), [s.name for s in live])
        return at

    def _announce_convergence(self, done: Deploy, sidecars: list[str]) -> None:
        """What follows the write that noted a deploy's convergence (made once, by its winner): the metric
        and the LIVE event."""
        assert done.converged_at is not None and done.activated_at is not None
        self._telemetry.sidecars_converged(max(0, done.converged_at - done.activated_at) / 1000)
        self._events.emit(EventType.LIVE, deploy_detail(EventType.LIVE, done, sidecars=sorted(sidecars),
                                                        stages=done.stages().model_dump(mode="json")))

    # --- versions --------------------------------------------------------------------

    def get_version(self, deployment: str, version: int | None, caller: Token | None = None) -> VersionView:
        """A version (the current one when None). Download URLs (short-lived, pinned to the object
        versions the version recorded) only for callers that may download bundles; the manifest
        (file list and sha256s, no code) for every reader."""
        if version is None:
            dep = self._store.get_deployment(deployment)
            if dep.current_version == 0:
                raise NotFound(f"deployment {deployment!r} has no version yet: deploy DAGs first")
            version = dep.current_version
        record = self._store.get_version(deployment, version)
        if not record.deployment_id:
            record = record.model_copy(update={"deployment_id": self._uid(deployment)})
        expiry = self._settings.download_expiry_seconds
        manifest_key = self._store.get_deploy_fields(deployment, record.deploy_id, ["manifest_key"]).get("manifest_key")
        downloads = caller is None or Permission.SYNC in ROLE_PERMISSIONS[caller.role]
        delta = record.delta
        return VersionView(
            version=record,
            download_url=self._bundles.presigned_download(record.key, expiry, record.object_version) if downloads else None,
            manifest_url=self._bundles.presigned_download(manifest_key, expiry) if manifest_key else None,
            delta_url=(self._bundles.presigned_download(delta.key, expiry, delta.object_version)
                       if delta and downloads else None),
        )

    # --- what a version changed, file by file -----------------------------------------

    def deploy_files(self, deployment: str, deploy_id: str) -> DeployFiles:
        """The files a deploy's version added, removed and changed against version - 1, from their
        manifests (no bundle is read); each list is capped, the totals are exact."""
        version, manifest, base, base_manifest = self._compared(deployment, deploy_id)
        added, removed, changed = filediff.file_changes(base_manifest, manifest)
        cap = filediff.MAX_LISTED_FILES
        return DeployFiles(
            deploy_id=deploy_id, version=version.version, base_version=base.version if base else None,
            base_deploy_id=base.deploy_id if base else None, added=added[:cap], removed=removed[:cap],
            changed=changed[:cap], added_total=len(added), removed_total=len(removed), changed_total=len(changed),
            truncated=max(len(added), len(removed), len(changed)) > cap, max_listed=cap,
            diff_max_bytes=filediff.DIFF_MAX_BYTES,
        )

    def file_diff(self, deployment: str, deploy_id: str, path: str) -> FileDiff:
        """A unified diff of one file between a deploy's version and version - 1 (an added or removed
        file against nothing), read from the two bundles in S3; DiffRefused for a binary file or one
        over filediff.DIFF_MAX_BYTES on either side, checked on the manifests before any read."""
        version, manifest, base, base_manifest = self._compared(deployment, deploy_id)
        new = next((f for f in manifest if f.path == path), None)
        old = next((f for f in base_manifest or [] if f.path == path), None)
        if new is None and old is None:
            where = f"v{version.version}" + (f" or v{base.version}" if base else "")
            raise NotFound(f"no file {path!r} in {where} of {deployment!r}")
        status = "added" if old is None else "removed" if new is None else "changed" if old.sha256 != new.sha256 else "unchanged"
        text, truncated = "", False
        if status != "unchanged":
            filediff.check_diffable(path, new, old)
            after = filediff.text_of(path, self._member(version, path)) if new else []
            before = filediff.text_of(path, self._member(base, path)) if old and base else []
            text, truncated = filediff.unified(path, before, after, f"v{base.version}" if old and base else "",
                                               f"v{version.version}" if new else "")
        return FileDiff(path=path, version=version.version, base_version=base.version if base else None, status=status,
                        size=new.size if new else None, base_size=old.size if old else None, diff=text, truncated=truncated)

    def _compared(self, deployment: str, deploy_id: str) -> tuple[Version, list[FileEntry], Version | None, list[FileEntry] | None]:
        """A deploy's version and file list, and those of the version before it (None for the first)."""
        deploy = self._store.get_deploy(deployment, deploy_id)
        if deploy.version is None:
            raise Conflict(f"deploy {deploy_id} is {deploy.state.value} and has no version: it changed no files")
        version = self._store.get_version(deployment, deploy.version)
        manifest = self._manifest_of(deployment, deploy.deploy_id, deploy.version)
        if deploy.version == 1:
            return version, manifest, None, None
        try:
            base = self._store.get_version(deployment, deploy.version - 1)
        except NotFound:
            return version, manifest, None, None
        return version, manifest, base, self._manifest_of(deployment, base.deploy_id, base.version)

    def _manifest_of(self, deployment: str, deploy_id: str, version: int) -> list[FileEntry]:
        key = self._store.get_deploy_fields(deployment, deploy_id, ["manifest_key"]).get("manifest_key")
        manifest = self._publisher.load_manifest(str(key) if key else None)
        if manifest is None:
            raise Conflict(f"the file list of v{version} of {deployment!r} is not available")
        return manifest

    def _member(self, version: Version, path: str) -> bytes:
        """One file of a version, streamed from its bundle (pinned to the object version it was validated as)."""
        if not self._bundles.exists(version.key):
            raise Conflict(f"the bundle of v{version.version} was removed by the retention policy; no diff can be shown")
        body, _, _ = self._bundles.open(version.key, version.object_version)
        try:
            return filediff.read_member(body, version.limits, path)
        finally:
            body.close()

    def whoami(self, token: Token) -> WhoAmI:
        perms = sorted(p.value for p in ROLE_PERMISSIONS[token.role])
        return WhoAmI(name=token.name, role=token.role, deployments=token.deployments, permissions=perms)

    def _uid(self, deployment: str) -> str:
        dep = self._store.get_deployment(deployment)
        return dep.uid or self._store.ensure_uid(deployment, new_uid())

    def signing_keys(self) -> list[SigningKey]:
        if self._signer is None:
            return []
        try:
            return [SigningKey(key_id=self._signer.key_id, algorithm=ALGORITHM, public_key=self._signer.public_key_pem)]
        except SigningError as exc:
            raise StorageError(f"cannot read the signing key: {exc}") from exc

    # --- sidecars --------------------------------------------------------------------

    def register_sidecar(self, deployment: str, req: RegisterSidecar, caller: Token, secret: str | None) -> Registration:
        """Register a sidecar with a secret of its own (returned once): its heartbeats and its
        deregistration need it, so no other credential can act as this sidecar. A name already
        registered and live is only taken over with its secret (a restarted sidecar keeps it) or by
        an admin; a token limited to some sidecar names registers only those."""
        dep = self._store.get_deployment(deployment)
        if not caller.allows_sidecar(req.name):
            raise Forbidden(f"token {caller.name!r} may register only sidecars named {', '.join(caller.sidecar_names or [])}")
        existing = self._store.get_sidecar(deployment, req.name)
        clock = self._clock()
        if (
            existing is not None
            and existing.secret_hash
            and clock - existing.last_heartbeat <= self._settings.sidecar_stale_seconds * 1000
            and (secret is None or hash_token(secret) != existing.secret_hash)
            and caller.role is not Role.ADMIN
        ):
            raise Conflict(
                f"sidecar {req.name!r} is registered and live; only that sidecar (with its secret) or an admin "
                f"can register it again, or it can be registered once it has been silent for "
                f"{self._settings.sidecar_stale_seconds} s"
            )
        queue_url, sub_arn = self._queues.create(deployment, req.name)
        new_secret = secrets.token_urlsafe(32)
        keep = existing is not None and existing.deployment_id == dep.uid
        sidecar = Sidecar(
            deployment=deployment,
            name=req.name,
            component=req.component,
            queue_url=queue_url,
            subscription_arn=sub_arn,
            version=existing.version if existing and keep else 0,
            sha256=existing.sha256 if existing and keep else None,
            deployment_id=existing.deployment_id if existing and keep else None,
            last_heartbeat=clock,
            registered_at=clock,
            secret_hash=hash_token(new_secret),
            registered_by=caller.name,
        )
        if existing and existing.subscription_arn and existing.subscription_arn != sub_arn:
            self._queues.delete(None, existing.subscription_arn)
        self._store.put_sidecar(sidecar)
        uid = dep.uid or self._store.ensure_uid(deployment, new_uid())
        return Registration(
            sidecar=self._views(dep, uid, [sidecar])[0],
            queue_url=queue_url,
            secret=new_secret,
            deployment_id=uid,
            signing_keys=self.signing_keys(),
        )

    def heartbeat(self, deployment: str, name: str, req: Heartbeat, secret: str | None) -> SidecarView:
        """A sidecar's report of its live version. It counts as running a version only when it
        reports that version's number, bundle sha256 and deployment id, as that version was recorded."""
        if not secret:
            raise Forbidden(f"a heartbeat of sidecar {name!r} needs its secret (X-Dagcast-Sidecar-Secret)")
        fields = req.model_dump(mode="json")
        fields["last_heartbeat"] = self._clock()
        # The reads an activation needs go out with the heartbeat's write (one round trip, not three): the
        # report is on the path of every deploy to every sidecar. Nothing is decided before the write is in.
        reads = self._reads
        later_dep = reads.submit(self._store.get_deployment, deployment)
        later_identity = reads.submit(self._version_identity, deployment, req.version) if req.version else None
        sidecar, before = self._store.heartbeat(deployment, name, fields, hash_token(secret))
        dep = later_dep.result()
        uid = dep.uid or self._store.ensure_uid(deployment, new_uid())
        reported = (req.version, req.sha256, req.deployment_id)
        if later_identity is not None and reported != (before.version, before.sha256, before.deployment_id):
            deploy_id, sha256, version_uid = later_identity.result()
            if deploy_id is not None and req.sha256 == sha256 and req.deployment_id == (version_uid or uid) == uid:
                at = req.last_sync_at or fields["last_heartbeat"]
                self._store.record_activation(deployment, deploy_id, name, at, req.last_notified_at)
                if dep.current_deploy_id == deploy_id:
                    # notes convergence (and says so) when this was the last one
                    self._check_convergence(deployment, deploy_id, uid)
        return self._views(dep, uid, [sidecar])[0]

    def _check_convergence(self, deployment: str, deploy_id: str, uid: str) -> None:
        """A heartbeat's own check, once it recorded its sidecar's activation: when every live sidecar
        runs exactly the deploy's version and has its activation on record, note the convergence.

        Checks of one deploy in this process are coalesced: sidecars that go live together report at
        once, and each check would read the same records and race to the same conditional write. A
        heartbeat that finds a check of its deploy in flight leaves it a note and returns; the check
        in flight then runs again (its reads may predate that heartbeat's activation), until a run
        that began after every activation written meanwhile. Every activation is still seen by a
        check that started after it was written."""
        key = (deployment, deploy_id)
        with self._checks_lock:
            if key in self._checks:
                self._checks[key] = True  # the check in flight runs once more
                return
            self._checks[key] = False
        try:
            while True:
                done = self._converge(deployment, deploy_id, uid)
                with self._checks_lock:
                    if done or not self._checks[key]:
                        del self._checks[key]
                        return
                    self._checks[key] = False
        except BaseException:
            with self._checks_lock:
                self._checks.pop(key, None)
            raise

    def _converge(self, deployment: str, deploy_id: str, uid: str) -> bool:
        """One convergence check (see _check_convergence), from the cheap reads only: the deploy's
        progress fields and each sidecar's version and last heartbeat (when 50 sidecars report a
        version at once, 50 full views of 50 sidecars each were most of the API's work). True when
        there is nothing left to note: the deploy is no longer ACTIVE, or its convergence is noted."""
        fields = self._store.get_deploy_fields(deployment, deploy_id, ["state", "converged_at", "activations",
                                                                      "version", "sha256", "activated_at"])
        if fields.get("state") != DeployState.ACTIVE.value or fields.get("converged_at") is not None:
            return True
        activations = fields.get("activations") or {}
        version, activated_at = fields.get("version"), fields.get("activated_at")
        if version is None or activated_at is None:
            return False
        clock = self._clock()
        stale_ms = self._settings.sidecar_stale_seconds * 1000
        live = [s for s in self._store.list_sidecar_states(deployment) if clock - s.last_heartbeat <= stale_ms]
        if not live or not all(_runs(s, uid, int(version), fields.get("sha256")) and s.name in activations
                               for s in live):
            return False
        at = max(int(activations[s.name]) for s in live)
        if self._store.mark_converged(deployment, deploy_id, at):
            deploy = self._store.get_deploy(deployment, deploy_id, dag_ids=False)
            self._announce_convergence(deploy.model_copy(update={"converged_at": at}), [s.name for s in live])
        return True

    def _version_identity(self, deployment: str, version: int) -> tuple[str | None, str | None, str | None]:
        """(deploy id, sha256, deployment uid) of a recorded version; Nones for a folder left from an older
        installation (report it, record nothing)."""
        try:
            return self._store.version_identity(deployment, version)
        except NotFound:
            return None, None, None

    def report_parse(self, deployment: str, name: str, req: ParseReport, secret: str | None) -> ParseRecord:
        """A sidecar's report of what Airflow made of a version, sent with its own secret. Kept only
        when it names a recorded version exactly (number and sha256), for that version's deploy."""
        if not secret:
            raise Forbidden(f"a parse report of sidecar {name!r} needs its secret (X-Dagcast-Sidecar-Secret)")
        reads = self._reads  # what the report needs, read at once; nothing is written before the secret is checked
        later_dep = reads.submit(self._store.get_deployment, deployment)
        later_identity = reads.submit(self._store.version_identity, deployment, req.version)
        sidecar = self._store.get_sidecar(deployment, name)
        if sidecar is None:
            raise NotFound(f"sidecar {name!r} is not registered in {deployment!r}; register it first")
        if not secrets.compare_digest(sidecar.secret_hash, hash_token(secret)):
            raise Forbidden(f"this request does not carry sidecar {name!r}'s own secret (X-Dagcast-Sidecar-Secret)")
        deploy_id, sha256, _ = later_identity.result()
        if req.sha256 != sha256:
            raise Conflict(f"version {req.version} of {deployment!r} has bundle sha256 {sha256[:12]}..., "
                           f"not {req.sha256[:12]}...: the report is not about it")
        clock = self._clock()
        record = ParseRecord(**req.model_dump(), deployment=deployment, deploy_id=deploy_id, sidecar=name,
                             component=sidecar.component, reported_at=clock)
        dep = later_dep.result()
        self._store.put_parse(record, clock // 1000 + dep.retention_days * 86400)
        if req.status == "parsed":
            self._telemetry.import_errors(req.import_errors_total, req.new_import_errors_total, held=req.held)
            if req.new_import_errors_total:
                deploy = self._store.get_deploy(deployment, deploy_id)
                self._events.emit(EventType.IMPORT_ERRORS, deploy_detail(
                    EventType.IMPORT_ERRORS, deploy, suffix=name, sidecar=name, component=sidecar.component,
                    held=req.held, new_import_errors=list(req.new_import_errors[:10]),
                    new_import_errors_total=req.new_import_errors_total, import_errors_total=req.import_errors_total,
                    import_errors=[{"path": e.path, "line": e.line, "type": e.type, "message": e.message[:500]}
                                   for e in req.import_errors[:10]]))
        return record

    def deregister_sidecar(self, deployment: str, name: str, caller: Token, secret: str | None) -> None:
        """Remove a sidecar and its queue: the sidecar itself (with its secret), or an admin."""
        if caller.role is Role.ADMIN:
            old = self._store.delete_sidecar(deployment, name)
        elif not secret:
            raise Forbidden(f"deregistering sidecar {name!r} needs its secret (X-Dagcast-Sidecar-Secret) or an admin")
        else:
            old = self._store.delete_sidecar(deployment, name, hash_token(secret))
        if old is not None:
            self._queues.delete(old.queue_url, old.subscription_arn)

    def sidecar_views(self, deployment: str) -> list[SidecarView]:
        dep = self._store.get_deployment(deployment)
        uid = dep.uid or self._store.ensure_uid(deployment, new_uid())
        return self._views(dep, uid, sorted(self._store.list_sidecars(deployment), key=lambda s: s.name))

    def _views(self, dep: Deployment, uid: str, sidecars: list[Sidecar]) -> list[SidecarView]:
        """Sidecars as the API shows them: live or stale, and whether each runs the live version."""
        clock = self._clock()
        current_sha = None
        if dep.current_version:
            try:
                current_sha = self._store.version_identity(dep.name, dep.current_version)[1]
            except NotFound:
                current_sha = None
        return [
            SidecarView(
                name=s.name,
                component=s.component,
                version=s.version,
                sha256=s.sha256,
                on_current=bool(dep.current_version) and _runs(s, uid, dep.current_version, current_sha),
                live=clock - s.last_heartbeat <= self._settings.sidecar_stale_seconds * 1000,
                last_seen_s=round(max(0, clock - s.last_heartbeat) / 1000, 1),
                last_heartbeat=s.last_heartbeat,
                last_sync_at=s.last_sync_at,
                last_error=s.last_error,
                last_notified_at=s.last_notified_at,
                failures=s.failures,
                parser=s.parser,
            )
            for s in sidecars
        ]

    def deregister_sidecars_of(self, token: Token) -> list[str]:
        """Remove every sidecar a token registered (its queue too): a revoked token's sidecars get
        no more announcements from that moment."""
        removed = []
        for dep in self._store.list_deployments():
            if not token.allows(dep.name):
                continue
            for s in self._store.list_sidecars(dep.name):
                if s.registered_by == token.name:
                    old = self._store.delete_sidecar(dep.name, s.name)
                    if old is not None:
                        self._queues.delete(old.queue_url, old.subscription_arn)
                        removed.append(f"{dep.name}/{s.name}")
        return removed

    # --- janitor ---------------------------------------------------------------------

    def janitor(self) -> JanitorReport:
        """Remove sidecars gone silent (queue, subscription, record) and expire deploys never uploaded."""
        report = JanitorReport()
        clock = self._clock()
        sidecar_cutoff = clock - self._settings.sidecar_expiry_seconds * 1000
        pending_cutoff = clock - (self._settings.upload_expiry_seconds + self._settings.pending_grace_seconds) * 1000
        stuck_cutoff = pending_cutoff - self._settings.stuck_after_seconds * 1000
        stale = stuck = 0
        stale_cutoff = clock - self._settings.sidecar_stale_seconds * 1000
        for dep in self._store.list_deployments():
            if dep.current_deploy_id:
                self.get_deploy(dep.name, dep.current_deploy_id, dag_ids=False)  # notes convergence nobody waited for
            for s in self._store.list_sidecars(dep.name):
                if sidecar_cutoff <= s.last_heartbeat < stale_cutoff:
                    stale += 1
                    if self._store.mark_sidecar_stale(dep.name, s.name, s.last_heartbeat):
                        self._emit_stale(dep, s)
                if s.last_heartbeat < sidecar_cutoff:
                    self._queues.delete(s.queue_url, s.subscription_arn)
                    self._store.delete_sidecar(dep.name, s.name)
                    report.sidecars_removed.append(f"{dep.name}/{s.name}")
            for d in self._store.undecided_deploys(dep.name):
                if d.state is DeployState.PENDING and d.created_at < pending_cutoff and self._store.expire_deploy(
                    dep.name, d.deploy_id
                ):
                    self._bundles.delete(d.key)  # a late upload must never be picked up
                    report.deploys_expired.append(f"{dep.name}/{d.deploy_id}")
                elif d.created_at < stuck_cutoff:
                    stuck += 1
            report.late_uploads_deleted += self._delete_late_uploads(dep.name, clock)
            report.bundles_pruned += self._prune_bundles(dep, clock)
        self._telemetry.stale_sidecars(stale)
        self._telemetry.stuck_deploys(stuck)
        return report

    def _emit_stale(self, dep: Deployment, s: Sidecar) -> None:
        """Once per silence: the id names the heartbeat the sidecar went quiet after."""
        live = None
        if dep.current_deploy_id:
            try:
                live = self._store.get_deploy(dep.name, dep.current_deploy_id)
            except NotFound:
                live = None
        self._events.emit(EventType.SIDECAR_STALE, {
            "id": f"{EventType.SIDECAR_STALE.value}:{dep.name}:{s.name}:{s.last_heartbeat}",
            "type": EventType.SIDECAR_STALE.value, "schema": 1, "deployment": dep.name,
            "deploy_id": live.deploy_id if live else None, "version": live.version if live else None,
            "sha256": live.sha256 if live else None, "git": live.git.model_dump(mode="json") if live and live.git else None,
            "created_by": live.created_by if live else None,
            "sidecar": {"name": s.name, "component": s.component, "version": s.version, "sha256": s.sha256,
                        "last_heartbeat": s.last_heartbeat},
        })

    def _delete_late_uploads(self, deployment: str, clock: int) -> list[str]:
        """An upload can arrive until its form expires, after its deploy was cancelled or expired:
        ingest deletes it when S3 tells it, and this catches one whose notification was lost."""
        window = (self._settings.upload_expiry_seconds + self._settings.pending_grace_seconds) * 2000
        deleted = []
        abandoned = {DeployState.CANCELLED, DeployState.EXPIRED}
        for d in self._store.recent_deploys_in(deployment, abandoned, clock - window):
            if _owns_key(d) and self._bundles.exists(d.key):  # never the bundle a cancelled rollback shares
                self._bundles.delete(d.key)
                deleted.append(f"{deployment}/{d.deploy_id}")
        return deleted

    def _prune_bundles(self, dep: Deployment, clock: int) -> list[str]:
        """Delete bundles beyond retention: older than the newest `keep_versions` versions and older
        than `retention_days`; never the live one, and never one that a sidecar still reports."""
        versions = sorted(self._store.list_versions(dep.name), key=lambda v: v.version, reverse=True)
        in_use = {dep.current_version} | {s.version for s in self._store.list_sidecars(dep.name)}
        keep_keys = {v.key for v in versions[: dep.keep_versions]} | {v.key for v in versions if v.version in in_use}
        cutoff = clock - dep.retention_days * 86_400_000
        pruned = []
        for v in versions[dep.keep_versions :]:
            if v.version in in_use or v.key in keep_keys or v.created_at >= cutoff:
                continue
            self._bundles.delete(v.key)
            if v.delta is not None:
                self._bundles.delete(v.delta.key)
            keep_keys.add(v.key)  # a rollback may share the key: delete once
            pruned.append(f"{dep.name}/v{v.version}")
        return pruned

    # --- tokens ----------------------------------------------------------------------

    def issue_token(self, name: str, role: Role, deployments: list[str], sidecar_names: list[str] | None = None) -> str:
        """Create a token; the secret is returned once and only its hash is stored."""
        secret = new_token()
        self._store.put_token(Token(
            token_hash=hash_token(secret), name=name, role=role, deployments=deployments,
            sidecar_names=sidecar_names, created_at=self._clock(),
        ))
        return secret

    def create_token(self, req: CreateToken) -> IssuedToken:
        if req.sidecar_names is not None and req.role is not Role.SIDECAR:
            raise InvalidRequest("sidecar_names limits sidecar tokens only; leave it out for other roles")
        secret = self.issue_token(req.name, req.role, req.deployments, req.sidecar_names)
        token = self._store.token_by_name(req.name)
        assert token is not None
        return IssuedToken(token=secret, info=_token_view(token))

    def list_tokens(self) -> list[TokenView]:
        return [_token_view(t) for t in self._store.list_tokens()]

    def revoke_token(self, name: str) -> TokenView:
        """Revoke a token: refused from now on (see Authenticator for other warm functions), and the
        sidecars it registered are removed with their queues, so no announcement reaches them."""
        token = self._store.revoke_token(name)
        if self._forget_token is not None:
            self._forget_token(token.token_hash)
        self.deregister_sidecars_of(token)
        return _token_view(token)


PROGRESS_FIELDS = ("state", "activations", "converged_at", "parsed")


def _progress(fields: dict[str, object]) -> tuple[object, list[str], object, list[str]]:
    """What a long poll watches on a deploy record: state, which sidecars ran it, convergence, and
    which sidecars reported parsing it."""
    activations = fields.get("activations") or {}
    parsed = fields.get("parsed") or {}
    return (fields.get("state"), sorted(activations) if isinstance(activations, dict) else [], fields.get("converged_at"),
            sorted(parsed) if isinstance(parsed, dict) else [])


def _awaited(view: DeployView) -> tuple[set[str], set[str]]:
    """The reports a long poll waits on after `view`: the activations of live sidecars not on the version
    yet (but those held back by the parse gate, which stay on the version before, and those on it
    without an activation), and the parse reports of live sidecars with a parser."""
    waiting_on = ({s.name for s in view.sidecars if s.live and not s.on_deploy} - set(view.parse.held)
                  - set(view.deploy.activations))
    return waiting_on, {s.name for s in view.sidecars if s.live and s.parser}


def _settled(view: DeployView) -> bool:
    """Nothing more to wait for: a final state, or ACTIVE on every live sidecar (or held back by one
    that gates on Airflow's parse), with every parse report in."""
    if view.deploy.state is DeployState.ACTIVE:
        live = [s for s in view.sidecars if s.live]
        done = all(s.on_deploy or s.name in view.parse.held for s in live)
        return done and view.parse.status != "pending"
    return view.deploy.state not in (DeployState.PENDING, DeployState.VALIDATING)


def _parse_view(deploy: Deploy, views: list[SidecarView], reports: list[ParseRecord]) -> DeployParse:
    """The parse reports of a deploy's version merged over its sidecars: each import error once, with
    the sidecars that reported it (components differ: a worker may lack a provider the scheduler has)."""
    mine = {r.sidecar: r for r in reports if r.version == deploy.version and r.sha256 == deploy.sha256}
    live = [v for v in views if v.live]
    held = sorted(n for n, r in mine.items() if r.held)
    pending = sorted(v.name for v in live if v.parser and v.name not in mine and (v.on_deploy or v.name in held))
    parsed = {n: r for n, r in mine.items() if r.status == "parsed"}
    unavailable = sorted({n for n, r in mine.items() if r.status == "unavailable"}
                         | {v.name for v in live if v.on_deploy and not v.parser and v.name not in mine})
    failed = {n: r.message or "failed" for n, r in mine.items() if r.status == "failed"}
    errors: dict[tuple[str, str, str], ParseErrorView] = {}
    duplicates: dict[str, set[str]] = {}
    for name, r in sorted(parsed.items()):
        new = set(r.new_import_errors)
        for e in r.import_errors:
            key = (e.path, e.type, e.message)
            view = errors.setdefault(key, ParseErrorView(path=e.path, line=e.line, type=e.type, message=e.message,
                                                         frames=e.frames, sidecars=[], new=False))
            view.sidecars.append(name)
            view.new = view.new or e.path in new
        for d in r.duplicates:
            duplicates.setdefault(d.dag_id, set()).update(d.paths)
    if pending:
        status = "pending"
    elif parsed:
        status = "parsed"
    elif unavailable or failed:
        status = "unavailable"
    else:
        status = "none"
    return DeployParse(
        status=status,
        reported=sorted(mine),
        pending=pending,
        unavailable=unavailable,
        failed=failed,
        held=held,
        files=max((r.files for r in parsed.values()), default=0),
        dags=max((r.dags for r in parsed.values()), default=0),
        import_errors=sorted(errors.values(), key=lambda e: (e.path, e.type)),
        import_errors_total=max([len(errors), *(r.import_errors_total for r in parsed.values())]),
        new_import_errors=len({p for r in parsed.values() for p in r.new_import_errors}),
        duplicates=[DuplicateDag(dag_id=k, paths=sorted(v)) for k, v in sorted(duplicates.items())],
        dags_added=sorted({d for r in parsed.values() for d in r.dags_added}),
        dags_removed=sorted({d for r in parsed.values() for d in r.dags_removed}),
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _runs(s: Sidecar, uid: str, version: int | None, sha256: str | None) -> bool:
    """Whether a sidecar reported exactly this version: number, bundle sha256 and deployment id."""
    return version is not None and s.version == version and s.sha256 == sha256 and s.deployment_id == uid


def _owns_key(d: Deploy) -> bool:
    """Whether the deploy's bundle key is its own upload's: a rollback's is the key of the deploy it
    rolled back to, shared with that version (and any other rollback to it), possibly the live one."""
    return d.rollback_of is None and d.key == bundle_key(d.deployment, d.deploy_id)


def _token_view(t: Token) -> TokenView:
    return TokenView(name=t.name, role=t.role, deployments=t.deployments, sidecar_names=t.sidecar_names,
                     revoked=t.revoked, created_at=t.created_at)
