"""`python -m shared.devtoken <user_id>`: a signed development sign-in token and the portal URL that uses it.

Signs HS256 with `USER_TOKEN_SECRET` (the development default unless set), `sub` = the user id, valid
for `--hours` (default 24). Used by `make token USER=alice`.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning

# The development secret is short; production refuses to start with it (shared.settings).
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

DEFAULT_SECRET = "dev-user-token-secret"


def make_token(user_id: str, secret: str | None = None, ttl_seconds: int = 24 * 3600) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(
        claims, secret or os.environ.get("USER_TOKEN_SECRET") or DEFAULT_SECRET, algorithm="HS256"
    )


def portal_url(user_id: str, base_url: str | None = None) -> str:
    """The portal, already signed in as `user_id` (the token travels in the fragment, never to a server log)."""
    base = base_url or os.environ.get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000"
    return f"{base.rstrip('/')}/#token={make_token(user_id)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.devtoken", description=__doc__.splitlines()[0])
    parser.add_argument("user_id", nargs="?", default="alice")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument(
        "--base-url",
        default=os.environ.get("PUBLIC_BASE_URL")
        or f"http://127.0.0.1:{os.environ.get('PROXY_PORT', '8000')}",
    )
    args = parser.parse_args(argv)
    token = make_token(args.user_id, ttl_seconds=int(args.hours * 3600))
    print(token)
    print(f"{args.base_url.rstrip('/')}/#token={token}")


if __name__ == "__main__":
    main()
