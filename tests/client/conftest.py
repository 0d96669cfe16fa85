"""The Python client (shared/client.py) against the real services: credits, billing in local test
mode, the stand-in upstream and the proxy, all in-process on their own broker namespace."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from shared.client import CreditProxyClient
from tests.portal.stack import Stack, stack_fixture

PAY_FORM = re.compile(r'<form method="post" action="([^"]+/pay)"')


client_stack = stack_fixture("client", fixture="client_stack")


def client_kwargs(stack: Stack) -> dict[str, str]:
    return {
        "gateway_url": stack.proxy.url,
        "internal_token": stack.proxy.settings.internal_token,
        "credits_url": stack.credits.url,
        "admin_token": stack.credits.admin_token,
    }


@pytest.fixture
async def cp(client_stack: Stack) -> AsyncIterator[CreditProxyClient]:
    async with CreditProxyClient(**client_kwargs(client_stack)) as client:
        yield client


@pytest.fixture
def new_user() -> Callable[[], str]:
    return lambda: f"client-{uuid.uuid4().hex[:10]}"


def pay_form_action(page_url: str, html: str) -> str:
    """The absolute URL the TEST MODE page's Pay button posts to."""
    match = PAY_FORM.search(html)
    assert match, "the test checkout page has no Pay form"
    return str(httpx.URL(page_url).join(match.group(1)))
