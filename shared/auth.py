"""Bearer-token checks for internal (service-to-service) and admin endpoints."""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from shared.errors import Forbidden, Unauthorized

# User API keys: the prefix and 24 random bytes in URL-safe base64 (32 characters). Credits mints
# them; the proxy refuses any bearer value of another shape without asking credits.
API_KEY_PREFIX = "cp_"
_API_KEY_SHAPE = re.compile(r"cp_[A-Za-z0-9_-]{32}")


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(24)


def has_api_key_shape(token: str) -> bool:
    return _API_KEY_SHAPE.fullmatch(token) is not None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_token(expected: Callable[[Request], str], *, role: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency: 401 without a bearer token, 403 with a token that is not the expected one."""

    async def check(request: Request) -> None:
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(f"This endpoint needs Authorization: Bearer <{role} token>.")
        if not token_matches(token, expected(request)):
            raise Unauthorized(f"Invalid {role} token.")

    return check


def internal_only() -> Callable[[Request], Awaitable[None]]:
    return require_token(lambda r: r.app.state.settings.internal_token, role="internal")


def admin_only() -> Callable[[Request], Awaitable[None]]:
    return require_token(lambda r: r.app.state.settings.admin_token, role="admin")


__all__ = [
    "API_KEY_PREFIX",
    "Forbidden",
    "admin_only",
    "bearer_token",
    "has_api_key_shape",
    "internal_only",
    "new_api_key",
    "require_token",
    "token_matches",
]
