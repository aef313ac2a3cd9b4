"""Bearer tokens: generation, hashing, and what each role may do."""
from __future__ import annotations

import hashlib
import re
import secrets
from enum import Enum

from chalicelib.exceptions import Forbidden, Unauthorized
from chalicelib.models import Role, Token
from chalicelib.store import Store

TOKEN_PREFIX = "dgc_"
_TOKEN_RE = re.compile(r"^dgc_[A-Za-z0-9_-]{32,64}$")


class Permission(str, Enum):
    READ = "read"          # deployments, deploys, sidecars
    DEPLOY = "deploy"      # create and cancel deploys
    SYNC = "sync"          # register, heartbeat, download bundles
    ADMIN = "admin"        # settings, tokens, rollback, deployments


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.DEPLOYER: frozenset({Permission.READ, Permission.DEPLOY}),
    Role.SIDECAR: frozenset({Permission.READ, Permission.SYNC}),
    Role.ADMIN: frozenset(Permission),
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer ...` header, or Unauthorized."""
    if not header:
        raise Unauthorized("missing Authorization: Bearer token")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not _TOKEN_RE.match(value):
        raise Unauthorized("malformed Authorization header: expected 'Bearer dgc_...'")
    return value


class Authenticator:
    """Resolves tokens to principals and checks permissions."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def authenticate(self, header: str | None) -> Token:
        token = self._store.get_token(hash_token(bearer(header)))
        if token is None:
            raise Unauthorized("unknown token")
        if token.revoked:
            raise Unauthorized("token has been revoked")
        return token

    def authorize(self, header: str | None, need: Permission, deployment: str | None) -> Token:
        token = self.authenticate(header)
        if need not in ROLE_PERMISSIONS[token.role]:
            raise Forbidden(f"role {token.role.value!r} may not {need.value}")
        if deployment is not None and not token.allows(deployment):
            raise Forbidden(f"token {token.name!r} is not scoped to deployment {deployment!r}")
        if deployment is None and need is Permission.ADMIN and "*" not in token.deployments:
            # Tokens and new deployments span the account: an admin of one deployment must not
            # be able to mint a token for all of them.
            raise Forbidden(f"token {token.name!r} is scoped to some deployments; this needs an admin token for all")
        return token
