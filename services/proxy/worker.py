"""The `ai.requests` workflow worker (docs/messages.md, AI jobs).

A job is charged like an internal call for its user, with the reservation's idempotency key
`job:<job_id>`: a redelivered job finds the same hold at credits, and committing it again returns
the first result, so a job is never charged twice. When the reservation found has already ended
without a charge (released or expired: that delivery was not served), the job is held anew under a
key derived from the ended reservation, so it is not served free and later deliveries still find the
same chain. Idempotency keys, like job records, belong to the job's user: one job_id sent for two
users is two jobs. The finished outcome is also recorded in Redis (`proxy:job:<namespace>:<user>:<job_id>`),
so a redelivery of a finished job is answered again from the record without calling upstream or credits.

Upstream failures (5xx, timeout, unreachable) are retried with exponential backoff up to
`WORKER_MAX_ATTEMPTS` calls, holding the credits meanwhile; then the job fails with the hold
released. Upstream 4xx and insufficient credits fail at once. A malformed job is dead-lettered.
A credits outage requeues the message (bounded by the queue's delivery limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any
from urllib.parse import quote as url_quote

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pydantic import ValidationError

from shared.broker import PoisonMessage, Publisher, Topology, build_message, consume, parse_json
from shared.errors import AppError, Conflict, ServiceUnavailable, UpstreamError, UpstreamTimeout
from shared.events import AiJobCompleted, AiJobFailed, AiJobRequest, Event, JobError
from shared.redis_client import AnyRedis

from .downstream import DownstreamError
from .metering import Hold
from .metrics import CREDITS_CHARGED, JOBS
from .quote import Quote
from .runtime import Proxy
from .upstream import loads_object

log = logging.getLogger("proxy.worker")
QUEUE = "ai.requests"
MAX_IDEMPOTENCY_KEY = 200  # credits' limit on a reservation's idempotency key
# Deliveries whose hold ended unserved before this one: each left one released/expired reservation.
MAX_ENDED_HOLDS = 20


def job_key(job_id: str, after: str | None = None) -> str:
    """The reservation idempotency key of a job (after an ended reservation, a key derived from it).
    Within credits' length limit however long the job_id: longer keys are replaced by their hash."""
    key = f"job:{job_id}" if after is None else f"job:{job_id}:after:{after}"
    if len(key) > MAX_IDEMPOTENCY_KEY:
        key = "job:sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


class Worker:
    def __init__(
        self,
        proxy: Proxy,
        connection: AbstractRobustConnection,
        topology: Topology,
        redis: AnyRedis,
    ) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.connection = connection
        self.topology = topology
        self.redis = redis
        self.publisher = Publisher(connection, topology)
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._channel, self._queue, self._tag = await consume(
            self.connection, self.topology, QUEUE, self.handle, prefetch=self.settings.worker_prefetch
        )

    async def stop(self, grace: float) -> None:
        """Stops taking jobs, then waits for those in flight (unacked ones are redelivered elsewhere)."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception:
                log.warning("could not cancel the ai.requests consumer", exc_info=True)
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("%d job(s) still running at shutdown; they will be redelivered", self._inflight)
        if self._channel is not None:
            try:
                await self._channel.close()
            except Exception:
                pass

    def _record_key(self, user_id: str, job_id: str) -> str:
        # The user's length first keeps (user, job) pairs apart whatever characters they contain.
        return f"proxy:job:{self.topology.namespace}:{len(user_id)}:{user_id}:{job_id}"

    async def handle(self, message: AbstractIncomingMessage) -> None:
        data = parse_json(message)
        try:
            job = AiJobRequest.model_validate(data)
        except ValidationError as exc:
            raise PoisonMessage(f"not a job: {exc.errors()[:3]}") from exc
        self._inflight += 1
        self._idle.clear()
        try:
            key = self._record_key(job.user_id, job.job_id)
            recorded = await self.redis.get(key)
            if recorded is not None:
                JOBS.labels("replayed").inc()
                record = orjson.loads(recorded)
                await self._announce(record["routing_key"], record["body"], message)
                return
            event = await self.run(job)
            record = {"routing_key": event.routing_key, "body": event.body()}
            await self.redis.set(key, orjson.dumps(record), ex=self.settings.worker_record_ttl_seconds)
            JOBS.labels("completed" if isinstance(event, AiJobCompleted) else "failed").inc()
            await self._announce(event.routing_key, record["body"], message)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _announce(
        self, routing_key: str, body: dict[str, Any], message: AbstractIncomingMessage
    ) -> None:
        payload = orjson.dumps(body)
        event_id = str(body["event_id"])
        await self.publisher.publish_raw(
            build_message(payload, message_id=event_id, type_=routing_key), routing_key
        )
        if message.reply_to:
            reply = build_message(
                payload, message_id=event_id, type_=routing_key, correlation_id=message.correlation_id
            )
            await self.publisher.send_to_queue(message.reply_to, reply)

    async def _hold(self, job: AiJobRequest, quote: Quote) -> Hold:
        """Holds the job's price idempotently. A reservation found by the job's key that has already
        ended unserved (a delivery that released its hold, then died before acknowledging) cannot be
        committed: serving the job on it would be free. The job is then held anew under a key derived
        from that reservation, which the next delivery derives the same way."""
        proxy = self.proxy
        after: str | None = None
        for _ in range(MAX_ENDED_HOLDS):
            hold = await proxy.meter.hold(
                job.user_id,
                quote,
                idempotency_key=job_key(job.job_id, after),
                create_missing_user=True,
            )
            rid = hold.reservation.reservation_id
            found = await proxy.credits.json(b"GET", f"/v1/reservations/{url_quote(rid, safe='')}")
            if found.get("status") in ("held", "committed"):
                return hold
            hold.settled = True  # ended at credits already: nothing to release
            after = rid
        raise Conflict(f"Job {job.job_id} was held and released too often; send it with a new job_id.")

    async def run(self, job: AiJobRequest) -> Event:
        proxy = self.proxy
        body = dict(job.request)
        if job.operation == "chat.completions":
            # A job's answer is one message: never a stream.
            body.pop("stream", None)
            body.pop("stream_options", None)

        def failed(code: str, message: str, charged: int = 0) -> AiJobFailed:
            return AiJobFailed(
                job_id=job.job_id,
                user_id=job.user_id,
                credits_charged=charged,
                error=JobError(code=code, message=message),
            )

        try:
            quote = proxy.pricing.quote(job.operation, body, b"")
            quote.changed = True  # the job's request is a parsed object: always serialised
            hold = await self._hold(job, quote)
        except ServiceUnavailable:
            raise  # requeued: credits is down; a hold placed meanwhile is found again by its key
        except AppError as exc:
            return failed(exc.code, exc.message)
        try:
            raw = hold.quote.forward()
        except TypeError:  # orjson.JSONEncodeError: nested deeper than orjson writes (254 levels)
            await proxy.meter.release_now(hold)
            return failed("invalid_request", "The request body is nested too deeply.")
        attempts = max(1, self.settings.worker_max_attempts)
        last: AppError | None = None
        for attempt in range(attempts):
            try:
                response = await proxy.upstream.call(job.operation, raw)
                break
            except (UpstreamError, UpstreamTimeout) as exc:
                last = exc
                log.warning(
                    "job %s: upstream attempt %d/%d failed: %s",
                    job.job_id,
                    attempt + 1,
                    attempts,
                    exc.message,
                )
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.settings.worker_retry_base_seconds * 2**attempt)
            except AppError as exc:
                await proxy.meter.release_now(hold)
                return failed(exc.code, exc.message)
            except BaseException:
                await proxy.meter.release_now(hold)
                raise
        else:
            await proxy.meter.release_now(hold)
            assert last is not None
            return failed(last.code, f"{last.message} (after {attempts} attempts)")
        result = loads_object(response.body) or {}
        charge = hold.quote.charge(result.get("usage"))
        charged = charge.credits
        hold.settled = True
        try:
            overage = max(charged - hold.amount, 0)
            committed = await proxy.credits.commit(
                hold.reservation.reservation_id,
                charged - overage,
                overage=overage,
                details=hold.quote.details(charge),
            )
            charged = int(committed.get("charged", charged)) + int(committed.get("overage", 0))
            CREDITS_CHARGED.labels(job.operation).inc(charged)
        except DownstreamError as exc:
            # Released or expired meanwhile (e.g. an earlier delivery gave up): served, not charged.
            log.error("job %s: commit refused (%s); answered without a charge", job.job_id, exc.message)
            charged = 0
        return AiJobCompleted(
            job_id=job.job_id, user_id=job.user_id, credits_charged=charged, response=result
        )
