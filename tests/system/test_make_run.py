"""`make run` on this machine: the whole system comes up, sells a pack in test mode, serves a chat
completion through the gateway, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REDIS_URL
from tests.support.servers import REPO_ROOT

PORTS = {"proxy": 8000, "billing": 8001, "credits": 8002, "upstream": 8010}
INTERNAL = {"Authorization": "Bearer dev-internal-token"}


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_make_run_purchase_chat_and_clean_stop(tmp_path: Path, run_id: str) -> None:
    busy = [f"{name} :{port}" for name, port in PORTS.items() if port_in_use(port)]
    assert not busy, f"ports needed by make run are taken: {busy} (is another `make run` running?)"

    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "CP_SYSTEM_TEST": marker,
        "BROKER_NAMESPACE": f"test-{run_id}-makerun",
        "REDIS_URL": REDIS_URL,
    }
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "STRIPE_API_KEY", "DATABASE_URL", "PORT"):
        env.pop(var, None)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def all_ready() -> bool:
            assert proc.poll() is None, "make run exited early:\n" + log_path.read_text()[-4000:]
            return all(ready(PORTS[s]) for s in ("credits", "billing", "proxy"))

        try:
            wait_until(all_ready, 150, "readyz")
        except AssertionError:
            raise AssertionError(
                "services not ready; make run printed:\n" + log_path.read_text()[-4000:]
            ) from None
        wait_until(
            lambda: "Portal, signed in as demo-user" in log_path.read_text(), 10, "the start-up banner"
        )

        user = f"makerun-{uuid.uuid4().hex[:8]}"
        as_user = {**INTERNAL, "X-User-Id": user}
        gateway = "http://127.0.0.1:8000"
        start = httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"]
        assert start == 10  # signup credits

        # A purchase in local test mode: checkout URL → the TEST MODE page → Pay.
        checkout = httpx.post(f"{gateway}/v1/account/checkout", json={"pack": "starter"}, headers=as_user)
        assert checkout.status_code in (200, 201), checkout.text
        page = httpx.get(checkout.json()["url"])
        assert "TEST MODE" in page.text.upper()
        paid = httpx.post(checkout.json()["url"] + "/pay", follow_redirects=False)
        assert paid.status_code in (302, 303), paid.text
        wait_until(
            lambda: httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"] == 110,
            30,
            "the starter pack's 100 credits",
        )

        # A chat completion through the gateway with the official SDK, charged one credit.
        client = openai.OpenAI(
            base_url=f"{gateway}/v1", api_key="dev-internal-token", default_headers={"X-User-Id": user}
        )
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.choices[0].message.content
        client.close()
        wait_until(
            lambda: httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"] == 109,
            15,
            "the chat to be charged",
        )
        assert processes_with_marker(marker), "the marker should find the running system"
    finally:
        # Ctrl-C in a terminal signals the whole foreground process group.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("make run did not stop within 60 s of Ctrl-C")

    deadline = time.monotonic() + 10
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_marker(marker) == [], (
        "processes left behind after Ctrl-C:\n" + log_path.read_text()[-2000:]
    )
    assert [p for p in PORTS.values() if port_in_use(p)] == []
    assert "stopping" in log_path.read_text()
