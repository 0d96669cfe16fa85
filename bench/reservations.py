"""Reservation throughput: reserve+commit pairs per second.

    .venv/bin/python -m bench.reservations [--seconds 5] [--concurrency 64] [--accounts 200]

Measures, and prints as a table:
  http / many accounts   one credits process (uvloop + httptools, as `python -m services.credits` runs),
                         many concurrent keep-alive clients, each pair = POST reserve + POST commit
  http / one hot account the same, every pair on one user
  http, commits batched  one POST reserve per pair, commits sent 20 per POST /v1/reservations/batch
                         (how the proxy settles)
  lua / many accounts    the Redis scripts alone (reserve.lua + apply.lua), concurrent callers
  lua pipelined          the same, 100 pairs per pipeline round trip
  lua / one hot account  concurrent callers on one user
Then one reserve at a time (concurrency 1): POST /v1/reservations vs a direct EVALSHA of reserve.lua.
With --profile the credits process runs under py-spy (its CPU column then counts py-spy's process).

The service gets its own database (dropped afterwards) and Redis key namespace (deleted afterwards).
The load generator is a minimal HTTP/1.1 client in this process, which shares the machine's cores with
the service, PostgreSQL and Redis.

Over 400 lines on purpose: one script whose scenarios share the process setup and the report table.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import orjson
import redis.asyncio as aioredis
import uvloop

from bench.profiling import profiler_argv
from services.credits.holds import Holds
from shared.db import drop_database
from shared.holds.protocol import APPLY, RESERVE
from tests.support.servers import service_process

INTERNAL = "dev-internal-token"
ADMIN = "dev-admin-token"


class Connection:
    """One keep-alive HTTP/1.1 connection; just enough client for JSON requests."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: object = None, token: str = INTERNAL
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = orjson.dumps(body) if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.writer.write(head + payload)
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    pairs: int
    seconds: float
    latencies: list[float]
    failures: int
    server_cpu: float | None = None  # CPU seconds the credits process used during the run

    def row(self) -> str:
        rate = self.pairs / self.seconds if self.seconds else 0.0
        lat = sorted(self.latencies) or [0.0]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        if self.server_cpu is not None and self.pairs:
            per_pair = self.server_cpu / self.pairs * 1000
            cpu = f"{per_pair:>9.3f} | {1000 / per_pair:>10,.0f}"
        else:
            cpu = f"{'-':>9} | {'-':>10}"
        return (
            f"| {self.name:<24} | {self.pairs:>7} | {rate:>8,.0f} | {p50:>7.2f} | {p99:>7.2f} | {cpu} |"
            f" {self.failures:>6} |"
        )


async def run_loops(
    name: str, concurrency: int, seconds: float, pair: Callable[[int], Awaitable[bool]]
) -> Result:
    latencies: list[float] = []
    failures = 0
    pairs = 0
    stop = time.perf_counter() + seconds

    async def loop(n: int) -> None:
        nonlocal failures, pairs
        while time.perf_counter() < stop:
            started = time.perf_counter()
            ok = await pair(n)
            if ok:
                pairs += 1
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in range(concurrency)))
    return Result(name, pairs, time.perf_counter() - started, latencies, failures)


async def http_bench(
    url: str, pid: int, accounts: list[str], hot: str, concurrency: int, seconds: float
) -> list[Result]:
    host, port = url.removeprefix("http://").split(":")
    conns = [Connection(host, int(port)) for _ in range(concurrency)]

    def pair_for(users: list[str]) -> Callable[[int], Awaitable[bool]]:
        async def pair(n: int) -> bool:
            c = conns[n]
            user = users[random.randrange(len(users))]
            status, body = await c.request("POST", "/v1/reservations", {"user_id": user, "amount": 1})
            if status != 201:
                return False
            rid = orjson.loads(body)["reservation_id"]
            status, _ = await c.request("POST", f"/v1/reservations/{rid}/commit", {})
            return status == 200

        return pair

    def batched_for(users: list[str], per_batch: int) -> Callable[[int], Awaitable[bool]]:
        # The proxy's way: one reserve per request, commits sent in batches (POST /v1/reservations/batch).
        async def pairs(n: int) -> bool:
            c = conns[n]
            ids = []
            for _ in range(per_batch):
                user = users[random.randrange(len(users))]
                status, body = await c.request("POST", "/v1/reservations", {"user_id": user, "amount": 1})
                if status != 201:
                    return False
                ids.append(orjson.loads(body)["reservation_id"])
            items = [{"reservation_id": rid, "action": "commit"} for rid in ids]
            status, body = await c.request("POST", "/v1/reservations/batch", {"items": items})
            return status == 200 and all(r["status"] == 200 for r in orjson.loads(body)["results"])

        return pairs

    # Warm up connections and the service's pools.
    await run_loops("warm-up", concurrency, 1.0, pair_for(accounts))
    results = []
    for name, users in (("http / many accounts", accounts), ("http / one hot account", [hot])):
        before = cpu_seconds(pid)
        result = await run_loops(name, concurrency, seconds, pair_for(users))
        result.server_cpu = cpu_seconds(pid) - before
        results.append(result)
    per_batch = 20
    before = cpu_seconds(pid)
    result = await run_loops(
        f"http, commits batched x{per_batch}", concurrency, seconds, batched_for(accounts, per_batch)
    )
    result.server_cpu = cpu_seconds(pid) - before
    result.pairs *= per_batch
    result.latencies = [x / per_batch for x in result.latencies]
    results.append(result)
    for c in conns:
        await c.close()
    return results


async def pipelined_pairs(
    client: aioredis.Redis, holds: Holds, accounts: list[str]
) -> Callable[[int], Awaitable[bool]]:
    """A loop body sending 100 reserve+apply pairs per round trip, as raw EVALSHA commands."""
    await client.script_load(RESERVE.source)
    await client.script_load(APPLY.source)
    deadline = int(time.time() * 1000) + 3_600_000

    async def pipelined(n: int) -> bool:
        now_ms = int(time.time() * 1000)
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            acct, dl = holds.keys(accounts[random.randrange(len(accounts))])
            rid = uuid.uuid4().hex
            pipe.execute_command("EVALSHA", RESERVE.sha, 2, acct, dl, rid, 1, "", "exact", deadline, now_ms)
            pipe.execute_command("EVALSHA", APPLY.sha, 2, acct, dl, "", "", rid)
        replies = await pipe.execute()
        return all(int(r[0]) == 1 for r in replies[0::2])

    return pipelined


def pipelined_process(
    redis_url: str, namespace: str, accounts: list[str], seconds: float
) -> tuple[int, float, list[float], int]:
    """Runs 100-pair pipelines in a separate process; returns (pairs, seconds, latencies, failures)."""

    async def run() -> tuple[int, float, list[float], int]:
        client = aioredis.from_url(redis_url, max_connections=16)
        pipelined = await pipelined_pairs(client, Holds(client, 16, namespace), accounts)
        result = await run_loops("p", 8, seconds, pipelined)
        await client.aclose()
        return result.pairs * 100, result.seconds, [x / 100 for x in result.latencies], result.failures

    return uvloop.run(run())


async def lua_bench(
    redis_url: str, namespace: str, accounts: list[str], concurrency: int, seconds: float
) -> list[Result]:
    client = aioredis.from_url(redis_url, max_connections=concurrency + 8)
    holds = Holds(client, 16, namespace)
    for user in accounts:
        await holds.load(user, 10**12, 1, 1, [])
    deadline = int(time.time() * 1000) + 3_600_000

    def pair_for(users: list[str]) -> Callable[[int], Awaitable[bool]]:
        async def pair(n: int) -> bool:
            user = users[random.randrange(len(users))]
            rid = uuid.uuid4().hex
            out = await holds.reserve(user, rid, 1, None, deadline, int(time.time() * 1000))
            if out.status != 1:
                return False
            await holds.apply(user, ended=(rid,))
            return True

        return pair

    results = [await run_loops("lua / many accounts", concurrency, seconds, pair_for(accounts))]
    piped = await run_loops(
        "lua pipelined (x100)", 8, seconds, await pipelined_pairs(client, holds, accounts)
    )
    piped.pairs *= 100
    piped.latencies = [x / 100 for x in piped.latencies]
    results.append(piped)
    # The same from two client processes at once: the Python client, not Redis, limits one process.
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        runs = await asyncio.gather(
            *(
                loop.run_in_executor(pool, pipelined_process, redis_url, namespace, accounts, seconds)
                for _ in range(2)
            )
        )
    results.append(
        Result(
            "lua pipelined, 2 clients",
            sum(r[0] for r in runs),
            max(r[1] for r in runs),
            [x for r in runs for x in r[2]],
            sum(r[3] for r in runs),
        )
    )
    results.append(await run_loops("lua / one hot account", concurrency, seconds, pair_for(accounts[:1])))
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return results


async def reserve_latency(url: str, redis_url: str, namespace: str, user: str, n: int) -> list[Result]:
    """One reserve at a time: over HTTP (what the proxy pays per request today) and as a direct
    EVALSHA of reserve.lua (what a client in the proxy running credits' script would pay)."""
    host, port = url.removeprefix("http://").split(":")
    c = Connection(host, int(port))
    latencies: list[float] = []
    failures = 0
    for i in range(n + 100):
        started = time.perf_counter()
        status, _ = await c.request("POST", "/v1/reservations", {"user_id": user, "amount": 1})
        if i >= 100:  # warm-up excluded
            latencies.append(time.perf_counter() - started)
            failures += status != 201
    await c.close()
    results = [Result("reserve alone, http", n, sum(latencies), latencies, failures)]
    client = aioredis.from_url(redis_url)
    holds = Holds(client, 16, namespace)
    await holds.load(user, 10**12, 1, 1, [])
    deadline = int(time.time() * 1000) + 3_600_000
    latencies = []
    failures = 0
    for i in range(n + 100):
        started = time.perf_counter()
        out = await holds.reserve(user, uuid.uuid4().hex, 1, None, deadline, int(time.time() * 1000))
        if i >= 100:
            latencies.append(time.perf_counter() - started)
            failures += out.status != 1
    await client.delete(*holds.keys(user))
    await client.aclose()
    results.append(Result("reserve alone, evalsha", n, sum(latencies), latencies, failures))
    return results


async def delete_broker_namespace(url: str, namespace: str) -> None:
    """The service declared durable queues and exchanges under this run's namespace; remove them."""
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in ("credits.billing-events", "credit_proxy.dead_letters"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(f"{queue}.{namespace}")
        for exchange in ("credit_proxy.events", "credit_proxy.dlx"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(f"{exchange}.{namespace}")


async def main(args: argparse.Namespace) -> None:
    namespace = f"rbench-{uuid.uuid4().hex[:6]}"
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/cp_bench_credits_{uuid.uuid4().hex[:6]}"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": args.redis_url,
        "REDIS_NAMESPACE": namespace,
        "BROKER_NAMESPACE": namespace,
        "RABBITMQ_URL": args.rabbitmq_url,
        "LOG_LEVEL": "WARNING",
        "DB_POOL_SIZE": str(args.db_pool),
        "DB_HOT_POOL_SIZE": str(args.db_pool),
    }
    accounts = [f"bench-{i}" for i in range(args.accounts)]
    results: list[Result] = []
    latency: list[Result] = []
    try:
        profile = {"wrap": lambda argv: profiler_argv("credits", argv), "stop_signal": signal.SIGINT}
        with service_process("services.credits", env, **(profile if args.profile else {})) as (url, proc):
            host, port = url.removeprefix("http://").split(":")
            c = Connection(host, int(port))
            for user in [*accounts, "bench-hot"]:
                await c.request(
                    "POST", f"/v1/admin/users/{user}/grants", {"credits": 10**12, "reason": "bench"}, ADMIN
                )
            await c.close()
            results += await http_bench(url, proc.pid, accounts, "bench-hot", args.concurrency, args.seconds)
            latency = await reserve_latency(url, args.redis_url, namespace + "-lat", accounts[0], 2000)
        results += await lua_bench(
            args.redis_url, namespace + "-lua", accounts, args.concurrency, args.seconds
        )
    finally:
        await drop_database(database_url)
        await delete_broker_namespace(args.rabbitmq_url, namespace)
        client = aioredis.from_url(args.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    print(
        f"\nreserve+commit pairs, {args.seconds:.0f} s each, concurrency {args.concurrency}, {os.cpu_count()} cores\n"
    )
    print(
        f"| {'scenario':<24} | {'pairs':>7} | {'pairs/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} |"
        f" {'cpu ms/pr':>9} | {'pairs/cpu-s':>10} | {'failed':>6} |"
    )
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 12}|{'-' * 8}|")
    for r in results:
        print(r.row())
    print("\none reserve at a time (concurrency 1), 2000 each:\n")
    print(f"| {'path':<24} | {'p50 ms':>7} | {'p99 ms':>7} | {'failed':>6} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for r in latency:
        lat = sorted(r.latencies)
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        print(f"| {r.name:<24} | {p50:>7.3f} | {p99:>7.3f} | {r.failures:>6} |")
    print(
        "\ncpu ms/pr: CPU the credits process spent per pair; pairs/cpu-s: what one fully available core"
        " would sustain at that cost (the machine's other load does not enter it)."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--db-pool", type=int, default=20)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run credits under py-spy; samples go to bench/profiles/credits.txt (python -m bench.profiling)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--rabbitmq-url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    uvloop.run(main(parser.parse_args()))
