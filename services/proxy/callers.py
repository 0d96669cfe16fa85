"""Who is calling (docs/api.md, Proxy), decided from the Authorization header.

- The internal token plus `X-User-Id`: a trusted backend acting for that user.
- A JWT (three dot-separated segments starting `eyJ`) signed HS256 with `USER_TOKEN_SECRET`: the user
  `sub`; `exp` is required and enforced (a token without it would never expire).
- Any other bearer value: a user API key. One that cannot be a key (not credits' key shape) is
  refused here; the others are verified at credits and cached in-process for
  `API_KEY_CACHE_SECONDS` (so a revoked key stops working within that time), unknown ones for
  `API_KEY_NEGATIVE_CACHE_SECONDS` in a bounded cache of their own (a flood of made-up keys
  neither grows memory nor pushes known keys out). Concurrent first uses of one key share a
  single verification.

Failures are 401: `invalid_api_key` when an API key was presented and is unknown or revoked;
`unauthorized` for everything else (no or malformed header, internal token without `X-User-Id`,
bad or expired JWT, a credential of the wrong kind for the endpoint). An API key on an account
endpoint other than the reads is 403 `forbidden`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from shared.auth import has_api_key_shape
from shared.errors import Forbidden, InvalidApiKey, Unauthorized
from shared.logs import note_request

from .downstream import CreditsClient, KeyOwner

# The development secret is short; production refuses to start with it (shared.settings).
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

MAX_USER_ID_LENGTH = 200
_CACHE_LIMIT = 50_000
# Unknown keys remembered at most; the oldest are forgotten first.
REFUSALS_LIMIT = 10_000


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
        # sha256(key) → (expires at, owner) for keys credits confirmed; only real keys get here.
        self._keys: dict[bytes, tuple[float, KeyOwner]] = {}
        # sha256(key) → expires at, for keys credits refused, oldest first.
        self._refused: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[KeyOwner | None]] = {}

    def is_internal(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._internal_token)

    def user_from_jwt(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}, leeway=5
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

    async def for_account(
        self, authorization: str | None, user_id_header: str | None, *, allow_api_key: bool = False
    ) -> Caller:
        """Account endpoints: a user JWT, or the internal token with X-User-Id; where `allow_api_key`
        (the reads of docs/api.md, Proxy) also a user API key, which elsewhere is refused with 403."""
        token = parse_bearer(authorization)
        if token is None:
            raise Unauthorized("Missing credentials: sign in, or send Authorization: Bearer <token>.")
        if self.is_internal(token):
            return Caller(valid_user_id(user_id_header), CallerKind.INTERNAL)
        if looks_like_jwt(token):
            return Caller(self.user_from_jwt(token), CallerKind.USER_TOKEN)
        owner = await self.verify_key(token)
        if owner is None:
            raise InvalidApiKey("Invalid API key.")
        if not allow_api_key:
            raise Forbidden(
                "An API key may only read the account, its transactions and purchases; "
                "managing API keys and buying credits need a sign-in token."
            )
        return Caller(owner.user_id, CallerKind.API_KEY, owner.api_access_unlocked, owner.key_id)

    async def verify_key(self, key: str) -> KeyOwner | None:
        if not has_api_key_shape(key):
            return None
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        refused_until = self._refused.get(digest)
        if refused_until is not None:
            if refused_until > now:
                return None
            del self._refused[digest]
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
            if owner is None:
                self._refused[digest] = time.monotonic() + self._negative_ttl
                self._refused.move_to_end(digest)
                while len(self._refused) > REFUSALS_LIMIT:
                    self._refused.popitem(last=False)
            else:
                if len(self._keys) >= _CACHE_LIMIT:
                    self._keys.clear()
                self._keys[digest] = (time.monotonic() + self._positive_ttl, owner)
            return owner
        finally:
            self._inflight.pop(digest, None)
