"""/readyz on Redis Cluster: ready only when a real key operation works, not on a PING. A credits
service told REDIS_CLUSTER=false while REDIS_URL names a cluster node answered PING, said ready, and
then failed most user creations with MOVED."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx

from tests.support.credits_service import running_credits


async def test_readyz_reports_redis_failing_for_a_single_node_client_on_a_cluster(
    make_database_url: Callable[[str], str], redis_cluster_url: str, broker_namespace: str
) -> None:
    database_url = make_database_url("credits_readyz")
    for cluster, status, redis_check in ((False, 503, "failing: RuntimeError"), (True, 200, "ok")):
        async with (
            running_credits(
                database_url=database_url,
                redis_url=redis_cluster_url,
                redis_cluster=cluster,
                broker_namespace=broker_namespace,
                run_background_tasks=False,
            ) as credits,
            httpx.AsyncClient(base_url=credits.url, headers=credits.headers, timeout=30) as http,
        ):
            r = await http.get("/readyz")
            assert r.status_code == status, r.text
            assert r.json()["checks"]["redis"] == redis_check
            if cluster:  # and what readiness promised holds: users of any id work
                for user in ("}{a", "{b}", "c}"):
                    r = await http.post("/v1/users", json={"user_id": user})
                    assert r.status_code == 201, r.text


async def test_an_unreachable_cluster_is_a_503_not_a_500(
    make_database_url: Callable[[str], str], broker_namespace: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = int(s.getsockname()[1])
    async with (
        running_credits(
            database_url=make_database_url("credits_no_cluster"),
            redis_url=f"redis://127.0.0.1:{closed}/0",
            redis_cluster=True,
            broker_namespace=broker_namespace,
            run_background_tasks=False,
        ) as credits,
        httpx.AsyncClient(base_url=credits.url, headers=credits.headers, timeout=30) as http,
    ):
        r = await http.post("/v1/users", json={"user_id": "nobody-reachable"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert (await http.get("/readyz")).status_code == 503
