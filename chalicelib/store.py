"""DynamoDB data access: one table, items keyed by deployment.

Layout (pk / sk):
  DEPLOYMENT#<d> / META              the deployment, its version counter and current pointer
  DEPLOYMENT#<d> / DEPLOY#<id>       one deploy attempt (ids sort by creation time)
  DEPLOYMENT#<d> / VERSION#<n:010>   an immutable published version
  DEPLOYMENT#<d> / SIDECAR#<name>    a registered sidecar and its last heartbeat
  DEPLOYMENT#<d> / WEBHOOK#<id>      a webhook: URL, event types, its signing secret
  DEPLOYMENT#<d> / DELIVERY#<at:013>#<webhook>#<event>#<attempt>   one delivery attempt (expires)
  TOKEN#<sha256> / META              an API token, stored only as its hash
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, NoReturn

from botocore.exceptions import ClientError

from chalicelib.exceptions import Conflict, Forbidden, InvalidRequest, NotFound, StorageError
from chalicelib.models import Delivery, Deploy, Deployment, DeployState, ParseRecord, Sidecar, Token, Version, Webhook

META = "META"
KEPT_VERSION_DEPLOYS = 1024  # (deployment, version) -> deploy id answers a Store keeps


# every attribute of a deploy record but its DAG ids (a projection lists what it keeps)
_DEPLOY_BUT_DAG_IDS = ["pk", *(f for f in Deploy.model_fields if f != "dag_ids")]

def _pk(deployment: str) -> str:
    return f"DEPLOYMENT#{deployment}"


def _deploy_sk(deploy_id: str) -> str:
    return f"DEPLOY#{deploy_id}"


def _version_sk(version: int) -> str:
    return f"VERSION#{version:010d}"


def _sidecar_sk(name: str) -> str:
    return f"SIDECAR#{name}"


def _parse_sk(deploy_id: str, sidecar: str) -> str:
    return f"PARSE#{deploy_id}#{sidecar}"


SIDECAR_STATE_FIELDS = ("name", "version", "sha256", "deployment_id", "last_heartbeat", "last_sync_at")


def _strip(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("pk", "sk", "ttl")}


def _assignments(fields: dict[str, Any]) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """`#kN = :vN` clauses for an UpdateExpression, with their attribute names and values."""
    names = {f"#k{i}": k for i, k in enumerate(fields)}
    values = {f":v{i}": v for i, v in enumerate(fields.values())}
    return [f"#k{i} = :v{i}" for i in range(len(fields))], names, values


def _failed_condition(exc: ClientError) -> bool:
    return bool(exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException")


class VersionRace(Exception):
    """Another deploy took the version number first; re-read and retry."""


class Store:
    """Reads and writes dagcast's records. Takes a boto3 DynamoDB Table resource."""

    def __init__(self, table: Any, on_deploy_change: Callable[[str, str], None] | None = None) -> None:
        self._table = table
        self._client = table.meta.client
        # told (deployment, deploy id) after each write to a deploy record: in-process long polls wake on it
        self._on_deploy_change = on_deploy_change
        self._version_deploys: dict[tuple[str, int], tuple[str, str, str]] = {}

    # --- deployments -----------------------------------------------------------------

    def create_deployment(self, deployment: Deployment) -> None:
        item = {"pk": _pk(deployment.name), "sk": META, **deployment.model_dump(mode="json")}
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            if _failed_condition(exc):
                raise Conflict(f"deployment {deployment.name!r} already exists") from exc
            raise StorageError(f"cannot create deployment {deployment.name!r}: {exc}") from exc

    def get_deployment(self, name: str) -> Deployment:
        item = self._get(_pk(name), META, f"deployment {name!r}")
        if item is None:
            raise NotFound(f"deployment {name!r} does not exist")
        return Deployment.model_validate(_strip(item))

    def update_deployment(self, name: str, changes: dict[str, Any]) -> Deployment:
        if not changes:
            return self.get_deployment(name)
        clauses, names, values = _assignments(changes)
        expr = "SET " + ", ".join(clauses)
        try:
            out = self._table.update_item(
                Key={"pk": _pk(name), "sk": META},
                UpdateExpression=expr,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ConditionExpression="attribute_exists(pk)",
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                raise NotFound(f"deployment {name!r} does not exist") from exc
            raise StorageError(f"cannot update deployment {name!r}: {exc}") from exc
        return Deployment.model_validate(_strip(out["Attributes"]))

    def ensure_uid(self, name: str, uid: str) -> str:
        """The deployment's immutable id: `uid` is written only when it has none yet (a deployment
        created before ids existed); returns the id it has."""
        try:
            out = self._table.update_item(
                Key={"pk": _pk(name), "sk": META},
                UpdateExpression="SET uid = :u",
                ConditionExpression="attribute_exists(pk) AND (attribute_not_exists(uid) OR uid = :empty)",
                ExpressionAttributeValues={":u": uid, ":empty": ""},
                ReturnValues="UPDATED_NEW",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return self.get_deployment(name).uid
            raise StorageError(f"cannot give deployment {name!r} its id: {exc}") from exc
        return str(out["Attributes"]["uid"])

    def list_deployments(self) -> list[Deployment]:
        items = self._scan("sk = :meta AND begins_with(pk, :p)", {":meta": META, ":p": "DEPLOYMENT#"}, "deployments")
        return sorted((Deployment.model_validate(_strip(i)) for i in items), key=lambda d: d.name)

    # --- tokens ----------------------------------------------------------------------

    def put_token(self, token: Token) -> None:
        """Store the token by hash (for authentication) and its name -> hash reference (for management)."""
        item = {"pk": f"TOKEN#{token.token_hash}", "sk": META, **token.model_dump(mode="json")}
        ref = {"pk": f"TOKENNAME#{token.name}", "sk": META, "token_hash": token.token_hash}
        try:
            self._client.transact_write_items(
                TransactItems=[
                    {"Put": {"TableName": self._table.name, "Item": ref, "ConditionExpression": "attribute_not_exists(pk)"}},
                    {"Put": {"TableName": self._table.name, "Item": item}},
                ]
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "TransactionCanceledException":
                raise Conflict(f"a token named {token.name!r} already exists") from exc
            raise StorageError(f"cannot store token {token.name!r}: {exc}") from exc

    def token_by_name(self, name: str) -> Token | None:
        ref = self._get(f"TOKENNAME#{name}", META, f"token {name!r}")
        return self.get_token(ref["token_hash"]) if ref else None

    def revoke_token(self, name: str) -> Token:
        token = self.token_by_name(name)
        if token is None:
            raise NotFound(f"no token named {name!r}")
        try:
            out = self._table.update_item(
                Key={"pk": f"TOKEN#{token.token_hash}", "sk": META},
                UpdateExpression="SET revoked = :t",
                ExpressionAttributeValues={":t": True},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            raise StorageError(f"cannot revoke token {name!r}: {exc}") from exc
        return Token.model_validate(_strip(out["Attributes"]))

    def list_tokens(self) -> list[Token]:
        items = self._scan("begins_with(pk, :p)", {":p": "TOKEN#"}, "tokens")
        return sorted((Token.model_validate(_strip(i)) for i in items), key=lambda t: t.name)

    def get_token(self, token_hash: str) -> Token | None:
        item = self._get(f"TOKEN#{token_hash}", META, "token")
        return Token.model_validate(_strip(item)) if item else None

    # --- deploys ---------------------------------------------------------------------

    def create_deploy(self, deploy: Deploy) -> None:
        item = {
            "pk": _pk(deploy.deployment),
            "sk": _deploy_sk(deploy.deploy_id),
            **deploy.model_dump(mode="json", exclude_none=True),
        }
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            raise StorageError(f"cannot record deploy {deploy.deploy_id}: {exc}") from exc

    def get_deploy(self, deployment: str, deploy_id: str, dag_ids: bool = True) -> Deploy:
        """The deploy; `dag_ids` False: read without its DAG ids (thousands of them are most of the
        record, and of the time to read and serve it), which the Deploy then holds as empty."""
        item = self._get(_pk(deployment), _deploy_sk(deploy_id), f"deploy {deploy_id}",
                         None if dag_ids else _DEPLOY_BUT_DAG_IDS)
        if item is None:
            raise NotFound(f"deploy {deploy_id!r} does not exist in deployment {deployment!r}")
        return Deploy.model_validate(_strip(item))

    def get_deploy_fields(self, deployment: str, deploy_id: str, fields: list[str]) -> dict[str, Any]:
        """Only these attributes of a deploy (absent ones are left out): a cheap read of a record
        that may carry thousands of DAG ids, for callers that need a field or two."""
        item = self._get(_pk(deployment), _deploy_sk(deploy_id), f"deploy {deploy_id}", ["pk", *fields])
        if item is None:
            raise NotFound(f"deploy {deploy_id!r} does not exist in deployment {deployment!r}")
        return _strip(item)

    def list_deploys(self, deployment: str, limit: int, cursor: str | None) -> tuple[list[Deploy], str | None]:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :p)",
            "ExpressionAttributeValues": {":pk": _pk(deployment), ":p": "DEPLOY#"},
            "ScanIndexForward": False,
            "Limit": limit,
        }
        if cursor:
            kwargs["ExclusiveStartKey"] = {"pk": _pk(deployment), "sk": _deploy_sk(_decode_cursor(cursor))}
        try:
            out = self._table.query(**kwargs)
        except ClientError as exc:
            raise StorageError(f"cannot list deploys of {deployment!r}: {exc}") from exc
        deploys = [Deploy.model_validate(_strip(i)) for i in out.get("Items", [])]
        last = out.get("LastEvaluatedKey")
        next_cursor = _encode_cursor(last["sk"].removeprefix("DEPLOY#")) if last else None
        return deploys, next_cursor

    def start_validation(self, deployment: str, deploy_id: str, now_ms: int, stored_at: int | None = None) -> int | None:
        """PENDING|VALIDATING -> VALIDATING; returns when the upload was first seen (epoch ms),
        or None when the deploy already reached a final state. `stored_at`, when S3 stored the
        upload, is recorded beside it. On a redelivery both are kept, not updated."""
        stored = ", stored_at = if_not_exists(stored_at, :stored)" if stored_at is not None else ""
        values: dict[str, Any] = {
            ":validating": DeployState.VALIDATING.value,
            ":pending": DeployState.PENDING.value,
            ":now": now_ms,
            **({":stored": stored_at} if stored_at is not None else {}),
        }
        try:
            out = self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression=f"SET #s = :validating, uploaded_at = if_not_exists(uploaded_at, :now){stored}",
                ConditionExpression="#s IN (:pending, :validating)",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return None
            raise StorageError(f"cannot mark deploy {deploy_id} validating: {exc}") from exc
        self._changed(deployment, deploy_id)
        return int(out["Attributes"]["uploaded_at"])

    def finish_rejected(self, deployment: str, deploy_id: str, fields: dict[str, Any]) -> bool:
        """VALIDATING -> REJECTED with the errors. False when another delivery finished it first."""
        clauses, names, values = _assignments(fields)
        sets = ", ".join(clauses)
        try:
            self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression=f"SET #s = :rejected, {sets}",
                ConditionExpression="#s = :validating",
                ExpressionAttributeNames={"#s": "state", **names},
                ExpressionAttributeValues={
                    ":rejected": DeployState.REJECTED.value,
                    ":validating": DeployState.VALIDATING.value,
                    **values,
                },
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise StorageError(f"cannot record rejection of deploy {deploy_id}: {exc}") from exc
        self._changed(deployment, deploy_id)
        return True

    def activate(self, version: Version, expected_last: int, previous_deploy: str | None, fields: dict[str, Any]) -> None:
        """Publish `version` in one transaction: counter and pointer, version item, deploy ACTIVE,
        and the previously live deploy SUPERSEDED.

        Raises VersionRace when another deploy took the number (re-read and retry),
        and Conflict when this deploy already reached a final state.
        """
        d, n = version.deployment, version.version
        clauses, names, values = _assignments(fields)
        sets = "".join(f", {c}" for c in clauses)
        meta_cond = "last_version = :prev" if expected_last else "(attribute_not_exists(last_version) OR last_version = :prev)"
        items = [
            {
                "Update": {
                    "TableName": self._table.name,
                    "Key": {"pk": _pk(d), "sk": META},
                    "UpdateExpression": "SET last_version = :n, current_version = :n, current_deploy_id = :id",
                    "ConditionExpression": f"attribute_exists(pk) AND {meta_cond}",
                    "ExpressionAttributeValues": {":n": n, ":prev": expected_last, ":id": version.deploy_id},
                }
            },
            {
                "Put": {
                    "TableName": self._table.name,
                    "Item": {"pk": _pk(d), "sk": _version_sk(n), **version.model_dump(mode="json")},
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
            {
                "Update": {
                    "TableName": self._table.name,
                    "Key": {"pk": _pk(d), "sk": _deploy_sk(version.deploy_id)},
                    "UpdateExpression": f"SET #s = :active, version = :n{sets}",
                    "ConditionExpression": "#s = :validating",
                    "ExpressionAttributeNames": {"#s": "state", **names},
                    "ExpressionAttributeValues": {
                        ":active": DeployState.ACTIVE.value,
                        ":validating": DeployState.VALIDATING.value,
                        ":n": n,
                        **values,
                    },
                }
            },
        ]
        if previous_deploy and previous_deploy != version.deploy_id:
            items.append(
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": {"pk": _pk(d), "sk": _deploy_sk(previous_deploy)},
                        "UpdateExpression": "SET #s = :superseded",
                        "ConditionExpression": "attribute_exists(pk)",
                        "ExpressionAttributeNames": {"#s": "state"},
                        "ExpressionAttributeValues": {":superseded": DeployState.SUPERSEDED.value},
                    }
                }
            )
        try:
            self._client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise StorageError(f"cannot activate version {n} of {d!r}: {exc}") from exc
            reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
            if len(reasons) >= 3 and reasons[2] == "ConditionalCheckFailed":
                raise Conflict(f"deploy {version.deploy_id} is no longer validating") from exc
            raise VersionRace(f"version {n} of {d!r} was taken") from exc
        self._changed(d, version.deploy_id)
        if previous_deploy and previous_deploy != version.deploy_id:
            self._changed(d, previous_deploy)

    def undecided_deploys(self, deployment: str) -> list[Deploy]:
        """Deploys still PENDING or VALIDATING."""
        undecided = (DeployState.PENDING.value, DeployState.VALIDATING.value)
        items = self._query_prefix(_pk(deployment), "DEPLOY#")
        return [Deploy.model_validate(_strip(i)) for i in items if i.get("state") in undecided]

    def expire_deploy(self, deployment: str, deploy_id: str) -> bool:
        """PENDING -> EXPIRED; False when an upload arrived first."""
        try:
            self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression="SET #s = :expired",
                ConditionExpression="#s = :pending",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues={":expired": DeployState.EXPIRED.value, ":pending": DeployState.PENDING.value},
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise StorageError(f"cannot expire deploy {deploy_id}: {exc}") from exc
        self._changed(deployment, deploy_id)
        return True

    def create_rollback(self, deploy: Deploy) -> None:
        """Record a rollback deploy directly in VALIDATING: its bundle was validated before."""
        self.create_deploy(deploy)

    def start_rebuilt_validation(self, deployment: str, deploy_id: str, now_ms: int,
                                 delta_object_version: str | None = None, stored_at: int | None = None) -> Deploy | None:
        """Ingest rebuilt a PENDING deploy's bundle from its delta (the object version of the delta it
        read, when the bucket is versioned) and validates it now: PENDING -> VALIDATING with `rebuilt_at`,
        in one write, as start_validation does for an uploaded bundle. Also a VALIDATING one already
        rebuilt (a redelivery after a crash before it was decided). Returns the deploy as it now is; None
        when it is no longer either (cancelled or expired meanwhile), and its bundle must not be written."""
        values: dict[str, Any] = {":now": now_ms, ":pending": DeployState.PENDING.value,
                                  ":validating": DeployState.VALIDATING.value}
        update = "SET rebuilt_at = :now, #s = :validating, uploaded_at = if_not_exists(uploaded_at, :now)"
        if delta_object_version:
            update += ", delta_object_version = :dov"
            values[":dov"] = delta_object_version
        if stored_at is not None:
            update += ", stored_at = if_not_exists(stored_at, :stored)"
            values[":stored"] = stored_at
        try:
            out = self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression=update,
                ConditionExpression="#s = :pending OR (#s = :validating AND attribute_exists(rebuilt_at))",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return None
            raise StorageError(f"cannot mark deploy {deploy_id} rebuilt: {exc}") from exc
        self._changed(deployment, deploy_id)
        return Deploy.model_validate(_strip(out["Attributes"]))

    def cancel_deploy(self, deployment: str, deploy_id: str, by: str) -> Deploy:
        """PENDING or VALIDATING -> CANCELLED. Activation requires VALIDATING in the same transaction
        that publishes, so a deploy cancelled while its upload is validated never goes live."""
        try:
            out = self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression="SET #s = :cancelled, cancelled_by = :by",
                ConditionExpression="#s IN (:pending, :validating)",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues={
                    ":cancelled": DeployState.CANCELLED.value,
                    ":pending": DeployState.PENDING.value,
                    ":validating": DeployState.VALIDATING.value,
                    ":by": by,
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                state = self.get_deploy(deployment, deploy_id).state.value
                raise Conflict(
                    f"deploy {deploy_id} is {state}; only a PENDING or VALIDATING deploy can be cancelled"
                ) from exc
            raise StorageError(f"cannot cancel deploy {deploy_id}: {exc}") from exc
        self._changed(deployment, deploy_id)
        return Deploy.model_validate(_strip(out["Attributes"]))

    def recent_deploys_in(self, deployment: str, states: set[DeployState], since_ms: int) -> list[Deploy]:
        """Deploys created since `since_ms` that are in one of `states`."""
        items = self._query_prefix(_pk(deployment), "DEPLOY#")
        wanted = {s.value for s in states}
        return [
            Deploy.model_validate(_strip(i)) for i in items
            if i.get("state") in wanted and int(i.get("created_at", 0)) >= since_ms
        ]

    def record_activation(
        self, deployment: str, deploy_id: str, sidecar: str, at_ms: int, notified_ms: int | None = None
    ) -> None:
        """Note when a sidecar first ran a deploy's version, and when it learned of it (kept on the deploy record)."""
        sets, values = "activations.#n = :t", {":t": at_ms}
        if notified_ms is not None:
            sets, values = sets + ", notified.#n = :r", {**values, ":r": notified_ms}
        try:
            self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression=f"SET {sets}",
                ConditionExpression="attribute_exists(activations) AND attribute_not_exists(activations.#n)",
                ExpressionAttributeNames={"#n": sidecar},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return
            if notified_ms is not None and exc.response.get("Error", {}).get("Code") == "ValidationException":
                # a deploy recorded before `notified` existed has no map to write into: keep the activation
                self.record_activation(deployment, deploy_id, sidecar, at_ms)
                return
            raise StorageError(f"cannot record activation of {deploy_id} on {sidecar!r}: {exc}") from exc
        self._changed(deployment, deploy_id)

    def put_parse(self, record: ParseRecord, expires_at_s: int) -> None:
        """Keep a sidecar's parse report of a deploy's version (the latest one per sidecar), and note
        it on the deploy record, where a long poll of the deploy sees it arrive."""
        item = {"pk": _pk(record.deployment), "sk": _parse_sk(record.deploy_id, record.sidecar),
                "ttl": expires_at_s, **record.model_dump(mode="json")}
        key = {"pk": _pk(record.deployment), "sk": _deploy_sk(record.deploy_id)}
        try:
            try:
                # one round trip: the report and its note on the deploy record land together, so a long
                # poll that sees the note finds the report (the answer to the last one is waited on)
                self._client.transact_write_items(TransactItems=[
                    {"Put": {"TableName": self._table.name, "Item": item}},
                    {"Update": {"TableName": self._table.name, "Key": key, "UpdateExpression": "SET parsed.#n = :t",
                                "ConditionExpression": "attribute_exists(parsed)",
                                "ExpressionAttributeNames": {"#n": record.sidecar},
                                "ExpressionAttributeValues": {":t": record.reported_at}}},
                ])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                    raise
                # a deploy recorded before parse reports existed has no map yet (or no record at all)
                self._table.put_item(Item=item)
                self._table.update_item(
                    Key=key, UpdateExpression="SET parsed = :m", ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeValues={":m": {record.sidecar: record.reported_at}},
                )
        except ClientError as exc:
            raise StorageError(f"cannot record the parse report of {record.sidecar!r}: {exc}") from exc
        self._changed(record.deployment, record.deploy_id)

    def list_parses(self, deployment: str, deploy_id: str) -> list[ParseRecord]:
        items = self._query_prefix(_pk(deployment), f"PARSE#{deploy_id}#")
        return [ParseRecord.model_validate(_strip(i)) for i in items]

    def mark_converged(self, deployment: str, deploy_id: str, at_ms: int) -> bool:
        """Record once when every live sidecar first ran the deploy; False if already recorded."""
        try:
            self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _deploy_sk(deploy_id)},
                UpdateExpression="SET converged_at = :t",
                ConditionExpression="attribute_exists(pk) AND attribute_not_exists(converged_at)",
                ExpressionAttributeValues={":t": at_ms},
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise StorageError(f"cannot record convergence of deploy {deploy_id}: {exc}") from exc
        self._changed(deployment, deploy_id)
        return True

    def list_versions(self, deployment: str) -> list[Version]:
        items = self._query_prefix(_pk(deployment), "VERSION#")
        return [Version.model_validate(_strip(i)) for i in items]

    def get_version(self, deployment: str, version: int) -> Version:
        item = self._get(_pk(deployment), _version_sk(version), f"version {version}")
        if item is None:
            raise NotFound(f"version {version} of deployment {deployment!r} does not exist")
        return Version.model_validate(_strip(item))

    def version_identity(self, deployment: str, version: int) -> tuple[str, str, str]:
        """(deploy id, bundle sha256, deployment id) of a published version (NotFound when there is
        none). A published version never changes, so the answer is kept: each sidecar that reports
        the version then costs no read of it."""
        key = (deployment, version)
        found = self._version_deploys.get(key)
        if found is None:
            item = self._get(_pk(deployment), _version_sk(version), f"version {version}", ["deploy_id", "sha256", "deployment_id"])
            if not item:
                raise NotFound(f"version {version} of deployment {deployment!r} does not exist")
            found = (str(item["deploy_id"]), str(item["sha256"]), str(item.get("deployment_id", "")))
            if len(self._version_deploys) >= KEPT_VERSION_DEPLOYS:
                self._version_deploys.clear()
            self._version_deploys[key] = found
        return found

    def deploy_of_version(self, deployment: str, version: int) -> str:
        """The id of the deploy that published `version` (NotFound when none did)."""
        return self.version_identity(deployment, version)[0]

    # --- sidecars --------------------------------------------------------------------

    def put_sidecar(self, sidecar: Sidecar) -> None:
        item = {"pk": _pk(sidecar.deployment), "sk": _sidecar_sk(sidecar.name), **sidecar.model_dump(mode="json")}
        try:
            self._table.put_item(Item=item)
        except ClientError as exc:
            raise StorageError(f"cannot register sidecar {sidecar.name!r}: {exc}") from exc

    def get_sidecar(self, deployment: str, name: str) -> Sidecar | None:
        item = self._get(_pk(deployment), _sidecar_sk(name), f"sidecar {name!r}")
        return Sidecar.model_validate(_strip(item)) if item else None

    def heartbeat(self, deployment: str, name: str, fields: dict[str, Any], secret_hash: str) -> tuple[Sidecar, Sidecar]:
        """Record a heartbeat of the sidecar whose secret hashes to `secret_hash`; returns the sidecar
        as updated and as it was. NotFound when it is not registered, Forbidden for another secret."""
        clauses, names, values = _assignments(fields)
        try:
            out = self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _sidecar_sk(name)},
                UpdateExpression="SET " + ", ".join(clauses),
                ConditionExpression="attribute_exists(pk) AND secret_hash = :secret",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={**values, ":secret": secret_hash},
                ReturnValues="ALL_OLD",
            )
        except ClientError as exc:
            if _failed_condition(exc):
                self._refuse_sidecar(deployment, name)
            raise StorageError(f"cannot record heartbeat of sidecar {name!r}: {exc}") from exc
        old = Sidecar.model_validate(_strip(out["Attributes"]))
        return old.model_copy(update=fields), old

    def _refuse_sidecar(self, deployment: str, name: str) -> NoReturn:
        if self.get_sidecar(deployment, name) is None:
            raise NotFound(f"sidecar {name!r} is not registered in {deployment!r}; register it first")
        raise Forbidden(f"this request does not carry sidecar {name!r}'s own secret (X-Dagcast-Sidecar-Secret)")

    def delete_sidecar(self, deployment: str, name: str, secret_hash: str | None = None) -> Sidecar | None:
        """Remove a registration (only the one holding `secret_hash`, when given); returns it, or None
        when there was none."""
        kwargs: dict[str, Any] = {}
        if secret_hash is not None:
            kwargs = {"ConditionExpression": "attribute_not_exists(pk) OR secret_hash = :secret",
                      "ExpressionAttributeValues": {":secret": secret_hash}}
        try:
            out = self._table.delete_item(
                Key={"pk": _pk(deployment), "sk": _sidecar_sk(name)}, ReturnValues="ALL_OLD", **kwargs
            )
        except ClientError as exc:
            if _failed_condition(exc):
                self._refuse_sidecar(deployment, name)
            raise StorageError(f"cannot deregister sidecar {name!r}: {exc}") from exc
        old = out.get("Attributes")
        return Sidecar.model_validate(_strip(old)) if old else None

    def list_sidecars(self, deployment: str) -> list[Sidecar]:
        items = self._query_prefix(_pk(deployment), "SIDECAR#")
        return [Sidecar.model_validate(_strip(i)) for i in items]

    def list_sidecar_states(self, deployment: str) -> list[Sidecar]:
        """The sidecars with only what says whether each is live and which version it runs (the other
        fields left at their defaults): the read a heartbeat's convergence check makes of every sidecar."""
        items = self._query_prefix(_pk(deployment), "SIDECAR#", list(SIDECAR_STATE_FIELDS))
        return [Sidecar.model_validate({"deployment": deployment, **i}) for i in items]

    # --- helpers ---------------------------------------------------------------------

    def _changed(self, deployment: str, deploy_id: str) -> None:
        if self._on_deploy_change is not None:
            self._on_deploy_change(deployment, deploy_id)

    def _get(self, pk: str, sk: str, what: str, projection: list[str] | None = None) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {}
        if projection:
            names = {f"#p{i}": name for i, name in enumerate(projection)}
            kwargs = {"ProjectionExpression": ", ".join(names), "ExpressionAttributeNames": names}
        try:
            out = self._table.get_item(Key={"pk": pk, "sk": sk}, ConsistentRead=True, **kwargs)
        except ClientError as exc:
            raise StorageError(f"cannot read {what}: {exc}") from exc
        item: dict[str, Any] | None = out.get("Item")
        return item

    def mark_sidecar_stale(self, deployment: str, name: str, last_heartbeat: int) -> bool:
        """Note that a sidecar went silent after `last_heartbeat`; True only the first time for that
        silence (and never when it has heartbeated since)."""
        try:
            self._table.update_item(
                Key={"pk": _pk(deployment), "sk": _sidecar_sk(name)},
                UpdateExpression="SET stale_after = :hb",
                ConditionExpression="attribute_exists(pk) AND last_heartbeat = :hb AND "
                                    "(attribute_not_exists(stale_after) OR stale_after <> :hb)",
                ExpressionAttributeValues={":hb": last_heartbeat},
            )
        except ClientError as exc:
            if _failed_condition(exc):
                return False
            raise StorageError(f"cannot mark sidecar {name!r} stale: {exc}") from exc
        return True

    # --- webhooks ------------------------------------------------------------------------

    def put_webhook(self, hook: Webhook, secret: str) -> None:
        item = {"pk": _pk(hook.deployment), "sk": f"WEBHOOK#{hook.webhook_id}", **hook.model_dump(mode="json"),
                "secret": secret}
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
        except ClientError as exc:
            raise StorageError(f"cannot add webhook {hook.webhook_id}: {exc}") from exc

    def list_webhooks(self, deployment: str) -> list[Webhook]:
        items = self._query_prefix(_pk(deployment), "WEBHOOK#")
        return [Webhook.model_validate({k: v for k, v in _strip(i).items() if k != "secret"}) for i in items]

    def get_webhook(self, deployment: str, webhook_id: str) -> tuple[Webhook, str] | None:
        """The webhook and its signing secret, or None when it was removed."""
        item = self._get(_pk(deployment), f"WEBHOOK#{webhook_id}", f"webhook {webhook_id}")
        if not item:
            return None
        fields = _strip(item)
        secret = str(fields.pop("secret"))
        return Webhook.model_validate(fields), secret

    def delete_webhook(self, deployment: str, webhook_id: str) -> Webhook:
        try:
            out = self._table.delete_item(Key={"pk": _pk(deployment), "sk": f"WEBHOOK#{webhook_id}"}, ReturnValues="ALL_OLD")
        except ClientError as exc:
            raise StorageError(f"cannot remove webhook {webhook_id}: {exc}") from exc
        if "Attributes" not in out:
            raise NotFound(f"no webhook {webhook_id!r} in deployment {deployment!r}")
        return Webhook.model_validate({k: v for k, v in _strip(out["Attributes"]).items() if k != "secret"})

    def put_delivery(self, delivery: Delivery, expires_at_s: int) -> None:
        sk = f"DELIVERY#{delivery.at:013d}#{delivery.webhook_id}#{delivery.event_id}#{delivery.attempt}"
        try:
            self._table.put_item(Item={"pk": _pk(delivery.deployment), "sk": sk, "ttl": expires_at_s,
                                       **delivery.model_dump(mode="json")})
        except ClientError as exc:
            raise StorageError(f"cannot record a delivery of webhook {delivery.webhook_id}: {exc}") from exc

    def list_deliveries(self, deployment: str, limit: int) -> list[Delivery]:
        """The last `limit` delivery attempts, newest first."""
        try:
            out = self._table.query(
                KeyConditionExpression="pk = :pk AND begins_with(sk, :p)",
                ExpressionAttributeValues={":pk": _pk(deployment), ":p": "DELIVERY#"},
                ScanIndexForward=False, Limit=limit, ConsistentRead=True,
            )
        except ClientError as exc:
            raise StorageError(f"cannot read the deliveries of {deployment!r}: {exc}") from exc
        return [Delivery.model_validate(_strip(i)) for i in out.get("Items", [])]

    def _query_prefix(self, pk: str, prefix: str, projection: list[str] | None = None) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :p)",
            "ExpressionAttributeValues": {":pk": pk, ":p": prefix},
            "ConsistentRead": True,
        }
        if projection:
            names = {f"#p{i}": name for i, name in enumerate(projection)}
            kwargs.update(ProjectionExpression=", ".join(names), ExpressionAttributeNames=names)
        return self._all_pages(self._table.query, kwargs, f"{prefix.rstrip('#').lower()}s of {pk}")

    def _scan(self, filter_expression: str, values: dict[str, Any], what: str) -> list[dict[str, Any]]:
        kwargs = {"FilterExpression": filter_expression, "ExpressionAttributeValues": values}
        return self._all_pages(self._table.scan, kwargs, what)

    @staticmethod
    def _all_pages(call: Any, kwargs: dict[str, Any], what: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        try:
            while True:
                out = call(**kwargs)
                items.extend(out.get("Items", []))
                if "LastEvaluatedKey" not in out:
                    return items
                kwargs = {**kwargs, "ExclusiveStartKey": out["LastEvaluatedKey"]}
        except ClientError as exc:
            raise StorageError(f"cannot read {what}: {exc}") from exc


def _encode_cursor(deploy_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": deploy_id}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("cursor is not one this API returned") from exc
    if not isinstance(after, str):
        raise InvalidRequest("cursor is not one this API returned")
    return after
