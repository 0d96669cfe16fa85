"""The gateway's metrics say what was asked of which model: requests and credits by operation and model,
and the portal's static files under their own route label rather than "unmatched"."""

from __future__ import annotations

import re
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy.conftest import Credits


async def sample(gateway: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await gateway.get("/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_requests_and_credits_by_operation_and_model(sdk, credits: Credits, gateway) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(50)
    chat = {"service": "proxy", "operation": "chat.completions", "model": "dall-e-3"}
    requests_before = await sample(gateway, "http_requests_by_model_total", status="200", **chat)
    credits_before = await sample(gateway, "credits_charged_by_model_total", **chat)
    client = sdk(user)
    # A per-request price of 5 (dall-e-3 in the tests' pricing file), asked of the chat endpoint twice.
    for _ in range(2):
        await client.chat.completions.create(model="dall-e-3", messages=[{"role": "user", "content": "hi"}])
    await client.embeddings.create(model="text-embedding-3-small", input="hello")
    await credits.settled(user, 50 - 10 - 1)
    assert await sample(gateway, "http_requests_by_model_total", status="200", **chat) == requests_before + 2
    assert await sample(gateway, "credits_charged_by_model_total", **chat) == credits_before + 10
    embedded = {"service": "proxy", "operation": "embeddings", "model": "text-embedding-3-small"}
    assert await sample(gateway, "credits_charged_by_model_total", **embedded) >= 1


async def test_made_up_model_names_cannot_mint_unbounded_series(sdk, credits: Credits, gateway) -> None:  # type: ignore[no-untyped-def]
    from shared import metrics

    user = await credits.user(5)
    client = sdk(user)
    names = [f"made-up-{uuid.uuid4().hex}" for _ in range(3)]
    saved = metrics.MAX_MODEL_LABELS
    metrics.MAX_MODEL_LABELS = len(metrics._models_seen)  # the budget is used up
    try:
        for name in names:
            await client.embeddings.create(model=name, input="x")
    finally:
        metrics.MAX_MODEL_LABELS = saved
    text = (await gateway.get("/metrics")).text
    assert not any(name in text for name in names)
    assert re.search(r'http_requests_by_model_total\{[^}]*model="other"', text)


async def test_portal_files_are_labelled_by_their_route(gateway) -> None:  # type: ignore[no-untyped-def]
    labels = {"service": "proxy", "method": "GET", "route": "/portal", "status": "200"}
    before = await sample(gateway, "http_request_duration_seconds_count", **labels)
    for path in ("/portal/app.js", "/portal/styles.css"):
        assert (await gateway.get(path)).status_code == 200
    assert await sample(gateway, "http_request_duration_seconds_count", **labels) == before + 2
