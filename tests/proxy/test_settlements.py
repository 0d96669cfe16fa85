"""The proxy's settlement batches against the real credits service: many settlements per call,
retried while credits is unreachable or failing, each applied exactly once even when a batch is
delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.proxy.downstream import CreditsClient, DownstreamError
from services.proxy.settlements import SettlementBatcher, SettlementParked
from tests.proxy.conftest import Credits
from tests.support.servers import serve_app

INTERNAL = {"authorization": "Bearer dev-internal-token"}


@contextlib.asynccontextmanager
async def batcher_at(url: str, **options: Any) -> AsyncIterator[SettlementBatcher]:
    """A batcher on its own credits client to `url`; closed (its queue sent) and disconnected after."""
    client = CreditsClient(url, "dev-internal-token", 10)
    batcher = SettlementBatcher(client, **options)
    try:
        yield batcher
    finally:
        await batcher.aclose()
        await client.aclose()


async def _holds(credits: Credits, user_id: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = await credits.http.post(
            "/v1/reservations", json={"user_id": user_id, "amount": 1}, headers=INTERNAL
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["reservation_id"])
    return ids


def _front(credits_url: str, plan: list[str], seen: list[int]) -> Starlette:
    """Stands in front of credits: per batch call, the next step of `plan` ('down' → 503 without
    forwarding, 'slow' → the same after a second, 'lost' → forwarded but the answer replaced by 502,
    'ok' → forwarded)."""

    async def batch(request: Request) -> Response:
        body = await request.body()
        seen.append(len(body))
        step = plan.pop(0) if plan else "ok"
        if step == "slow":
            await asyncio.sleep(1.0)
        if step in ("down", "slow"):
            return Response(b"", status_code=503)
        async with httpx.AsyncClient(base_url=credits_url, timeout=30) as http:
            r = await http.post("/v1/reservations/batch", content=body, headers=INTERNAL)
        if step == "lost":
            return Response(b"", status_code=502)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    return Starlette(routes=[Route("/v1/reservations/batch", batch, methods=["POST"])])


async def test_many_settlements_share_calls_and_each_applies_once(credits: Credits, credits_url: str) -> None:
    user_id = await credits.user(40)
    ids = await _holds(credits, user_id, 40)
    seen: list[int] = []
    async with serve_app(_front(credits_url, [], seen)) as front:
        async with batcher_at(front, max_inflight=1) as batcher:
            futures = [batcher.submit(rid, 1 if i % 2 == 0 else 0) for i, rid in enumerate(ids)]
            results: list[dict[str, Any]] = await asyncio.gather(*futures)
    assert len(seen) < len(ids)  # submitted together: they shared calls
    assert [r["reservation_id"] for r in results] == ids
    assert [r.get("charged") for r in results] == [1 if i % 2 == 0 else None for i in range(40)]
    account = await credits.settled(user_id, 20, usage_total=20)
    assert account["credits_reserved"] == 0


async def test_credits_down_then_a_lost_answer_still_charges_exactly_once(
    credits: Credits, credits_url: str
) -> None:
    user_id = await credits.user(5)
    ids = await _holds(credits, user_id, 3)
    seen: list[int] = []
    # Down twice (nothing forwarded), then applied at credits but the answer lost, then fine.
    async with serve_app(_front(credits_url, ["down", "down", "lost"], seen)) as front:
        async with batcher_at(front, retry_base_seconds=0.05) as batcher:
            results = await asyncio.gather(
                batcher.submit(ids[0], 1), batcher.submit(ids[1], 1), batcher.submit(ids[2], 0)
            )
    assert len(seen) == 4
    assert [r.get("charged") for r in results] == [1, 1, None]
    await credits.settled(user_id, 3, usage_total=2)
    assert sorted(await credits.usage(user_id)) == [1, 1]


async def test_gives_up_after_bounded_retries_and_the_hold_stays_for_expiry(
    credits: Credits, credits_url: str
) -> None:
    user_id = await credits.user(5)
    (rid,) = await _holds(credits, user_id, 1)
    seen: list[int] = []
    async with serve_app(_front(credits_url, ["down"] * 10, seen)) as front:
        async with batcher_at(front, max_attempts=3, retry_base_seconds=0.02) as batcher:
            future = batcher.submit(rid, 1)
            try:
                await future
                raise AssertionError("settlement should have failed")
            except Exception as exc:
                assert not isinstance(exc, AssertionError), exc
    assert len(seen) == 3
    account = await credits.account(user_id)
    # Nothing charged; the hold is still open and will expire back to the user at credits.
    assert account["credits_reserved"] == 1 and account["credits_remaining"] == 4
    assert await credits.usage(user_id) == []


async def test_a_refused_item_fails_alone(credits: Credits, credits_url: str) -> None:
    user_id = await credits.user(5)
    a, b = await _holds(credits, user_id, 2)
    r = await credits.http.post(f"/v1/reservations/{a}/release", headers=INTERNAL)
    assert r.status_code == 200, r.text
    async with batcher_at(credits_url) as batcher:
        refused, ok = await asyncio.gather(batcher.submit(a, 1), batcher.submit(b, 1), return_exceptions=True)
    assert isinstance(refused, DownstreamError) and refused.status_code == 409
    assert isinstance(ok, dict) and ok["charged"] == 1
    await credits.settled(user_id, 4, usage_total=1)


async def test_a_malformed_item_fails_alone_once_and_another_users_commit_applies(
    credits: Credits, credits_url: str
) -> None:
    """Credits refuses a malformed item on its own (422): its settlement fails once, not retried nor
    parked (metering logs and counts it), and the other user's commit in the same call applies."""
    sender_of_bad, other = await credits.user(5), await credits.user(5)
    (bad,) = await _holds(credits, sender_of_bad, 1)
    (good,) = await _holds(credits, other, 1)
    seen: list[int] = []
    async with serve_app(_front(credits_url, [], seen)) as front:
        async with batcher_at(front, retry_base_seconds=0.02) as batcher:
            refused, ok = await asyncio.gather(
                batcher.submit(bad, 1, user_id=sender_of_bad, details={"operation": ""}),
                batcher.submit(good, 1, user_id=other, details={"operation": "chat"}),
                return_exceptions=True,
            )
    assert isinstance(refused, DownstreamError), refused
    assert (refused.status_code, refused.code) == (422, "invalid_request")
    assert isinstance(ok, dict) and ok["charged"] == 1, ok
    assert len(seen) == 1  # one call: the refused item was not sent again
    await credits.settled(other, 4, usage_total=1)
    account = await credits.account(sender_of_bad)
    assert (account["credits_reserved"], account["credits_remaining"]) == (1, 4)
    assert await credits.usage(sender_of_bad) == []


async def test_linger_gathers_settlements_and_urgent_ones_go_at_once(
    credits: Credits, credits_url: str
) -> None:
    user_id = await credits.user(10)
    ids = await _holds(credits, user_id, 6)
    seen: list[int] = []
    async with serve_app(_front(credits_url, [], seen)) as front:
        async with batcher_at(front, linger_seconds=0.3) as batcher:
            futures = []
            for rid in ids[:5]:  # one request after another, a few ms apart
                futures.append(batcher.submit(rid, 1))
                await asyncio.sleep(0.01)
            await asyncio.gather(*futures)
            assert len(seen) == 1  # all five in one call
            batcher.linger_seconds = 30.0
            # Someone waits for this answer (a release before an error response): no lingering.
            released = await asyncio.wait_for(batcher.submit(ids[5], 0, urgent=True), timeout=5)
            assert released["refunded"] == 1 and len(seen) == 2
    await credits.settled(user_id, 5, usage_total=5)


async def test_closing_sends_what_is_still_queued(credits: Credits, credits_url: str) -> None:
    """A proxy shutting down still charges the requests it served: the lingering batch goes out."""
    user_id = await credits.user(5)
    ids = await _holds(credits, user_id, 2)
    async with batcher_at(credits_url, linger_seconds=60.0) as batcher:
        futures = [batcher.submit(ids[0], 1), batcher.submit(ids[1], 0)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in futures)  # still lingering
        await batcher.aclose()
        assert [f.result().get("charged") for f in futures] == [1, None]
    await credits.settled(user_id, 4, usage_total=1)


async def test_closing_sends_a_commit_queued_when_its_record_is_answered(
    credits: Credits, credits_url: str
) -> None:
    """As a request's commit follows the record of its hold: the second item is queued only once the
    first is answered, and that happens while the batcher is closing. Both still reach credits."""
    user_id = await credits.user(5)
    first_id, second_id = await _holds(credits, user_id, 2)
    async with batcher_at(credits_url, linger_seconds=60.0) as batcher:

        async def then_commit() -> dict[str, Any]:
            await batcher.submit(first_id, 1)
            return await batcher.submit(second_id, 1)

        follower = asyncio.ensure_future(then_commit())
        await asyncio.sleep(0.05)
        await batcher.aclose()
        assert (await asyncio.wait_for(follower, 5))["charged"] == 1
    await credits.settled(user_id, 3, usage_total=2)


async def test_closing_gives_up_on_a_send_past_its_time_and_fails_it(
    credits: Credits, credits_url: str
) -> None:
    user_id = await credits.user(5)
    (rid,) = await _holds(credits, user_id, 1)
    seen: list[int] = []
    async with serve_app(_front(credits_url, ["slow"] * 5, seen)) as front:
        async with batcher_at(front) as batcher:
            future = batcher.submit(rid, 1)
            await asyncio.sleep(0.1)  # the send is waiting for the slow answer
            await batcher.aclose(timeout=0.2)
            assert future.done() and isinstance(future.exception(), Exception)
            late = batcher.submit(rid, 1)  # after closing: refused at once, never queued
            assert late.done() and isinstance(late.exception(), Exception)
    assert await credits.usage(user_id) == []
    assert (await credits.account(user_id))["credits_reserved"] == 1  # left to expire at credits


async def test_a_failed_batch_is_retried_as_one_while_the_event_loop_is_busy(
    credits: Credits, credits_url: str
) -> None:
    """Other tasks on the loop (as in a full test run, or a busy proxy) must not split a retried batch:
    items that failed together were requeued on a timer each, and the batcher sent whatever one timer
    had requeued before the next one fired."""
    done = asyncio.Event()

    async def other_work() -> None:
        while not done.is_set():  # noqa: ASYNC110 - the point is to keep the loop busy
            await asyncio.sleep(0)

    neighbour = asyncio.create_task(other_work())
    try:
        user_id = await credits.user(5)
        ids = await _holds(credits, user_id, 3)
        seen: list[int] = []
        async with serve_app(_front(credits_url, ["down", "down", "lost"], seen)) as front:
            async with batcher_at(front, retry_base_seconds=0.05) as batcher:
                results = await asyncio.gather(
                    batcher.submit(ids[0], 1), batcher.submit(ids[1], 1), batcher.submit(ids[2], 0)
                )
    finally:
        done.set()
        await neighbour
    assert len(seen) == 4  # the first call and its three retries, each carrying all three items
    assert [r.get("charged") for r in results] == [1, 1, None]
    await credits.settled(user_id, 3, usage_total=2)
    assert sorted(await credits.usage(user_id)) == [1, 1]


async def test_an_item_credits_keeps_failing_is_parked_when_the_proxy_gives_up(
    credits: Credits, credits_url: str
) -> None:
    """Credits answers the batch but fails one item with a 5xx (a writer hiccup), until the proxy stops:
    the served request's commit goes to the parker (credits' Redis), not nowhere."""
    user_id = await credits.user(5)
    (rid,) = await _holds(credits, user_id, 1)
    calls: list[int] = []

    async def batch(request: Request) -> Response:
        items = (await request.json())["items"]
        calls.append(len(items))
        failed = {"status": 503, "body": {"error": {"type": "api_error", "code": "service_unavailable"}}}
        return Response(orjson.dumps({"results": [failed for _ in items]}), media_type="application/json")

    parked: list[tuple[str, list[tuple[str, Any]]]] = []

    async def parker(user: str, entries: list[tuple[str, Any]]) -> None:
        parked.append((user, entries))

    front = Starlette(routes=[Route("/v1/reservations/batch", batch, methods=["POST"])])
    async with serve_app(front) as url:
        async with batcher_at(url, max_attempts=3, retry_base_seconds=0.02, parker=parker) as batcher:
            future = batcher.submit(rid, 1, user_id=user_id)
            with pytest.raises(SettlementParked):
                await asyncio.wait_for(future, timeout=10)
    assert len(calls) == 3
    assert parked == [(user_id, [(rid, {"reservation_id": rid, "action": "commit", "amount": 1})])]
