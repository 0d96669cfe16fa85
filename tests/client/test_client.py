"""CreditProxyClient (async) and SyncCreditProxyClient against the real services: every call's effect
is checked in the credits service's accounts and ledger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shared.client import CreditProxyClient, CreditProxyError, InsufficientCredits, SyncCreditProxyClient
from tests.client.conftest import client_kwargs, pay_form_action
from tests.conftest import eventually
from tests.portal.stack import Stack

EMPTY = "No credits remaining. Please purchase more credits."
HI = [{"role": "user", "content": "hello there"}]


async def balance_becomes(stack: Stack, user: str, expected: int) -> dict[str, Any]:
    """Waits for the balance (commits and purchases land after the response) with no hold left."""

    async def check() -> dict[str, Any] | None:
        account = await stack.account(user)
        if account and account["credits_remaining"] == expected and account["credits_reserved"] == 0:
            return account
        return None

    try:
        return await eventually(check, timeout=20, interval=0.1)  # type: ignore[return-value]
    except AssertionError:
        raise AssertionError(f"balance never became {expected}: {await stack.account(user)}") from None


def types(ledger: list[dict[str, Any]]) -> list[str]:
    return [entry["type"] for entry in ledger]


async def test_get_credit_packages(cp: CreditProxyClient) -> None:
    packs = await cp.get_credit_packages()
    assert [p["id"] for p in packs] == ["starter", "standard", "pro", "business"]
    by_id = {p["id"]: p for p in packs}
    assert (by_id["pro"]["price_cents"], by_id["pro"]["credits"], by_id["pro"]["unlocks_api"]) == (
        3000,
        1200,
        True,
    )
    assert by_id["standard"]["badge"] == "Popular" and by_id["starter"]["unlocks_api"] is False


async def test_get_user_credits_creates_the_account_once(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    assert await client_stack.account(user) is None
    account = await cp.get_user_credits(user)
    assert account["user_id"] == user
    assert account["credits_remaining"] == 10 and account["tier"] == "free"
    assert account["api_access_unlocked"] is False
    again = await cp.get_user_credits(user)
    assert again["credits_remaining"] == 10
    assert types(await client_stack.ledger(user)) == ["signup_bonus"]


async def test_purchase_credits_through_the_test_checkout(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    url = await cp.purchase_credits(user, "standard")
    assert url.startswith(f"{client_stack.billing.url}/test-checkout/"), url
    account = await client_stack.account(user)
    assert account is not None and account["credits_remaining"] == 10  # nothing until paid

    async with httpx.AsyncClient(timeout=30) as browser:
        page = await browser.get(url)
        assert page.status_code == 200 and "TEST MODE" in page.text
        paid = await browser.post(pay_form_action(url, page.text))
    assert paid.status_code == 303
    # The portal at PUBLIC_BASE_URL (its development default here), never the request's Host.
    assert paid.headers["location"] == f"{client_stack.proxy.settings.public_base_url}/?checkout=success"

    account = await balance_becomes(client_stack, user, 510)
    assert account["tier"] == "standard" and account["credits_purchased_total"] == 500
    purchases = [e for e in await client_stack.ledger(user) if e["type"] == "purchase"]
    assert [e["amount"] for e in purchases] == [500]


async def test_purchase_of_unknown_pack_is_refused(
    cp: CreditProxyClient, new_user: Callable[[], str]
) -> None:
    with pytest.raises(CreditProxyError) as err:
        await cp.purchase_credits(new_user(), "platinum")
    assert (err.value.status, err.value.code) == (404, "not_found")


async def test_add_credits_and_analytics(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    before = await cp.get_analytics()
    user = new_user()
    await cp.add_credits(user, 25, "support goodwill")
    account = await client_stack.account(user)
    assert account is not None and account["credits_remaining"] in (25, 35)  # with or without signup credits
    grants = [e for e in await client_stack.ledger(user) if e["type"] == "admin_add"]
    assert [e["amount"] for e in grants] == [25]

    after = await cp.get_analytics()
    assert after["total_users"] == before["total_users"] + 1
    assert (
        after["total_credits_remaining"] - before["total_credits_remaining"] == account["credits_remaining"]
    )
    assert after["tier_breakdown"].get("free", 0) == before["tier_breakdown"].get("free", 0) + 1
    assert 0 <= after["conversion_rate"] <= 1


async def test_admin_calls_need_the_admin_token(client_stack: Stack, new_user: Callable[[], str]) -> None:
    kwargs = {**client_kwargs(client_stack), "admin_token": "not-the-admin-token"}
    async with CreditProxyClient(**kwargs) as wrong:
        with pytest.raises(CreditProxyError) as err:
            await wrong.add_credits(new_user(), 5, "x")
    assert err.value.status == 401
    no_admin = {**client_kwargs(client_stack)}
    del no_admin["admin_token"]
    async with CreditProxyClient(**no_admin) as anonymous:
        with pytest.raises(CreditProxyError):
            await anonymous.get_analytics()


async def test_chat_is_charged(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    await cp.get_user_credits(user)
    reply = await cp.chat(user, HI)
    assert reply.choices[0].message.content
    await balance_becomes(client_stack, user, 9)
    usage = [e for e in await client_stack.ledger(user) if e["type"] == "usage"]
    assert [e["amount"] for e in usage] == [-1]


async def test_chat_stream_is_charged(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    await cp.get_user_credits(user)
    pieces = [
        chunk.choices[0].delta.content or "" async for chunk in cp.chat_stream(user, HI) if chunk.choices
    ]
    assert "".join(pieces).strip()
    await balance_becomes(client_stack, user, 9)
    assert types(await client_stack.ledger(user)) == ["usage", "signup_bonus"]


async def test_generate_image_is_charged(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    images = await cp.generate_image(user, "a lighthouse at dusk")
    assert images.data and (images.data[0].url or images.data[0].b64_json)
    await balance_becomes(client_stack, user, 5)  # dall-e-3 costs 5 in this stack's pricing
    usage = [e for e in await client_stack.ledger(user) if e["type"] == "usage"]
    assert [e["amount"] for e in usage] == [-5]


async def test_insufficient_credits_with_a_purchase_hint(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    await cp.get_user_credits(user)
    await client_stack.spend_all(user)
    await balance_becomes(client_stack, user, 0)
    ledger_before = await client_stack.ledger(user)

    with pytest.raises(InsufficientCredits) as err:
        await cp.chat(user, HI)
    assert err.value.status == 402 and err.value.code == "insufficient_credits"
    assert err.value.message == EMPTY
    assert "Starter" in err.value.purchase_hint and "'starter'" in err.value.purchase_hint
    assert err.value.packs[0]["id"] == "starter"
    assert isinstance(err.value, CreditProxyError)

    with pytest.raises(InsufficientCredits):
        async for _ in cp.chat_stream(user, HI):
            pass
    with pytest.raises(InsufficientCredits):
        await cp.generate_image(user, "anything")

    account = await balance_becomes(client_stack, user, 0)
    assert account["credits_remaining"] == 0 and account["credits_reserved"] == 0
    assert await client_stack.ledger(user) == ledger_before, "a refused call must not be charged"


async def test_sync_client_in_a_thread(client_stack: Stack, new_user: Callable[[], str]) -> None:
    """The sync twin runs its own event loop, so it is used from a worker thread, never this loop."""
    user, broke = new_user(), new_user()

    def host_app_backend() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with SyncCreditProxyClient(**client_kwargs(client_stack)) as cp:
            seen["packs"] = [p["id"] for p in cp.get_credit_packages()]
            seen["signup"] = cp.get_user_credits(user)["credits_remaining"]
            url = cp.purchase_credits(user, "starter")
            with httpx.Client(timeout=30) as browser:
                page = browser.get(url)
                seen["paid"] = browser.post(pay_form_action(url, page.text)).status_code
            seen["chat"] = cp.chat(user, HI).choices[0].message.content
            seen["stream"] = "".join(
                c.choices[0].delta.content or "" for c in cp.chat_stream(user, HI) if c.choices
            )
            seen["image"] = len(cp.generate_image(user, "a cat").data or [])
            cp.add_credits(user, 7, "sync grant")
            seen["analytics"] = cp.get_analytics()
            cp.get_user_credits(broke)
            seen["broke_user_ready"] = True
        return seen

    seen = await asyncio.to_thread(host_app_backend)
    assert seen["packs"][0] == "starter" and seen["signup"] == 10 and seen["paid"] == 303
    assert seen["chat"] and seen["stream"].strip() and seen["image"] == 1
    assert seen["analytics"]["total_users"] >= 2
    # 10 signup + 100 starter + 7 granted - 1 chat - 1 stream - 5 image.
    await balance_becomes(client_stack, user, 110)
    assert sorted(types(await client_stack.ledger(user))) == sorted(
        ["signup_bonus", "purchase", "admin_add", "usage", "usage", "usage"]
    )

    await client_stack.spend_all(broke)
    await balance_becomes(client_stack, broke, 0)

    def refused() -> InsufficientCredits:
        with SyncCreditProxyClient(**client_kwargs(client_stack)) as cp:
            try:
                cp.chat(broke, HI)
            except InsufficientCredits as exc:
                return exc
        raise AssertionError("a user with no credits was served")

    exc = await asyncio.to_thread(refused)
    assert exc.message == EMPTY and "Starter" in exc.purchase_hint
    await balance_becomes(client_stack, broke, 0)


async def test_unreachable_service_is_a_client_error(new_user: Callable[[], str]) -> None:
    from tests.support.servers import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    async with CreditProxyClient(gateway_url=closed, credits_url=closed, admin_token="x", timeout=5) as cp:
        for call in (
            cp.get_user_credits(new_user()),
            cp.chat(new_user(), HI),
            cp.get_analytics(),
        ):
            with pytest.raises(CreditProxyError) as err:
                await call
            assert (err.value.status, err.value.code) == (503, "service_unavailable")


async def test_sync_client_refuses_the_event_loop_thread(client_stack: Stack) -> None:
    with SyncCreditProxyClient(**client_kwargs(client_stack)) as cp:
        with pytest.raises(RuntimeError, match=r"asyncio\.to_thread"):
            cp.get_credit_packages()
        # Still usable from a worker thread afterwards.
        packs = await asyncio.to_thread(cp.get_credit_packages)
    assert len(packs) == 4


async def test_stream_stopped_early_is_charged_once_and_releases_nothing_twice(
    cp: CreditProxyClient, client_stack: Stack, new_user: Callable[[], str]
) -> None:
    user = new_user()
    await cp.get_user_credits(user)
    async with contextlib.aclosing(cp.chat_stream(user, HI)) as stream:
        async for _chunk in stream:
            break
    # The request was served (its first chunk arrived): one credit, no hold left behind.
    await balance_becomes(client_stack, user, 9)
    assert types(await client_stack.ledger(user)) == ["usage", "signup_bonus"]
