"""Proxy latency and throughput benchmark: `.venv/bin/python -m bench.proxy_bench [--litellm]`.

Starts real processes: the stand-in upstream (zero latency), credits (own database, Redis DB 13,
its own broker namespace) and the proxy, all on localhost. Then, for a small non-streamed chat
completion:

1. Concurrency 1: N sequential requests straight to the stand-in and N through the proxy; the
   added latency is the difference of the two distributions' percentiles (p50, p99).
2. Open loop: requests are issued on a fixed schedule at R per second, whether or not earlier ones
   have finished; each latency is measured from its scheduled start (so queueing counts, no
   coordinated omission). R climbs a ladder; the table reports each step, and the highest R whose
   p99 is at most 10 ms with no errors.

With `--litellm` the same steps run against the LiteLLM proxy (installed on first use into
bench/.litellm from PyPI, `litellm[proxy]`, offline cost map, the same upstream), so both are
compared in one run. The load generator is the proxy's own lean HTTP client on uvloop in this
process; it shares the machine's cores with the servers, as the README says.

This module is over 400 lines on purpose: it is one script whose steps (processes, the sequential,
open-loop and closed-loop measurements, CPU accounting, the LiteLLM comparison) share its state and
are read top to bottom; split, each part would be a page of parameters passed around.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import uvloop

from bench.profiling import profiler_argv
from services.proxy.httpclient import HttpPool

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / "bench" / ".litellm"
LOG_DIR = ROOT / "bench" / "logs"
BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in five words"}]}
)
JSON = (b"content-type", b"application/json")
USER = "bench-user"
ADMIN = "dev-admin-token"
INTERNAL = "dev-internal-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}; see {LOG_DIR}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


PROFILED: set[str] = set()  # names of the servers to run under py-spy (--profile)
SERVERS: dict[str, int] = {}  # name -> pid of the servers running now


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc; 0 for a vanished pid)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pids_named(command: str) -> list[int]:
    """Every process whose command name is `command` (e.g. the PostgreSQL backends)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == command:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of each server, this load generator, Redis and PostgreSQL."""
    cpu = {name: cpu_seconds([pid]) for name, pid in SERVERS.items()}
    cpu["load generator"] = time.process_time()
    cpu["redis"] = cpu_seconds(pids_named("redis-server"))
    cpu["postgres"] = cpu_seconds(pids_named("postgres"))
    return cpu


@contextlib.contextmanager
def process(name: str, argv: list[str], env: dict[str, str], ready_url: str) -> Iterator[None]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"{name}.log", "wb")
    profiled = name in PROFILED
    if profiled:
        argv = profiler_argv(name, argv)
    proc = subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_http(ready_url, proc)
        if not profiled:  # under py-spy the pid is py-spy's, not the server's
            SERVERS[name] = proc.pid
        yield
    finally:
        SERVERS.pop(name, None)
        if proc.poll() is None:
            # SIGINT, as a terminal's Ctrl-C: py-spy then writes its samples before it exits.
            os.killpg(proc.pid, signal.SIGINT if profiled else signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@dataclass
class Step:
    rate: float
    sent: int
    errors: int
    p50: float
    p99: float


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(pool: HttpPool, headers: list[tuple[bytes, bytes]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = await pool.request(b"POST", b"/chat/completions", headers=headers, body=BODY)
        out.append(time.perf_counter() - start)
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.body[:200]!r}")
    return out


async def open_loop(pool: HttpPool, headers: list[tuple[bytes, bytes]], rate: float, seconds: float) -> Step:
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        try:
            response = await asyncio.wait_for(
                pool.request(b"POST", b"/chat/completions", headers=headers, body=BODY), 10
            )
            if response.status != 200:
                errors += 1
        except Exception:
            errors += 1
        latencies.append(time.perf_counter() - scheduled)

    # perf_counter, not loop.time(): uvloop's clock is libuv's millisecond time cached per loop
    # iteration, which rounded every latency to whole milliseconds (and read stale under load).
    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    return Step(rate, total, errors, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000)


async def closed_loop(
    pool: HttpPool, headers: list[tuple[bytes, bytes]], concurrency: int, seconds: float
) -> tuple[float, float, int, dict[str, float]]:
    """`concurrency` clients, each sending its next request when the previous one is answered:
    the most the target serves (requests/s), with its p99 (ms), the errors, and the CPU each
    process spent per request (ms), which says where the machine's two cores went."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                response = await asyncio.wait_for(
                    pool.request(b"POST", b"/chat/completions", headers=headers, body=BODY), 10
                )
                errors += response.status != 200
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - started)

    cpu_before = cpu_by_process()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_after = cpu_by_process()
    served = max(1, len(latencies))
    cpu_per_request = {
        name: (cpu_after[name] - cpu_before[name]) / served * 1000 for name in cpu_before if name in cpu_after
    }
    return len(latencies) / elapsed, pct(latencies, 0.99) * 1000, errors, cpu_per_request


async def measure(
    name: str, base_url: str, headers: list[tuple[bytes, bytes]], direct_url: str, args: argparse.Namespace
) -> dict[str, object]:
    pool = HttpPool(base_url, max_connections=2048)
    direct = HttpPool(direct_url, default_headers=[(b"authorization", b"Bearer sk-bench")])
    all_headers = [JSON, *headers]
    await sequential(pool, all_headers, 200)  # warm-up
    await sequential(direct, [JSON], 200)
    d, p = [], []
    for _ in range(5):  # interleaved, so drifting machine load hits both alike
        d += await sequential(direct, [JSON], args.requests // 5)
        p += await sequential(pool, all_headers, args.requests // 5)
    result: dict[str, object] = {
        "name": name,
        "direct_p50": pct(d, 0.5) * 1000,
        "direct_p99": pct(d, 0.99) * 1000,
        "p50": pct(p, 0.5) * 1000,
        "p99": pct(p, 0.99) * 1000,
        "mean": statistics.fmean(p) * 1000,
    }
    result["added_p50"] = float(result["p50"]) - float(result["direct_p50"])  # type: ignore[arg-type]
    result["added_p99"] = float(result["p99"]) - float(result["direct_p99"])  # type: ignore[arg-type]
    steps: list[Step] = []
    best = 0.0
    for rate in args.rates:
        step = await open_loop(pool, all_headers, rate, args.seconds)
        steps.append(step)
        print(
            f"  {name:8} {rate:7.0f}/s  sent {step.sent:6d}  errors {step.errors:4d}  p50 {step.p50:7.2f} ms  p99 {step.p99:8.2f} ms",
            flush=True,
        )
        if step.errors == 0 and step.p99 <= 10.0:
            best = max(best, rate)
        elif step.p99 > 50 or step.errors:
            break
        await asyncio.sleep(1)
    result["steps"] = steps
    result["max_rate"] = best
    await asyncio.sleep(1)
    rps, p99, errors, cpu = await closed_loop(pool, all_headers, args.concurrency, args.seconds)
    print(
        f"  {name:8} closed loop, {args.concurrency} clients: {rps:7.0f} req/s  p99 {p99:8.2f} ms  errors {errors}",
        flush=True,
    )
    spent = ", ".join(f"{process} {ms:.3f}" for process, ms in cpu.items())
    print(f"  {name:8} CPU ms per request in the closed loop: {spent}", flush=True)
    result["closed_rps"] = rps if errors == 0 else 0.0
    result["closed_p99"] = p99
    await pool.aclose()
    await direct.aclose()
    return result


def setup_user(credits_url: str) -> str | None:
    """Credits for the bench user and, if credits allows it, an API key (the realistic caller)."""
    admin = {"authorization": f"Bearer {ADMIN}"}
    internal = {"authorization": f"Bearer {INTERNAL}"}
    r = httpx.post(
        f"{credits_url}/v1/admin/users/{USER}/grants",
        json={"credits": 100_000_000, "reason": "bench"},
        headers=admin,
    )
    r.raise_for_status()
    httpx.post(
        f"{credits_url}/v1/admin/migrations/subscriptions",
        json={"users": [{"user_id": USER, "tier": "pro"}]},
        headers=admin,
    )
    r = httpx.post(f"{credits_url}/v1/users/{USER}/api-keys", json={"name": "bench"}, headers=internal)
    return str(r.json()["key"]) if r.status_code == 201 else None


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print("installing litellm[proxy] into bench/.litellm (first run only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description="proxy latency/throughput benchmark")
    parser.add_argument("--litellm", action="store_true", help="also benchmark the LiteLLM proxy")
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per target")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each open-loop step")
    parser.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[100, 250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500, 3000],
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="clients of the closed-loop throughput step"
    )
    parser.add_argument("--log-level", default="INFO", help="the proxy's LOG_LEVEL (INFO logs every request)")
    parser.add_argument(
        "--holds",
        choices=("redis", "http"),
        default="redis",
        help="where the proxy places holds: straight in credits' Redis (the default) or through"
        " credits' HTTP reserve (HOLDS_IN_REDIS=0)",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run credits and proxy against a local 3-master Redis Cluster (REDIS_CLUSTER=true),"
        " started from the installed redis-server for the run",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated servers (proxy,credits,standin) to run under py-spy; samples go to"
        " bench/profiles/<server>.txt (read them with python -m bench.profiling)",
    )
    args = parser.parse_args()
    PROFILED.update(name for name in args.profile.split(",") if name)

    ns = f"bench-{uuid.uuid4().hex[:6]}"
    common = {"BROKER_NAMESPACE": ns, "REDIS_URL": "redis://127.0.0.1:6379/13", "LOG_LEVEL": args.log_level}
    with contextlib.ExitStack() as cluster:
        if args.redis_cluster:
            from tests.support.redis_cluster import local_cluster

            common.update(REDIS_URL=cluster.enter_context(local_cluster()), REDIS_CLUSTER="true")
        run(args, ns, common)


def run(args: argparse.Namespace, ns: str, common: dict[str, str]) -> None:
    standin_port, credits_port, proxy_port = free_port(), free_port(), free_port()
    standin = f"http://127.0.0.1:{standin_port}"
    credits = f"http://127.0.0.1:{credits_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/cp_bench_{ns.replace('-', '_')}"
    py = sys.executable
    results = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process(
                "standin",
                [py, "-m", "services.standin"],
                {"STANDIN_PORT": str(standin_port), "STANDIN_LOG_LEVEL": "warning"},
                f"{standin}/healthz",
            )
        )
        stack.enter_context(
            process(
                "credits",
                [py, "-m", "services.credits"],
                {**common, "PORT": str(credits_port), "DATABASE_URL": db},
                f"{credits}/readyz",
            )
        )
        key = setup_user(credits)
        stack.enter_context(
            process(
                "proxy",
                [py, "-m", "services.proxy"],
                {
                    **common,
                    "PORT": str(proxy_port),
                    "CREDITS_URL": credits,
                    "OPENAI_BASE_URL": f"{standin}/v1",
                    "OPENAI_API_KEY": "sk-bench",
                    "WORKER_ENABLED": "0",
                    "HOLDS_IN_REDIS": "1" if args.holds == "redis" else "0",
                },
                f"{proxy}/healthz",
            )
        )
        headers = (
            [(b"authorization", f"Bearer {key}".encode())]
            if key
            else [(b"authorization", f"Bearer {INTERNAL}".encode()), (b"x-user-id", USER.encode())]
        )
        print(
            f"proxy caller: {'API key' if key else 'internal token + X-User-Id'}; holds: {args.holds};"
            " upstream: stand-in (0 ms)",
            flush=True,
        )
        results.append(uvloop.run(measure("proxy", f"{proxy}/v1", headers, f"{standin}/v1", args)))
        if args.litellm:
            exe = ensure_litellm()
            port = free_port()
            config = LOG_DIR / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                f"      api_base: {standin}/v1\n      api_key: sk-bench\n"
            )
            # LiteLLM refuses to start without a master key (every request would be unauthenticated);
            # with one and no database, it checks each request's bearer against it, as we check ours.
            master_key = f"sk-bench-{uuid.uuid4().hex}"
            env = {
                "LITELLM_MASTER_KEY": master_key,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "PATH": f"{exe.parent}:{os.environ['PATH']}",
            }
            with process(
                "litellm",
                [str(exe), "--config", str(config), "--port", str(port), "--num_workers", "1"],
                env,
                f"http://127.0.0.1:{port}/health/liveliness",
            ):
                results.append(
                    uvloop.run(
                        measure(
                            "litellm",
                            f"http://127.0.0.1:{port}/v1",
                            [(b"authorization", f"Bearer {master_key}".encode())],
                            f"{standin}/v1",
                            args,
                        )
                    )
                )
    with contextlib.suppress(Exception):
        asyncio.run(_drop_db(db))
    print()
    print(
        f"{'target':8} | {'direct p50':>10} | {'p50':>8} | {'added p50':>9} | {'p99':>8} | {'added p99':>9}"
        f" | {'max req/s @ p99<=10ms':>21} | {'closed-loop req/s':>17} | {'its p99':>8}"
    )
    print("-" * 128)
    for r in results:
        print(
            f"{r['name']:8} | {r['direct_p50']:8.3f}ms | {r['p50']:6.3f}ms | {r['added_p50']:7.3f}ms | {r['p99']:6.3f}ms"
            f" | {r['added_p99']:7.3f}ms | {r['max_rate']:21.0f} | {r['closed_rps']:17.0f} | {r['closed_p99']:6.1f}ms"
        )
    print(
        "\nadded = through the target minus straight to the stand-in, sequential requests (concurrency 1);"
        "\nmax req/s @ p99<=10ms: highest open-loop rate of the ladder meeting it with no errors (0: none did);"
        f"\nclosed loop: {args.concurrency} clients back to back for {args.seconds:.0f} s (0 if any request failed)."
    )
    if len(results) == 2:
        ours, theirs = results
        ratio = float(ours["closed_rps"]) / max(1.0, float(theirs["closed_rps"]))  # type: ignore[arg-type]
        lat = float(theirs["added_p50"]) / max(1e-6, float(ours["added_p50"]))  # type: ignore[arg-type]
        print(
            f"\nthroughput (closed loop): {ratio:.1f}x LiteLLM's; added p50 latency: LiteLLM's is {lat:.1f}x ours"
        )
    print(f"\nmachine: {os.cpu_count()} CPUs shared by load generator and servers; logs in {LOG_DIR}")
    if shutil.which("nproc") is None:
        pass


async def _drop_db(url: str) -> None:
    from shared.db import drop_database

    await drop_database(url)


if __name__ == "__main__":
    main()
