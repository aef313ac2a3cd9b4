"""The authenticator's token cache: a token is read from the store about once per `token_cache_seconds`,
a revocation through this process takes effect at once, and unknown tokens are never kept."""
from __future__ import annotations

from collections.abc import Callable

import pytest

import app as app_module
from chalicelib.auth import Authenticator, hash_token, new_token
from chalicelib.exceptions import Unauthorized
from chalicelib.models import Role, Token
from chalicelib.service import ControlPlane
from chalicelib.settings import get_settings


class Tokens:
    """A stand-in for Store.get_token that counts its reads; `during_read` runs inside the next read."""

    def __init__(self) -> None:
        self.tokens: dict[str, Token] = {}
        self.reads = 0
        self.during_read: Callable[[], None] | None = None

    def add(self, name: str, revoked: bool = False) -> str:
        secret = new_token()
        self.tokens[hash_token(secret)] = Token(
            token_hash=hash_token(secret), name=name, role=Role.VIEWER, deployments=["*"], revoked=revoked
        )
        return secret

    def revoke(self, secret: str) -> None:
        """Revoke in the store only, as another function serving DELETE /tokens would."""
        key = hash_token(secret)
        self.tokens[key] = self.tokens[key].model_copy(update={"revoked": True})

    def get_token(self, token_hash: str) -> Token | None:
        self.reads += 1
        token = self.tokens.get(token_hash)
        if self.during_read is not None:
            action, self.during_read = self.during_read, None
            action()
        return token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def authenticator(tokens: Tokens, clock: Clock, cache_seconds: float = 5) -> Authenticator:
    return Authenticator(tokens, cache_seconds, clock)  # type: ignore[arg-type]


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def test_a_token_is_read_once_while_it_is_kept() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("reader")
    auth = authenticator(tokens, clock)
    for _ in range(3):
        assert auth.authenticate(bearer(secret)).name == "reader"
        clock.now += 1.5
    assert tokens.reads == 1


def test_a_kept_token_is_read_again_once_the_period_is_over_and_a_revocation_elsewhere_then_applies() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("reader")
    auth = authenticator(tokens, clock)
    auth.authenticate(bearer(secret))
    tokens.revoke(secret)
    clock.now += 4.9
    assert auth.authenticate(bearer(secret)).name == "reader", "revoked by another process: still kept here"
    clock.now += 0.1
    with pytest.raises(Unauthorized, match="revoked"):
        auth.authenticate(bearer(secret))
    assert tokens.reads == 2


def test_a_forgotten_token_is_read_again_at_once() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("reader")
    auth = authenticator(tokens, clock)
    auth.authenticate(bearer(secret))
    tokens.revoke(secret)
    auth.forget(hash_token(secret))
    with pytest.raises(Unauthorized, match="revoked"):
        auth.authenticate(bearer(secret))


def test_a_read_that_began_before_a_revocation_is_not_kept() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("reader")
    auth = authenticator(tokens, clock)

    def revoke_meanwhile() -> None:
        tokens.revoke(secret)
        auth.forget(hash_token(secret))

    tokens.during_read = revoke_meanwhile
    assert auth.authenticate(bearer(secret)).name == "reader", "read before the revocation landed"
    with pytest.raises(Unauthorized, match="revoked"):
        auth.authenticate(bearer(secret))


def test_an_unknown_token_is_not_kept_so_it_works_once_it_is_issued() -> None:
    tokens, clock = Tokens(), Clock()
    auth = authenticator(tokens, clock)
    secret = new_token()
    with pytest.raises(Unauthorized, match="unknown"):
        auth.authenticate(bearer(secret))
    tokens.tokens[hash_token(secret)] = Token(token_hash=hash_token(secret), name="late", role=Role.VIEWER, deployments=["*"])
    assert auth.authenticate(bearer(secret)).name == "late"
    assert tokens.reads == 2


def test_a_revoked_token_is_refused_from_the_cache_too() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("old", revoked=True)
    auth = authenticator(tokens, clock)
    for _ in range(2):
        with pytest.raises(Unauthorized, match="revoked"):
            auth.authenticate(bearer(secret))
    assert tokens.reads == 1


def test_with_no_cache_period_every_request_reads_the_token() -> None:
    tokens, clock = Tokens(), Clock()
    secret = tokens.add("reader")
    auth = authenticator(tokens, clock, cache_seconds=0)
    for _ in range(3):
        auth.authenticate(bearer(secret))
    assert tokens.reads == 3


def test_revoking_through_the_control_plane_drops_the_token_from_the_apps_cache(
    control: ControlPlane, deployment: str
) -> None:
    assert get_settings().token_cache_seconds > 0
    secret = control.issue_token("short-lived", Role.VIEWER, [deployment])
    auth = app_module.get_auth()
    assert auth.authenticate(bearer(secret)).name == "short-lived"
    control.revoke_token("short-lived")
    with pytest.raises(Unauthorized, match="revoked"):
        auth.authenticate(bearer(secret))
