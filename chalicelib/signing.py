"""Signed version announcements: what a sidecar may install without asking the API first.

The functions that publish a version sign a *statement* (the version's identity: deployment
name and immutable id, version number, bundle sha256 and object version, its delta, the limits
it was validated with) with the stack's private key. Sidecars learn the public key over the
authenticated API when they register, verify each announcement against it and install only
what a valid statement names; the rest of a queue message (URLs, numbers outside the statement)
is never trusted. A sidecar holds only the public key, so it cannot forge for others, and
neither can anyone who can publish to the topic.

What is signed is not the statement itself but a short, domain-separated line holding its
sha256 (``signed_message``), so that AWS KMS (which signs at most 4 KiB of raw message) and a
key file sign exactly the same bytes: ECDSA P-256 with SHA-256, DER-encoded signatures.

On AWS the key is a KMS key (``KmsSigner``); on the embedded stack a PEM file in the state
folder (``FileSigner``). Verifying needs only `cryptography`: this module never imports boto3,
and imports cryptography only when a key is loaded (loading its bindings is ~40 ms of a cold
start, and `pip install dagcast` has no cryptography: `--once` never verifies).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM = "ECDSA_P256_SHA256"
_DOMAIN = b"dagcast-announcement:v1:"


def statement_bytes(statement: dict[str, Any]) -> bytes:
    """The canonical bytes of a statement: sorted keys, no spaces, UTF-8."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_message(statement: bytes) -> bytes:
    """What the key signs for a statement: a fixed prefix and the statement's sha256 (hex)."""
    return _DOMAIN + hashlib.sha256(statement).hexdigest().encode()


def key_id_of(public_key_pem: str) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its DER's sha256."""
    from cryptography.hazmat.primitives import serialization

    der = serialization.load_pem_public_key(public_key_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


class SigningError(Exception):
    """The key could not be loaded or could not sign (the message says which step)."""


class Signer(Protocol):
    @property
    def key_id(self) -> str: ...

    @property
    def public_key_pem(self) -> str: ...

    def sign(self, statement: bytes) -> str:
        """The base64 signature of `signed_message(statement)`."""
        ...


class FileSigner:
    """A P-256 private key in a PEM file (mode 0600), created on first use: the embedded stack's key."""

    def __init__(self, path: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        self.path = path
        self._key = self._load_or_create()
        self._public = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self._id = key_id_of(self._public)

    def _load_or_create(self) -> ec.EllipticCurvePrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A unique temp file, published with link(): it fails when the key exists, so of two processes or
            # threads making it at once, the first one's key is the key, and the other loads that one.
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    return self._load_or_create()
            except OSError as exc:
                raise SigningError(f"cannot create the signing key {self.path}: {exc}") from exc
            finally:
                tmp.unlink(missing_ok=True)
            return key
        except (OSError, ValueError) as exc:
            raise SigningError(f"cannot load the signing key {self.path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SigningError(f"the signing key {self.path} is not a P-256 key")
        return key

    @property
    def key_id(self) -> str:
        return self._id

    @property
    def public_key_pem(self) -> str:
        return self._public

    def sign(self, statement: bytes) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        signature = self._key.sign(signed_message(statement), ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


class KmsSigner:
    """An asymmetric AWS KMS key (ECC_NIST_P256, SIGN_VERIFY). Takes a boto3 KMS client."""

    def __init__(self, kms: Any, key_arn: str) -> None:
        self._kms = kms
        self._key_arn = key_arn
        self._public: str | None = None
        self._id: str | None = None

    def _load_public(self) -> str:
        from cryptography.hazmat.primitives import serialization

        if self._public is None:
            try:
                der = self._kms.get_public_key(KeyId=self._key_arn)["PublicKey"]
            except Exception as exc:  # noqa: BLE001 - botocore's errors, mapped to ours with the step named
                raise SigningError(f"cannot read the public key of {self._key_arn}: {exc}") from exc
            key = serialization.load_der_public_key(der)
            self._public = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            self._id = key_id_of(self._public)
        return self._public

    @property
    def key_id(self) -> str:
        self._load_public()
        assert self._id is not None
        return self._id

    @property
    def public_key_pem(self) -> str:
        return self._load_public()

    def sign(self, statement: bytes) -> str:
        try:
            out = self._kms.sign(
                KeyId=self._key_arn, Message=signed_message(statement), MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
            )
        except Exception as exc:  # noqa: BLE001 - botocore's errors, mapped to ours with the step named
            raise SigningError(f"cannot sign with {self._key_arn}: {exc}") from exc
        return base64.b64encode(out["Signature"]).decode()


class Verifier:
    """Checks signatures against the public keys a sidecar learnt from the API (by key id)."""

    def __init__(self, public_keys: dict[str, str]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for key_id, pem in public_keys.items():
            key = serialization.load_pem_public_key(pem.encode())
            if isinstance(key, ec.EllipticCurvePublicKey):
                self._keys[key_id] = key

    def knows(self, key_id: str) -> bool:
        return key_id in self._keys

    def verify(self, key_id: str, statement: bytes, signature_b64: str) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            signature = base64.b64decode(signature_b64, validate=True)
            key.verify(signature, signed_message(statement), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True
