"""`CreditProxyClient`: the Python client for host-app backends.

A host app's backend acts for its users with the internal token (docs/api.md, Proxy): it sends them to
checkout, checks their credits before generating, and calls the gateway's OpenAI-compatible endpoints
on their behalf. Admin calls (grants, analytics) need the admin token and the credits service URL.

    async with CreditProxyClient(gateway_url="http://127.0.0.1:8000", internal_token=...) as cp:
        account = await cp.get_user_credits("alice")
        if account["credits_remaining"] < 1:
            url = await cp.purchase_credits("alice", "standard")   # send the user here
        try:
            reply = await cp.chat("alice", [{"role": "user", "content": "hi"}], model="gpt-4o-mini")
        except InsufficientCredits as exc:
            print(exc.purchase_hint)

`SyncCreditProxyClient` offers the same calls for synchronous code.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import httpx
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.images_response import ImagesResponse


class CreditProxyError(Exception):
    """A call failed; `status` and `code` come from the contract's error envelope."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class InsufficientCredits(CreditProxyError):
    """The user cannot afford the call. `purchase_hint` says what to buy; `packs` lists the catalog."""

    def __init__(self, message: str, packs: list[dict[str, Any]] | None = None) -> None:
        super().__init__(402, "insufficient_credits", message)
        self.packs = packs or []
        cheapest = min(self.packs, key=lambda p: p["price_cents"], default=None)
        self.purchase_hint = (
            f"Buy the {cheapest['name']} pack ({cheapest['credits']} credits) with purchase_credits(user_id, "
            f"'{cheapest['id']}')."
            if cheapest
            else "Buy a credit pack with purchase_credits(user_id, pack)."
        )


UNAVAILABLE = "service_unavailable"


def _unavailable(exc: Exception) -> CreditProxyError:
    """A network failure or timeout reaching the gateway or credits, as the client's own error type."""
    return CreditProxyError(503, UNAVAILABLE, f"Credit Proxy is unreachable: {exc.__class__.__name__}: {exc}")


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except Exception:
        code, message = "error", response.text[:200]
    raise CreditProxyError(response.status_code, code, message)


class CreditProxyClient:
    def __init__(
        self,
        gateway_url: str = "http://127.0.0.1:8000",
        internal_token: str = "dev-internal-token",
        *,
        credits_url: str = "http://127.0.0.1:8002",
        admin_token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._gateway = gateway_url.rstrip("/")
        self._credits = credits_url.rstrip("/")
        self._internal_token = internal_token
        self._admin_token = admin_token
        self._http = httpx.AsyncClient(timeout=timeout)
        self._openai = openai.AsyncOpenAI(
            base_url=self._gateway + "/v1", api_key=internal_token, timeout=timeout, max_retries=0
        )

    async def __aenter__(self) -> CreditProxyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._openai.close()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(exc) from exc
        _raise_for(response)
        return response

    # -- account and purchases -------------------------------------------------------------------
    def _as_user(self, user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._internal_token}", "X-User-Id": user_id}

    async def get_credit_packages(self) -> list[dict[str, Any]]:
        r = await self._request("GET", f"{self._gateway}/v1/packs")
        return list(r.json()["data"])

    async def get_user_credits(self, user_id: str) -> dict[str, Any]:
        """The account (docs/api.md, Credits), created with its signup credits on first use."""
        r = await self._request("GET", f"{self._gateway}/v1/account", headers=self._as_user(user_id))
        return dict(r.json())

    async def purchase_credits(self, user_id: str, pack: str) -> str:
        """Starts a Stripe Checkout for `pack` and returns the URL to send the user to."""
        r = await self._request(
            "POST",
            f"{self._gateway}/v1/account/checkout",
            json={"pack": pack},
            headers=self._as_user(user_id),
        )
        return str(r.json()["url"])

    # -- admin -----------------------------------------------------------------------------------
    def _admin(self) -> dict[str, str]:
        if not self._admin_token:
            raise CreditProxyError(401, "unauthorized", "admin_token is required for admin calls")
        return {"Authorization": f"Bearer {self._admin_token}"}

    async def add_credits(self, user_id: str, credits: int, reason: str) -> dict[str, Any]:
        r = await self._request(
            "POST",
            f"{self._credits}/v1/admin/users/{user_id}/grants",
            json={"credits": credits, "reason": reason},
            headers=self._admin(),
        )
        return dict(r.json())

    async def get_analytics(self) -> dict[str, Any]:
        r = await self._request("GET", f"{self._credits}/v1/admin/analytics", headers=self._admin())
        return dict(r.json())

    # -- AI calls on behalf of a user --------------------------------------------------------------
    async def _translate(self, exc: openai.APIStatusError) -> CreditProxyError:
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        code = str(err.get("code") or "error") if isinstance(err, dict) else "error"
        message = str(err.get("message") or exc.message) if isinstance(err, dict) else exc.message
        if exc.status_code == 402:
            try:
                packs = await self.get_credit_packages()
            except CreditProxyError:
                packs = []
            return InsufficientCredits(message, packs)
        return CreditProxyError(exc.status_code, code, message)

    async def chat(
        self, user_id: str, messages: list[dict[str, Any]], *, model: str = "gpt-4o-mini", **params: Any
    ) -> ChatCompletion:
        try:
            completion = await self._openai.chat.completions.create(
                model=model, messages=cast(Any, messages), extra_headers={"X-User-Id": user_id}, **params
            )
            return cast(ChatCompletion, completion)
        except openai.APIStatusError as exc:
            raise await self._translate(exc) from exc
        except openai.APIConnectionError as exc:  # also timeouts
            raise _unavailable(exc) from exc

    async def chat_stream(
        self, user_id: str, messages: list[dict[str, Any]], *, model: str = "gpt-4o-mini", **params: Any
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Yields the completion's chunks as they arrive (`async for chunk in cp.chat_stream(...)`).
        Use `contextlib.aclosing(...)` to stop early and release the connection at once."""
        try:
            stream = await self._openai.chat.completions.create(
                model=model,
                messages=cast(Any, messages),
                stream=True,
                extra_headers={"X-User-Id": user_id},
                **params,
            )
            # Closing the stream when the caller stops early ends the request; the proxy charges what it served.
            async with stream:
                async for chunk in stream:
                    yield chunk
        except openai.APIStatusError as exc:
            raise await self._translate(exc) from exc
        except openai.APIConnectionError as exc:  # also timeouts
            raise _unavailable(exc) from exc

    async def generate_image(
        self, user_id: str, prompt: str, *, model: str = "dall-e-3", **params: Any
    ) -> ImagesResponse:
        try:
            images = await self._openai.images.generate(
                model=model, prompt=prompt, extra_headers={"X-User-Id": user_id}, **params
            )
            return cast(ImagesResponse, images)
        except openai.APIStatusError as exc:
            raise await self._translate(exc) from exc
        except openai.APIConnectionError as exc:  # also timeouts
            raise _unavailable(exc) from exc


class SyncCreditProxyClient:
    """The same calls for synchronous code, run on a private event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = CreditProxyClient(*args, **kwargs)

    def __enter__(self) -> SyncCreditProxyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._loop.run_until_complete(self._client.aclose())
        else:
            # Closing needs no service, so it may run on a helper thread rather than fail.
            closer = threading.Thread(target=self._loop.run_until_complete, args=(self._client.aclose(),))
            closer.start()
            closer.join()
        self._loop.close()

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(coro)
        coro.close()
        raise RuntimeError(
            "SyncCreditProxyClient cannot run on a thread with a running event loop: use CreditProxyClient "
            "there, or call the sync client through asyncio.to_thread(...)."
        )

    def get_credit_packages(self) -> list[dict[str, Any]]:
        return self._run(self._client.get_credit_packages())  # type: ignore[no-any-return]

    def get_user_credits(self, user_id: str) -> dict[str, Any]:
        return self._run(self._client.get_user_credits(user_id))  # type: ignore[no-any-return]

    def purchase_credits(self, user_id: str, pack: str) -> str:
        return self._run(self._client.purchase_credits(user_id, pack))  # type: ignore[no-any-return]

    def add_credits(self, user_id: str, credits: int, reason: str) -> dict[str, Any]:
        return self._run(self._client.add_credits(user_id, credits, reason))  # type: ignore[no-any-return]

    def get_analytics(self) -> dict[str, Any]:
        return self._run(self._client.get_analytics())  # type: ignore[no-any-return]

    def chat(self, user_id: str, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        return self._run(self._client.chat(user_id, messages, **params))  # type: ignore[no-any-return]

    def chat_stream(
        self, user_id: str, messages: list[dict[str, Any]], **params: Any
    ) -> Iterator[ChatCompletionChunk]:
        stream = self._client.chat_stream(user_id, messages, **params)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            # Stopping early (break, an exception) closes the HTTP stream; the proxy then charges only
            # what it served.
            self._run(stream.aclose())

    def generate_image(self, user_id: str, prompt: str, **params: Any) -> ImagesResponse:
        return self._run(self._client.generate_image(user_id, prompt, **params))  # type: ignore[no-any-return]
