"""Who is calling (CONTRACT §6.1), decided from the Authorization header.

- The internal token plus `X-User-Id`: a trusted backend acting for that user.
- A JWT (three dot-separated segments starting `eyJ`) signed HS256 with `USER_TOKEN_SECRET`: the user
  `sub`; `exp` is enforced when present.
- Any other bearer value: a user API key, verified at credits and cached in-process for
  `API_KEY_CACHE_SECONDS` (so a revoked key stops working within that time), unknown keys for
  `API_KEY_NEGATIVE_CACHE_SECONDS`. Concurrent first uses of one key share a single verification.

Failures are 401: `invalid_api_key` when an API key was presented on the OpenAI endpoints and is
unknown or revoked; `unauthorized` for everything else (no or malformed header, internal token
without `X-User-Id`, bad or expired JWT, a credential of the wrong kind for the endpoint).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import warnings
from dataclasses import dataclass
from enum import Enum

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from shared.errors import InvalidApiKey, Unauthorized
from shared.logs import note_request

from .downstream import CreditsClient, KeyOwner

# The development secret is short; production refuses to start with it (shared.settings).
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

MAX_USER_ID_LENGTH = 200
_CACHE_LIMIT = 50_000


class CallerKind(Enum):
    INTERNAL = "internal"
    USER_TOKEN = "jwt"
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    kind: CallerKind
    api_access_unlocked: bool = True
    key_id: str | None = None

    def __post_init__(self) -> None:
        note_request(user=self.user_id)  # for the access log line


def parse_bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def valid_user_id(user_id: str | None) -> str:
    if not user_id or not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH:
        raise Unauthorized("The internal token needs an X-User-Id header naming the user.")
    return user_id.strip()


class Authenticator:
    def __init__(
        self,
        credits: CreditsClient,
        *,
        internal_token: str,
        user_token_secret: str,
        positive_ttl: float,
        negative_ttl: float,
    ) -> None:
        self._credits = credits
        self._internal_token = internal_token.encode()
        self._secret = user_token_secret
        self._positive_ttl = positive_ttl
        self._negative_ttl = negative_ttl
        # sha256(key) → (expires at, owner or None for "unknown key")
        self._keys: dict[bytes, tuple[float, KeyOwner | None]] = {}
        self._inflight: dict[bytes, asyncio.Future[KeyOwner | None]] = {}

    def is_internal(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._internal_token)

    def user_from_jwt(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["sub"]}, leeway=5
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The sign-in token has expired; sign in again.") from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid sign-in token.") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_USER_ID_LENGTH:
            raise Unauthorized("Invalid sign-in token.")
        return sub

    async def for_api(self, authorization: str | None, user_id_header: str | None) -> Caller:
        """OpenAI-compatible endpoints: an API key, or the internal token with X-User-Id."""
        token = parse_bearer(authorization)
        if token is None:
            raise Unauthorized("Missing credentials: send Authorization: Bearer <API key>.")
        if self.is_internal(token):
            return Caller(valid_user_id(user_id_header), CallerKind.INTERNAL)
        if looks_like_jwt(token):
            raise Unauthorized("Sign-in tokens are for the account endpoints; use an API key here.")
        owner = await self.verify_key(token)
        if owner is None:
            raise InvalidApiKey("Invalid API key.")
        return Caller(owner.user_id, CallerKind.API_KEY, owner.api_access_unlocked, owner.key_id)

    def for_account(self, authorization: str | None, user_id_header: str | None) -> Caller:
        """Account endpoints: a user JWT, or the internal token with X-User-Id."""
        token = parse_bearer(authorization)
        if token is None:
            raise Unauthorized("Missing credentials: sign in, or send Authorization: Bearer <token>.")
        if self.is_internal(token):
            return Caller(valid_user_id(user_id_header), CallerKind.INTERNAL)
        if looks_like_jwt(token):
            return Caller(self.user_from_jwt(token), CallerKind.USER_TOKEN)
        raise Unauthorized("Account endpoints need a sign-in token.")

    async def verify_key(self, key: str) -> KeyOwner | None:
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyOwner | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            owner = await self._credits.verify_key(key)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved here so a lone caller does not log "never retrieved"
            raise
        else:
            future.set_result(owner)
            if len(self._keys) >= _CACHE_LIMIT:
                self._keys.clear()
            ttl = self._positive_ttl if owner is not None else self._negative_ttl
            self._keys[digest] = (time.monotonic() + ttl, owner)
            return owner
        finally:
            self._inflight.pop(digest, None)
