"""Operator analytics at scale: GET /v1/admin/analytics and the dashboard's first load over a million
ledger rows and 100k users.

    .venv/bin/python -m bench.analytics [--users 100000] [--ledger 1000000] [--repeat 15]

Builds its own database (dropped afterwards), migrates it, bulk-loads it with generate_series (a
year of history: every user's signup bonus, purchases of the four built-in packs by a third of the
users, some refunded, and usage entries with `details` of four models over the year up to now), then
starts one credits process on it and measures:
  analytics, first call     the call that rolls the year's whole days up into ledger_daily (once)
  analytics, all time       then each call (p50 / p95 / max of --repeat)
  analytics, one month      from = 29 days ago, to = today
  dashboard first load      a new connection: GET /admin/, its CSS and JS, Chart.js, and the analytics
                            call for all time (what the browser fetches before drawing), one after another;
                            gzip accepted as a browser does, and once more without (for comparison)
Target: 250 ms each (all time and one month).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from services.credits.runtime import MIGRATIONS_DIR
from shared.db import drop_database, migrate
from tests.support.broker import delete_namespace
from tests.support.servers import service_process

ADMIN = "dev-admin-token"
TARGET_MS = 250.0


def load_sql(users: int, ledger: int) -> list[str]:
    """Statements that fill the schema; ids and timestamps derive from generate_series."""
    purchases = users // 3 + users // 10  # a third buy once, a tenth of all buy twice
    usage = max(ledger - users - purchases, 0)
    return [
        # Users sign up over the last 365 days.
        f"""
        INSERT INTO accounts (user_id, balance, credits_purchased_total, tier, created_at)
        SELECT 'user-' || g, 100, 0, 'free', now() - ((g % 365) || ' days')::interval - ((g % 86400) || ' s')::interval
        FROM generate_series(1, {users}) g
        """,
        """
        INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference, created_at)
        SELECT user_id, 'signup_bonus', 100, 100, 'signup:' || user_id, created_at FROM accounts
        """,
        # Purchases: user g buys the pack g % 4 a day after signing up; every tenth user again later.
        f"""
        INSERT INTO purchases (purchase_id, user_id, pack, credits, amount_cents, currency, unlocks_api, applied_at)
        SELECT 'pur-' || g, 'user-' || (CASE WHEN g <= {users // 3} THEN g * 3 ELSE (g - {users // 3}) * 10 END),
               (ARRAY['starter','standard','pro','business'])[1 + g % 4],
               (ARRAY[100, 500, 1200, 5000])[1 + g % 4], (ARRAY[500, 1500, 3000, 10000])[1 + g % 4], 'usd',
               g % 4 >= 2,
               LEAST(now(), a.created_at + (CASE WHEN g <= {users // 3} THEN 1 ELSE 20 END || ' days')::interval)
        FROM generate_series(1, {purchases}) g
        JOIN accounts a ON a.user_id = 'user-' || (CASE WHEN g <= {users // 3} THEN g * 3 ELSE (g - {users // 3}) * 10 END)
        """,
        """
        INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference, created_at)
        SELECT user_id, 'purchase', credits, credits, 'purchase:' || purchase_id, applied_at FROM purchases
        """,
        # One purchase in fifty is refunded in full a week later (or now).
        """
        INSERT INTO purchase_refunds (purchase_id, cumulative_credits, cents, refunded_at)
        SELECT purchase_id, credits, amount_cents, LEAST(now(), applied_at + interval '7 days')
        FROM purchases WHERE substr(purchase_id, 5)::int % 50 = 0
        """,
        # Usage spread over the year up to now, by buyers and free users alike.
        f"""
        INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference, details, created_at)
        SELECT 'user-' || (1 + g % {users}), 'usage', -(1 + g % 5), 0, 'reservation:bench-' || g || ':commit',
               jsonb_build_object(
                   'operation', (ARRAY['chat.completions','chat.completions','embeddings','images.generations'])[1 + g % 4],
                   'model', (ARRAY['gpt-4o-mini','gpt-4o','text-embedding-3-small','dall-e-3'])[1 + g % 4],
                   'input_tokens', CASE WHEN g % 4 = 3 THEN NULL ELSE g % 2000 END,
                   'output_tokens', CASE WHEN g % 4 < 2 THEN g % 500 END,
                   'upstream_cost_usd', round((g % 100) / 10000.0, 6)),
               now() - ((g % 365) || ' days')::interval - ((g % 86399) || ' s')::interval
        FROM generate_series(1, {usage}) g
        """,
        "UPDATE accounts a SET tier = p.pack FROM (SELECT DISTINCT ON (user_id) user_id, pack FROM purchases "
        "ORDER BY user_id, credits DESC) p WHERE p.user_id = a.user_id",
        # A balance is the sum of its ledger entries (what analytics' credits remaining relies on).
        "UPDATE accounts a SET balance = l.total FROM (SELECT user_id, sum(amount) AS total FROM ledger_entries "
        "GROUP BY user_id) l WHERE l.user_id = a.user_id",
    ]


def stats(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"{statistics.median(ms):>8.1f} | {p95:>8.1f} | {ms[-1]:>8.1f}"


async def timed_get(client: httpx.AsyncClient, path: str, **params: str) -> float:
    start = time.perf_counter()
    r = await client.get(path, params=params or None)
    r.raise_for_status()
    return time.perf_counter() - start


async def first_load(url: str, accept_encoding: str = "gzip, deflate") -> float:
    """What a browser fetches before drawing the dashboard, on a fresh connection."""
    start = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=url, timeout=60, headers={"Accept-Encoding": accept_encoding}
    ) as client:
        for path in (
            "/admin/",
            "/admin/assets/dashboard.css",
            "/admin/assets/dashboard.js",
            "/admin/vendor/chart.umd.js",
        ):
            (await client.get(path)).raise_for_status()
        r = await client.get("/v1/admin/analytics", headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> int:
    namespace = f"abench-{uuid.uuid4().hex[:6]}"
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/cp_bench_analytics_{uuid.uuid4().hex[:6]}"
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    rows: list[tuple[str, str]] = []
    try:
        await migrate(database_url, MIGRATIONS_DIR)
        conn = await asyncpg.connect(dsn)
        try:
            start = time.perf_counter()
            for statement in load_sql(args.users, args.ledger):
                await conn.execute(statement)
            await conn.execute("VACUUM ANALYZE")
            loaded = time.perf_counter() - start
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM ledger_entries) AS ledger, (SELECT count(*) FROM accounts) AS users,"
                " (SELECT count(*) FROM purchases) AS purchases, (SELECT count(*) FROM purchase_refunds) AS refunds"
            )
        finally:
            await conn.close()
        print(
            f"loaded {counts['ledger']:,} ledger rows, {counts['users']:,} users, {counts['purchases']:,} purchases,"
            f" {counts['refunds']:,} refunds in {loaded:.1f} s",
            flush=True,
        )
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": args.redis_url,
            "REDIS_NAMESPACE": namespace,
            "BROKER_NAMESPACE": namespace,
            "RABBITMQ_URL": args.rabbitmq_url,
            "LOG_LEVEL": "WARNING",
        }
        today = datetime.now(UTC).date()
        month = {"from": (today - timedelta(days=29)).isoformat(), "to": today.isoformat()}
        with service_process("services.credits", env) as (url, _proc):
            async with httpx.AsyncClient(
                base_url=url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}
            ) as client:
                cold = await timed_get(client, "/v1/admin/analytics")
                rows.append(
                    (
                        "analytics, first call (builds the rollup)",
                        f"{cold * 1000:>8.1f} |        - |        -",
                    )
                )
                whole = [await timed_get(client, "/v1/admin/analytics") for _ in range(args.repeat)]
                one_month = [
                    await timed_get(client, "/v1/admin/analytics", **month) for _ in range(args.repeat)
                ]
                answer = (await client.get("/v1/admin/analytics")).json()
            loads = [await first_load(url) for _ in range(args.repeat)]
            plain_loads = [await first_load(url, "identity") for _ in range(args.repeat)]
        rows += [
            ("analytics, all time", stats(whole)),
            ("analytics, one month", stats(one_month)),
            ("dashboard first load (all time)", stats(loads)),
            ("dashboard first load, uncompressed", stats(plain_loads)),
        ]
    finally:
        await drop_database(database_url)
        await delete_namespace(args.rabbitmq_url, namespace)
    print(f"\n{os.cpu_count()} cores; {args.repeat} calls each after the first; target {TARGET_MS:.0f} ms\n")
    print(f"| {'what':<42} | {'p50 ms':>8} | {'p95 ms':>8} | {'max ms':>8} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, figures in rows:
        print(f"| {name:<42} | {figures} |")
    print(
        f"\nall time: revenue ${answer['revenue_cents'] / 100:,.2f}, {answer['total_credits_used']:,} credits used,"
        f" {len(answer['daily'])} days, {len(answer['usage_by_model'])} models"
    )
    met = all(statistics.median(s) * 1000 <= TARGET_MS for s in (whole, one_month, loads))
    print("target met (p50)" if met else "target missed (p50)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--ledger", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--rabbitmq-url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    raise SystemExit(asyncio.run(main(parser.parse_args())))
