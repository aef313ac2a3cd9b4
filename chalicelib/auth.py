"""Bearer tokens: generation, hashing, and what each role may do."""
from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from enum import Enum

from chalicelib.exceptions import Forbidden, Unauthorized
from chalicelib.models import Role, Token
from chalicelib.store import Store

TOKEN_PREFIX = "dgc_"
# The shape of a token: anything of that shape is looked up (and is "unknown" when no token has its hash),
# so a token that was cut short or has a character too many is told apart from a wrong header.
_TOKEN_RE = re.compile(r"^dgc_[A-Za-z0-9_-]{1,200}$")
_MAX_CACHED_TOKENS = 1024


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
    """Resolves tokens to principals and checks permissions.

    A token read from the store is kept for `cache_seconds` (like API Gateway's authorizer cache):
    a warm function then reads each token about once per period instead of once per request. A token
    revoked through this process is forgotten at once (`forget`); one revoked through another process
    (another warm function) keeps working here until its entry is older than `cache_seconds`. Unknown
    tokens are never kept, so a token issued elsewhere works here on its first request.
    """

    def __init__(self, store: Store, cache_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, Token]] = {}  # token hash -> (kept until, token)
        self._lock = threading.Lock()
        self._forgets = 0  # a read that began before a forget() may be stale: it is not kept

    def authenticate(self, header: str | None) -> Token:
        token = self._token(hash_token(bearer(header)))
        if token is None:
            raise Unauthorized("unknown token")
        if token.revoked:
            raise Unauthorized("token has been revoked")
        return token

    def forget(self, token_hash: str) -> None:
        """Drop a token from the cache: it was revoked or changed, read it again next time."""
        with self._lock:
            self._cache.pop(token_hash, None)
            self._forgets += 1

    def _token(self, token_hash: str) -> Token | None:
        if self._cache_seconds <= 0:
            return self._store.get_token(token_hash)
        now = self._clock()
        with self._lock:
            kept = self._cache.get(token_hash)
            if kept is not None and now < kept[0]:
                return kept[1]
            forgets = self._forgets
        token = self._store.get_token(token_hash)
        if token is not None:
            with self._lock:
                if forgets == self._forgets:
                    if len(self._cache) >= _MAX_CACHED_TOKENS:
                        self._cache = {h: e for h, e in self._cache.items() if now < e[0]}
                    if len(self._cache) < _MAX_CACHED_TOKENS:
                        self._cache[token_hash] = (now + self._cache_seconds, token)
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
