"""The customer portal end to end in headless Chromium: sign-in, balance, buying a pack through the
local test checkout, API keys, the locked-API and empty-balance states, history, and the error banner."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import openai
import pytest
from playwright.async_api import Page, expect

from shared.devtoken import make_token
from tests.conftest import eventually
from tests.portal.conftest import ARTIFACTS, PHONE
from tests.portal.stack import Stack
from tests.support.proxy_service import running_proxy
from tests.support.servers import free_port

# The development signing secret is short on purpose; production refuses it (shared.settings).
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

UNAVAILABLE = "The service is unavailable right now. Please try again in a moment."
EMPTY = "No credits remaining. Please purchase more credits."


async def phone_shot(page: Page, shoot: Callable[..., Any], name: str) -> None:
    """Screenshots the same view at phone width too (then back to desktop); nothing may scroll sideways."""
    desktop = page.viewport_size
    await page.set_viewport_size(PHONE)
    await page.wait_for_timeout(150)  # let the layout settle after the resize
    await shoot(page, name)
    await assert_fits_width(page)
    assert desktop is not None
    await page.set_viewport_size(desktop)


async def assert_fits_width(page: Page) -> None:
    """Nothing scrolls sideways: the page is no wider than the viewport."""
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than the viewport"
    # Nor does a visible table hide columns behind a sideways scroll.
    cut = await page.evaluate(
        """[...document.querySelectorAll('.table-wrap')]
            .filter(w => w.offsetParent !== null && w.scrollWidth > w.clientWidth + 1)
            .map(w => w.getAttribute('aria-label'))"""
    )
    assert not cut, f"tables wider than the screen: {cut}"


async def buy_through_test_checkout(page: Page, stack: Stack, pack: str, shoot: Callable[..., Any]) -> None:
    """Clicks Buy, pays on billing's TEST MODE page, and lands back on the portal."""
    await page.get_by_test_id(f"buy-{pack}").click()
    await page.wait_for_url(re.compile(re.escape(stack.billing.url) + r"/test-checkout/"))
    await expect(page.locator("body")).to_contain_text("TEST MODE")
    await shoot(page, f"checkout-{pack}")
    await page.locator("button.pay").click()
    await page.wait_for_url(re.compile(re.escape(stack.proxy.url) + r"/"))
    assert page.url.startswith(stack.proxy.url)
    await expect(
        page.get_by_test_id("toast-checkout-success").or_(page.get_by_test_id("toast-credits-added")).first
    ).to_be_visible()


async def test_sign_in_with_token_link_shows_balance_and_packs(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))

    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    assert "token=" not in page.url, "the token must be removed from the address bar"
    # Pack cards with price, credits, price per credit and badges, from billing's catalog.
    await expect(page.get_by_test_id("price-standard")).to_have_text("$15.00")
    await expect(page.get_by_test_id("credits-pro")).to_have_text("1,200 credits")
    await expect(page.get_by_test_id("per-credit-starter")).to_have_text("5¢ per credit")
    await expect(page.get_by_test_id("badge-standard")).to_have_text("Popular")
    await expect(page.get_by_test_id("badge-pro")).to_have_text("Best Value + API")
    await expect(page.get_by_test_id("pack-card-business")).to_contain_text("Unlocks API access")
    await expect(page.get_by_test_id("account-tier")).to_have_text("Free")
    await expect(page.get_by_test_id("account-api-access")).to_have_text("Locked")
    await expect(page.get_by_test_id("low-balance-prompt")).to_be_hidden()
    await expect(page.get_by_test_id("empty-balance")).to_be_hidden()
    # The portal's first call created the account, with the signup credits.
    account = await stack.account(user)
    assert account is not None and account["credits_remaining"] == 10

    await shoot(page, "pricing")
    await phone_shot(page, shoot, "pricing")


async def test_sign_in_form(page: Page, stack: Stack, new_user: Callable[[], str], shoot: Any) -> None:
    await page.goto(stack.proxy.url + "/")
    await expect(page.get_by_test_id("signin-token")).to_be_visible()
    await shoot(page, "signin")
    await phone_shot(page, shoot, "signin")

    # A forged token is refused and the form says why.
    await page.get_by_test_id("signin-token").fill(make_token("mallory", secret="not-the-secret"))
    await page.get_by_test_id("signin-submit").click()
    await expect(page.get_by_test_id("signin-error")).to_contain_text("expired or the token is invalid")
    await expect(page.get_by_test_id("signin-token")).to_be_visible()

    token = make_token(new_user(), secret=stack.proxy.settings.user_token_secret)
    await page.get_by_test_id("signin-token").fill(token)
    await page.get_by_test_id("signin-submit").click()
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await expect(page.get_by_test_id("signin-token")).to_be_hidden()


async def test_buy_pack_balance_rises_and_history_shows_it(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await stack.spend_all(user)  # a usage row for the history (and the balance goes to 0 first)
    account = await stack.account(user)
    assert account is not None and account["credits_remaining"] == 0

    await buy_through_test_checkout(page, stack, "standard", shoot)

    await expect(page.get_by_test_id("balance")).to_have_text("500 credits", timeout=20_000)
    await expect(page.get_by_test_id("empty-balance")).to_be_hidden()
    await expect(page.get_by_test_id("account-tier")).to_have_text("Standard")
    await expect(page.get_by_test_id("account-support")).to_have_text("Email (48h response)")
    await expect(page.get_by_test_id("toast-credits-added")).to_be_visible()
    await expect(page.get_by_test_id("toast-checkout-success")).to_have_count(0)  # superseded
    ledger = await stack.ledger(user)
    purchases = [e for e in ledger if e["type"] == "purchase"]
    assert [e["amount"] for e in purchases] == [500] and purchases[0]["balance_after"] == 500

    await page.get_by_test_id("tab-history").click()
    rows = page.get_by_test_id("history-row")
    await expect(rows).to_have_count(len(ledger))
    await expect(page.locator("[data-testid=history-row][data-type=purchase]")).to_contain_text("+500")
    await expect(page.locator("[data-testid=history-row][data-type=usage]")).to_have_count(10)
    await expect(page.locator("[data-testid=history-row][data-type=signup_bonus]")).to_contain_text("+10")
    await expect(rows.first).to_contain_text("Purchase")  # newest first
    await expect(page.get_by_test_id("purchase-row")).to_have_count(1)
    await expect(page.get_by_test_id("purchase-row")).to_contain_text("Paid")
    await expect(page.get_by_test_id("purchase-row")).to_contain_text("$15.00")
    await shoot(page, "history")
    await phone_shot(page, shoot, "history")


async def test_api_key_after_buying_pro_works_and_revoking_stops_it(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await buy_through_test_checkout(page, stack, "pro", shoot)
    await expect(page.get_by_test_id("balance")).to_have_text("1,210 credits", timeout=20_000)
    await expect(page.get_by_test_id("account-api-access")).to_have_text("Unlocked")
    await expect(page.get_by_test_id("toast-api-unlocked")).to_contain_text("API unlocked")
    await shoot(page, "api-unlocked")

    await page.get_by_test_id("tab-keys").click()
    await expect(page.get_by_test_id("api-locked")).to_be_hidden()
    await page.get_by_test_id("api-key-name-input").fill("CI server")
    await page.get_by_test_id("create-api-key").click()
    shown = page.get_by_test_id("new-api-key")
    await expect(shown).to_be_visible()
    key = (await shown.inner_text()).strip()
    assert len(key) > 20
    row = page.get_by_test_id("api-key-row")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("CI server")
    await expect(row).not_to_contain_text(key)  # the list never shows the secret
    await shoot(page, "keys-new")
    await phone_shot(page, shoot, "keys-new")

    # The key works with the official SDK (the user has the API unlock) and is charged to the user.
    sdk = openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key=key, max_retries=0, timeout=30)
    reply = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content

    async def charged() -> bool:
        account = await stack.account(user)
        return account is not None and account["credits_remaining"] == 1209

    await eventually(charged, timeout=15)

    # Revoked while its secret is still on screen: the secret goes with the key.
    key_id = await row.get_attribute("data-key-id")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.get_by_test_id(f"revoke-{key_id}").click()
    await expect(page.get_by_test_id("api-key-row")).to_have_count(0)
    await expect(page.get_by_test_id("toast-revoked")).to_be_visible()
    await expect(page.get_by_test_id("revoked-api-key-row")).to_have_count(1)
    await expect(shown).to_be_hidden()
    assert key not in await page.content()

    loop = asyncio.get_running_loop()
    revoked_at = loop.time()

    async def refused() -> bool:
        try:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, timeout=5, interval=0.2)
    assert loop.time() - revoked_at <= 5.5
    await sdk.close()
    await shoot(page, "keys-revoked")

    # "I've saved it" hides a new key's secret for good.
    await page.get_by_test_id("create-api-key").click()
    await expect(shown).to_be_visible()
    await page.get_by_role("button", name="I've saved it").click()
    await expect(shown).to_be_hidden()

    # A notice belongs to its page: leaving the page, or signing out, takes it away.
    await expect(page.get_by_test_id("toast-revoked")).to_have_count(1)
    await page.get_by_test_id("tab-pricing").click()
    await expect(page.locator("#toasts > *")).to_have_count(0)
    await page.get_by_test_id("tab-keys").click()
    revoke = page.locator("[data-testid^=revoke-]").first
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await revoke.click()
    await expect(page.get_by_test_id("toast-revoked")).to_be_visible()
    await page.locator("#signout").click()
    await expect(page.locator("#toasts > *")).to_have_count(0)


async def test_locked_api_message_names_the_pack(
    page: Page, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    await page.goto(sign_in_url(new_user(), tab="keys"))
    locked = page.get_by_test_id("api-locked")
    await expect(locked).to_be_visible()
    await expect(locked).to_contain_text("API access is locked. Buy the Pro pack (or larger) to unlock it.")
    await expect(page.get_by_test_id("api-locked-cta")).to_have_text("See the Pro pack — $30.00")
    await expect(page.get_by_test_id("create-api-key")).to_be_hidden()
    await shoot(page, "keys-locked")
    await phone_shot(page, shoot, "keys-locked")

    # The call to action leads to the Pro card on the pricing tab.
    await page.get_by_test_id("api-locked-cta").click()
    await expect(page.get_by_test_id("pack-card-pro")).to_be_visible()
    await expect(page.get_by_test_id("pack-card-pro")).to_be_focused()
    await expect(page.get_by_test_id("tab-pricing")).to_have_attribute("aria-selected", "true")


async def test_empty_balance_banner(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await expect(page.get_by_test_id("empty-balance")).to_be_hidden()
    await stack.spend_all(user)

    await page.reload()
    await expect(page.get_by_test_id("balance")).to_have_text("0 credits")
    await expect(page.get_by_test_id("empty-balance")).to_have_text(EMPTY)
    await expect(page.get_by_test_id("empty-balance")).to_be_visible()
    await expect(page.get_by_test_id("low-balance-prompt")).to_be_hidden()  # the empty message says it all
    await shoot(page, "empty")
    await phone_shot(page, shoot, "empty")


async def test_low_balance_prompt_at_threshold(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str]
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    headers = {"Authorization": f"Bearer {stack.proxy.settings.internal_token}", "X-User-Id": user}
    sdk = openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key="unused", max_retries=0)
    for _ in range(5):  # 10 → 5, the default threshold
        await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
    await sdk.close()
    # The navigation bar polls the balance; no reload needed.
    await expect(page.get_by_test_id("balance")).to_have_text("5 credits", timeout=15_000)
    await expect(page.get_by_test_id("low-balance-prompt")).to_be_visible()
    await expect(page.get_by_test_id("empty-balance")).to_be_hidden()


async def test_error_banner_when_credits_is_down(
    page: Page, stack: Stack, new_user: Callable[[], str], redis_url: str, shoot: Any
) -> None:
    # A proxy whose credits service is unreachable (nothing listens on that port).
    async with running_proxy(
        credits_url=f"http://127.0.0.1:{free_port()}",
        billing_url=stack.billing.url,
        upstream_base_url=stack.standin.base_url,
        redis_url=redis_url,
        worker_enabled=False,
        downstream_timeout_seconds=2.0,
    ) as broken:
        token = make_token(new_user(), secret=broken.settings.user_token_secret)
        await page.goto(f"{broken.url}/#token={token}")
        banner = page.get_by_test_id("error-banner")
        await expect(banner).to_be_visible()
        await expect(banner).to_contain_text(UNAVAILABLE)
        await expect(page.get_by_test_id("retry")).to_be_visible()
        await expect(page.get_by_test_id("balance")).to_have_text("Balance unavailable")
        # Still signed in (a down service is not an expired session); packs come from billing.
        await expect(page.get_by_test_id("signin-token")).to_be_hidden()
        await expect(page.get_by_test_id("pack-card-pro")).to_be_visible()
        await shoot(page, "error")
        await phone_shot(page, shoot, "error")


@pytest.mark.parametrize("tab", ["pricing", "history", "keys"])
async def test_tabs_are_keyboard_reachable(
    page: Page, sign_in_url: Callable[..., str], new_user: Callable[[], str], tab: str
) -> None:
    await page.goto(sign_in_url(new_user(), tab=tab))
    await expect(page.get_by_test_id(f"tab-{tab}")).to_have_attribute("aria-selected", "true")
    await expect(page.locator(f"#panel-{tab}")).to_be_visible()
    await page.get_by_test_id(f"tab-{tab}").focus()
    await page.keyboard.press("ArrowRight")
    following = {"pricing": "history", "history": "keys", "keys": "pricing"}[tab]
    await expect(page.get_by_test_id(f"tab-{following}")).to_be_focused()
    await expect(page.get_by_test_id(f"tab-{following}")).to_have_attribute("aria-selected", "true")


async def test_a_cancelled_checkout_reads_cancelled(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    await page.goto(sign_in_url(new_user()))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await page.get_by_test_id("buy-starter").click()
    await page.wait_for_url(re.compile(re.escape(stack.billing.url) + r"/test-checkout/"))
    # The long session id wraps instead of pushing the page sideways on a phone.
    await page.set_viewport_size(PHONE)
    await assert_fits_width(page)
    await shoot(page, "checkout-phone")
    await page.locator("button.cancel").click()
    await page.wait_for_url(re.compile(re.escape(stack.proxy.url) + r"/"))
    await expect(page.get_by_test_id("toast-checkout-cancel")).to_be_visible()
    await page.get_by_test_id("tab-history").click()
    await expect(page.get_by_test_id("purchase-row")).to_contain_text("Cancelled", timeout=15_000)
    await expect(page.get_by_test_id("purchase-row")).not_to_contain_text("Expired")
    await shoot(page, "history-cancelled")


async def test_api_docs_render_offline(page: Page, stack: Stack, shoot: Any) -> None:
    """/docs draws the gateway's API with Swagger UI from the project's own files: no request leaves
    the machine, and the OpenAI-compatible endpoints are there with the ways to authenticate."""
    elsewhere: list[str] = []

    async def only_local(route: Any) -> None:
        if route.request.url.startswith(("http://127.0.0.1", "http://localhost")):
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_local)
    await page.goto(stack.proxy.url + "/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("proxy")
    await expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions")).to_be_visible()
    await expect(page.locator(".opblock-summary-path", has_text="/v1/account/checkout")).to_be_visible()
    await expect(page.locator("button.authorize")).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "docs-top-1280.png"))  # the first screen, as a reader sees it
    await page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first.click()
    await expect(page.locator(".opblock-body").first).to_contain_text("X-Credits-Charged")
    await shoot(page, "docs")
    assert elsewhere == []


async def test_usage_rows_show_model_and_tokens(
    page: Page, sign_in_url: Callable[..., str], new_user: Callable[[], str], shoot: Any
) -> None:
    """A usage entry's `details` (model, tokens) is shown in its row. The ledger rows come from credits;
    here the answer is given to the page directly, so the rendering is tested on its own."""
    rows = {
        "data": [
            {
                "id": 2,
                "type": "usage",
                "amount": -3,
                "balance_after": 7,
                "reference": "reservation:abc",
                "created_at": "2026-12-07T18:00:00Z",
                "details": {
                    "operation": "chat.completions",
                    "model": "gpt-4o-mini",
                    "input_tokens": 1200,
                    "output_tokens": 40,
                    "upstream_cost_usd": None,
                },
            },
            {
                "id": 1,
                "type": "signup_bonus",
                "amount": 10,
                "balance_after": 10,
                "reference": "signup:x",
                "created_at": "2026-12-07T17:59:00Z",
                "details": None,
            },
        ],
        "has_more": False,
    }

    async def transactions(route: Any) -> None:
        await route.fulfill(json=rows)

    await page.route("**/v1/account/transactions*", transactions)
    await page.goto(sign_in_url(new_user(), tab="history"))
    usage = page.locator("[data-testid=history-row][data-type=usage]")
    await expect(usage).to_contain_text("gpt-4o-mini · 1,200 in / 40 out tokens")
    await expect(page.locator("[data-testid=history-row][data-type=signup_bonus]")).to_contain_text(
        "signup:x"
    )
    await shoot(page, "history-usage-details")
