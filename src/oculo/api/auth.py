"""Bearer-key authentication against a ring of hashed keys, compared in constant time.

The ring keeps only SHA-256 digests of the keys. A presented key is hashed and compared with
`secrets.compare_digest` against every digest (no early exit on a match), so neither the
comparison nor the loop reveals how much of a key was right. (A database-backed key store with
per-key limits replaces this ring in a later step; the dependency below stays the seam.)
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.requests import Request

from oculo.errors import AuthenticationFailed

KEY_PREFIX = "sk-oculo-"


def new_key() -> str:
    """A fresh random key: `sk-oculo-` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Caller:
    key_id: str  # a non-secret handle for logs and usage: the first 12 hex digits of the hash


class KeyRing:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def verify(self, key: str) -> Caller | None:
        presented = _digest(key)
        match: bytes | None = None
        for digest in self._digests:
            if secrets.compare_digest(presented, digest):
                match = digest
        return Caller(key_id=match.hex()[:12]) if match is not None else None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(request: Request) -> Caller:
    """FastAPI dependency: the caller behind the request's bearer key, or 401."""
    ring: KeyRing = request.app.state.keyring
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header: "
            "'Authorization: Bearer YOUR_KEY'."
        )
    caller = ring.verify(token)
    if caller is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    return caller
