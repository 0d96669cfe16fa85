"""Development sign-in: `python -m shared.devtoken <user_id>` prints a user JWT and a portal URL.

The token is signed with USER_TOKEN_SECRET (HS256, `sub` = user id), exactly what the proxy accepts.
"""

from __future__ import annotations

import os
import sys
import time

import jwt

DEFAULT_SECRET = "dev-user-token-secret"


def mint_user_token(user_id: str, secret: str | None = None, ttl_seconds: int = 7 * 24 * 3600) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(
        claims, secret or os.environ.get("USER_TOKEN_SECRET", DEFAULT_SECRET), algorithm="HS256"
    )


def portal_url(user_id: str, base_url: str | None = None) -> str:
    base = (base_url or os.environ.get("PORTAL_URL") or "http://127.0.0.1:8000/").rstrip("/")
    return f"{base}/#token={mint_user_token(user_id)}"


def main(argv: list[str]) -> int:
    user_id = argv[1] if len(argv) > 1 and argv[1] else "demo-user"
    token = mint_user_token(user_id)
    print(f"user:   {user_id}")
    print(f"token:  {token}")
    print(f"portal: {portal_url(user_id)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
