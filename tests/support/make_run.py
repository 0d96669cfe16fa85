"""`make run` (deploy/run.py) started by a test as a developer starts it, on its own databases, Redis
namespace and broker names, and stopped with Ctrl-C as a terminal sends it. A marker in the
environment finds every process it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from shared.db import drop_database
from tests.conftest import PG_BASE, REDIS_URL
from tests.support.servers import REPO_ROOT

PORTS = {"proxy": 8000, "billing": 8001, "credits": 8002, "upstream": 8010}
INTERNAL = {"Authorization": "Bearer dev-internal-token"}
# deploy/run.py prints this once every service is ready.
READY_BANNER = "Ctrl-C stops everything"


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_ports_free() -> None:
    busy = [f"{name} :{port}" for name, port in PORTS.items() if port_in_use(port)]
    assert not busy, f"ports needed by make run are taken: {busy} (is another `make run` running?)"


def processes_with_marker(marker: str) -> list[int]:
    """Every live process whose environment carries our marker: `make run` and all it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if f"CP_SYSTEM_TEST={marker}".encode() in environ.split(b"\0") and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def wait_until(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def own_databases(run_id: str, name: str) -> dict[str, str]:
    """The settings that keep a test's `make run` out of the developer's databases, Redis and broker."""
    return {
        "CREDITS_DATABASE_URL": f"{PG_BASE}/cp_test_{name}_credits_{run_id}",
        "BILLING_DATABASE_URL": f"{PG_BASE}/cp_test_{name}_billing_{run_id}",
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": f"test-{run_id}-{name}",
        "BROKER_NAMESPACE": f"test-{run_id}-{name}",
    }


def drop_databases(settings: dict[str, str]) -> None:
    for var in ("CREDITS_DATABASE_URL", "BILLING_DATABASE_URL"):
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(settings[var]))


def database_dsn(database: str) -> str:
    """asyncpg's DSN for a database of the tests' PostgreSQL."""
    return PG_BASE.replace("postgresql+asyncpg://", "postgresql://") + "/" + database


def system_env(marker: str, settings: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "CP_SYSTEM_TEST": marker, **settings}
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "STRIPE_API_KEY", "DATABASE_URL", "PORT"):
        env.pop(var, None)
    return env


def start_system(command: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Runs `command` in the repository, its output into `log_path`, in a process group of its own
    (the foreground group of a terminal, which Ctrl-C signals as a whole)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    wait_until(
        lambda: proc.poll() is None and READY_BANNER in log_path.read_text(), 150, "make run to be ready"
    )


def ctrl_c(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Ctrl-C as a terminal sends it (SIGINT to the process group), then waits up to `timeout` s for
    the process to end; False when it had to be killed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return False
    return True
