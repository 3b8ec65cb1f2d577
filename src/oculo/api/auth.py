"""Bearer-key authentication: configured keys (`OCULO_API_KEYS`) first, then the key store.

Neither a key nor any part of it is ever echoed in an error or written to a log: a wrong key
gets the same message whatever it was.
"""

from __future__ import annotations

from starlette.requests import Request

from oculo.accounts.keys import Account, KeyRing, KeyStore
from oculo.errors import AuthenticationFailed


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: Request) -> Account:
    """FastAPI dependency: the account behind the request's bearer key, or 401."""
    token = bearer_token(request)
    if token is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in the Authorization header: "
            "'Authorization: Bearer YOUR_KEY'."
        )
    ring: KeyRing = request.app.state.keyring
    keys: KeyStore = request.app.state.keys
    account = ring.verify(token) or await keys.verify(token)
    if account is None:
        raise AuthenticationFailed("Incorrect, revoked or expired API key provided.")
    return account
