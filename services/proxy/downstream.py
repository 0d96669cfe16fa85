"""Adapters for our own services: credits (accounts, reservations, API keys) and billing (packs,
checkout, purchases, the Stripe webhook). Calls carry the internal token and the request id.

Their errors keep their envelope and status (`DownstreamError`); a service that cannot be reached,
or answers garbage or 5xx, becomes 503 `service_unavailable`, so nothing is served without credits
having agreed to it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from shared.errors import AppError, ServiceUnavailable, error_body
from shared.logs import current_request_id

from .httpclient import ConnectFailed, HttpPool, Response, TransportError


class DownstreamError(AppError):
    """An error answer from credits or billing, passed on with its status and envelope."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status_code = status
        self.code = str(error.get("code") or "error")
        self.type = str(error.get("type") or "api_error")
        super().__init__(str(error.get("message") or "Request failed."))


class InternalClient:
    """JSON over the lean HTTP pool, with the internal token and the request id on every call.

    `base_url` may list several processes of the service, comma-separated (docs/configuration.md): calls take
    them in turn, and a call that cannot connect to one goes to the next. A process that failed is
    passed over for `down_seconds` (while another one answers), so a dead process costs a failed
    connect about once per `down_seconds`, not on every call. Only a failed connect moves a call on:
    the request never left, so no call runs twice. A connection lost after the request was sent, or a
    timeout, is the caller's to retry (settlement batches are idempotent; a reserve that may have run
    simply expires at credits)."""

    down_seconds = 1.0

    def __init__(
        self, name: str, base_url: str, internal_token: str, timeout: float, max_connections: int = 100
    ) -> None:
        self.name = name
        urls = [u.strip() for u in base_url.split(",") if u.strip()]
        if not urls:
            raise ValueError(f"no URL for the {name} service")
        self.pools = [
            HttpPool(
                url,
                max_connections=max_connections,
                default_headers=[(b"authorization", f"Bearer {internal_token}".encode())],
            )
            for url in urls
        ]
        self._down_until = [0.0] * len(self.pools)
        self._next = 0
        self.timeout = timeout

    @property
    def pool(self) -> HttpPool:
        """The first process (for callers that need one origin)."""
        return self.pools[0]

    def _order(self) -> list[int]:
        """The processes to try for one call: the next in turn first, those marked down last."""
        count = len(self.pools)
        if count == 1:
            return [0]
        start = self._next
        self._next = (start + 1) % count
        turn = [(start + i) % count for i in range(count)]
        now = time.monotonic()
        return [i for i in turn if self._down_until[i] <= now] + [
            i for i in turn if self._down_until[i] > now
        ]

    def _headers(self, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        rid = current_request_id()
        headers = [(b"x-request-id", rid.encode())] if rid else []
        return headers + (extra or [])

    async def call(
        self,
        method: bytes,
        path: str,
        payload: Any = None,
        *,
        raw_body: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> Response:
        extra = self._headers(headers)
        body = raw_body
        if payload is not None:
            body = orjson.dumps(payload)
            extra.append((b"content-type", b"application/json"))
        target = path.encode()
        try:
            async with asyncio.timeout(self.timeout):
                order = self._order()
                for n, i in enumerate(order):
                    try:
                        response = await self.pools[i].request(method, target, headers=extra, body=body)
                    except ConnectFailed:
                        self._down_until[i] = time.monotonic() + self.down_seconds
                        if n == len(order) - 1:
                            raise
                        continue
                    except TransportError:
                        self._down_until[i] = time.monotonic() + self.down_seconds
                        raise
                    self._down_until[i] = 0.0
                    return response
                raise AssertionError("unreachable")
        except (TransportError, TimeoutError) as exc:
            raise ServiceUnavailable(f"The {self.name} service is unavailable; try again shortly.") from exc

    async def json(self, method: bytes, path: str, payload: Any = None) -> Any:
        response = await self.call(method, path, payload)
        return self.decode(response)

    def decode(self, response: Response) -> Any:
        try:
            data = orjson.loads(response.body) if response.body else None
        except orjson.JSONDecodeError:
            data = None
        if 200 <= response.status < 300:
            if data is None:
                raise ServiceUnavailable(f"The {self.name} service answered without a body.")
            return data
        if response.status >= 500 or not isinstance(data, dict) or "error" not in data:
            raise ServiceUnavailable(f"The {self.name} service failed; try again shortly.")
        raise DownstreamError(response.status, data)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    amount: int
    credits_remaining: int


@dataclass(frozen=True, slots=True)
class KeyOwner:
    user_id: str
    key_id: str
    api_access_unlocked: bool


def _seg(value: str) -> str:
    return quote(value, safe="")


class CreditsClient(InternalClient):
    def __init__(
        self, base_url: str, internal_token: str, timeout: float, max_connections: int = 100
    ) -> None:
        super().__init__("credits", base_url, internal_token, timeout, max_connections)
        self._known_users: set[str] = set()

    # --- reservations (the hot path) ---

    async def reserve(self, user_id: str, amount: int, idempotency_key: str | None = None) -> Reservation:
        payload: dict[str, Any] = {"user_id": user_id, "amount": amount}
        if idempotency_key:
            payload["idempotency_key"] = idempotency_key
        data = await self.json(b"POST", "/v1/reservations", payload)
        return Reservation(str(data["reservation_id"]), int(data["amount"]), int(data["credits_remaining"]))

    async def commit(
        self,
        reservation_id: str,
        amount: int,
        *,
        overage: int = 0,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Commits `amount` (at most the hold) and `overage` credits beyond it (what the balance has,
        the rest recorded as owed), with the usage `details` of the ledger entry."""
        payload: dict[str, Any] = {"amount": amount}
        if overage > 0:
            payload["overage"] = overage
        if details is not None:
            payload["details"] = details
        data: dict[str, Any] = await self.json(
            b"POST", f"/v1/reservations/{_seg(reservation_id)}/commit", payload
        )
        return data

    async def settle_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Many commits/releases in one call; see settlements.py."""
        data: dict[str, Any] = await self.json(b"POST", "/v1/reservations/batch", {"items": items})
        return data

    # --- accounts ---

    async def ensure_user(self, user_id: str) -> dict[str, Any] | None:
        """Creates the account on first sight (idempotent at credits); returns it when it was fetched."""
        if user_id in self._known_users:
            return None
        account: dict[str, Any] = await self.json(b"POST", "/v1/users", {"user_id": user_id})
        self._known_users.add(user_id)
        return account

    async def account(self, user_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.json(b"GET", f"/v1/users/{_seg(user_id)}/credits")
        return data

    async def transactions(self, user_id: str, query: dict[str, str]) -> Any:
        qs = f"?{urlencode(query)}" if query else ""
        return await self.json(b"GET", f"/v1/users/{_seg(user_id)}/transactions{qs}")

    # --- API keys ---

    async def verify_key(self, key: str) -> KeyOwner | None:
        response = await self.call(b"POST", "/v1/api-keys/verify", {"key": key})
        if response.status == 401:
            return None
        data = self.decode(response)
        return KeyOwner(str(data["user_id"]), str(data["key_id"]), bool(data["api_access_unlocked"]))

    async def create_key(self, user_id: str, payload: dict[str, Any]) -> Any:
        return await self.json(b"POST", f"/v1/users/{_seg(user_id)}/api-keys", payload)

    async def list_keys(self, user_id: str) -> Any:
        return await self.json(b"GET", f"/v1/users/{_seg(user_id)}/api-keys")

    async def revoke_key(self, user_id: str, key_id: str) -> Response:
        response = await self.call(b"DELETE", f"/v1/users/{_seg(user_id)}/api-keys/{_seg(key_id)}")
        if response.status >= 400:
            self.decode(response)
        return response


class BillingClient(InternalClient):
    def __init__(self, base_url: str, internal_token: str, timeout: float, packs_ttl: float) -> None:
        super().__init__("billing", base_url, internal_token, timeout)
        self._packs: tuple[float, Any] | None = None
        self._packs_ttl = packs_ttl

    async def packs(self) -> Any:
        cached = self._packs
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        data = await self.json(b"GET", "/v1/packs")
        self._packs = (now + self._packs_ttl, data)
        return data

    async def unlock_hint(self) -> str:
        """The message of a 403 `api_access_locked`: which pack (the cheapest that does) unlocks the API."""
        try:
            packs = (await self.packs()).get("data", [])
        except AppError:
            packs = []
        unlocking = [p for p in packs if isinstance(p, dict) and p.get("unlocks_api")]
        if not unlocking:
            return "API access is locked. Buy a credit pack that unlocks the API."
        cheapest = min(unlocking, key=lambda p: int(p.get("price_cents", 0)))
        price = int(cheapest.get("price_cents", 0)) / 100
        currency = str(cheapest.get("currency", "usd")).upper()
        symbol = "$" if currency == "USD" else f"{currency} "
        return (
            f"API access is locked. Buy the {cheapest.get('name', cheapest.get('id'))} pack "
            f"('{cheapest.get('id')}', {symbol}{price:.2f}, {cheapest.get('credits')} credits) or a larger "
            "pack that unlocks the API."
        )

    async def checkout(self, payload: dict[str, Any]) -> Any:
        return await self.json(b"POST", "/v1/checkout/sessions", payload)

    async def purchases(self, user_id: str) -> Any:
        return await self.json(b"GET", f"/v1/users/{_seg(user_id)}/purchases")

    async def forward_webhook(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        return await self.call(b"POST", "/v1/webhooks/stripe", raw_body=body, headers=headers)


__all__ = [
    "BillingClient",
    "CreditsClient",
    "DownstreamError",
    "KeyOwner",
    "Reservation",
    "ServiceUnavailable",
    "error_body",
]
