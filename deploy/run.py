"""`make run`: the whole system in the foreground on this machine.

Starts credits (:8002), billing (:8001) and the proxy (:8000) as separate processes, plus the local
OpenAI-compatible stand-in (:8010) when OPENAI_API_KEY is unset. Billing runs in its local test mode
when STRIPE_API_KEY is unset. Every child runs in its own process group; Ctrl-C (or SIGTERM) stops
them all, gracefully first, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.devtoken import portal_url  # noqa: E402

COLOURS = {"credits": "\033[36m", "billing": "\033[35m", "proxy": "\033[32m", "upstream": "\033[33m"}
RESET = "\033[0m"


@dataclass
class Child:
    name: str
    module: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pump(child: Child) -> None:
    assert child.proc is not None and child.proc.stdout is not None
    colour = COLOURS.get(child.name, "") if sys.stdout.isatty() else ""
    prefix = f"{colour}{child.name:>8}{RESET if colour else ''} | "
    for raw in iter(child.proc.stdout.readline, b""):
        sys.stdout.write(prefix + raw.decode(errors="replace"))
        sys.stdout.flush()


def _start(child: Child, base_env: dict[str, str]) -> None:
    env = {**base_env, **child.env, "PORT": str(child.port)}
    child.proc = subprocess.Popen(
        [sys.executable, "-m", child.module],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: signals reach the whole child tree
    )
    threading.Thread(target=_pump, args=(child,), daemon=True).start()


def _ready(child: Child, path: str) -> bool:
    try:
        with urllib.request.urlopen(child.url + path, timeout=2) as r:
            return bool(r.status == 200)
    except Exception:
        return False


# Stopped in this order, each group within its time (then killed): the gateway first, while the services
# it settles with (credits), forwards to (billing) and calls (the stand-in) still answer. Stopping them
# all at once left the proxy waiting on a credits that was already gone.
STOP_ORDER: tuple[tuple[tuple[str, ...], float], ...] = (
    (("proxy",), 8.0),
    (("billing", "credits", "upstream"), 5.0),
)


def _signal_group(child: Child, signum: int) -> None:
    assert child.proc is not None
    try:
        os.killpg(child.proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(children: list[Child], hurry: threading.Event) -> None:
    """Stops the children group by group (STOP_ORDER): SIGTERM, a bounded wait, then SIGKILL. A second
    Ctrl-C (`hurry`) kills what is still running at once."""
    by_name = {c.name: c for c in children}
    for names, seconds in STOP_ORDER:
        group = [by_name[n] for n in names if n in by_name and by_name[n].proc is not None]
        for c in group:
            _signal_group(c, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        for c in group:
            assert c.proc is not None
            while c.proc.poll() is None and time.monotonic() < deadline and not hurry.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=0.1)
            if c.proc.poll() is None:
                print(f"{c.name} did not stop within {seconds:g} s; killing it", file=sys.stderr, flush=True)
            # Also whatever the child started and left in its group.
            _signal_group(c, signal.SIGKILL)
            c.proc.wait()
            print(f"stopped {c.name}", flush=True)


def _database(url: str) -> dict[str, str]:
    return {"DATABASE_URL": url} if url else {}


def main() -> int:
    base_env = dict(os.environ)
    base_env.setdefault("LOG_JSON", "false")
    base_env.setdefault("HOST", "127.0.0.1")
    base_env.pop("PORT", None)
    # Credits and billing each need their own database: one DATABASE_URL cannot serve both.
    databases = {
        "credits": base_env.pop("CREDITS_DATABASE_URL", ""),
        "billing": base_env.pop("BILLING_DATABASE_URL", ""),
    }
    if base_env.pop("DATABASE_URL", ""):
        print(
            "DATABASE_URL is ignored by make run (credits and billing cannot share a database); "
            "set CREDITS_DATABASE_URL and BILLING_DATABASE_URL instead",
            file=sys.stderr,
        )
    children: list[Child] = []
    if not base_env.get("OPENAI_API_KEY"):
        children.append(Child("upstream", "services.standin", 8010))
        base_env["OPENAI_BASE_URL"] = "http://127.0.0.1:8010/v1"
        base_env["OPENAI_API_KEY"] = "local-standin"
    children += [
        Child("credits", "services.credits", 8002, _database(databases["credits"])),
        Child("billing", "services.billing", 8001, _database(databases["billing"])),
        Child("proxy", "services.proxy", 8000),
    ]

    stopping = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            hurry.set()  # a second Ctrl-C: no more waiting
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        for child in children:
            _start(child, base_env)
        pending = list(children)
        deadline = time.monotonic() + 90
        while pending and not stopping.is_set():
            for child in list(pending):
                assert child.proc is not None
                if child.proc.poll() is not None:
                    print(
                        f"{child.name} exited with {child.proc.returncode} during start-up", file=sys.stderr
                    )
                    return 1
                probe = "/_standin/stats" if child.name == "upstream" else "/readyz"
                if _ready(child, probe):
                    pending.remove(child)
            if time.monotonic() > deadline:
                print("not ready after 90 s: " + ", ".join(c.name for c in pending), file=sys.stderr)
                return 1
            time.sleep(0.2)
        if stopping.is_set():
            return 0

        stripe_mode = "Stripe" if base_env.get("STRIPE_API_KEY") else "local test mode (no STRIPE_API_KEY)"
        upstream = base_env.get("OPENAI_BASE_URL", "OpenAI")
        print(
            "\nCredit Proxy is running:\n"
            f"  gateway (proxy)  http://127.0.0.1:8000   OpenAI-compatible: base_url=http://127.0.0.1:8000/v1\n"
            f"  billing          http://127.0.0.1:8001   checkout: {stripe_mode}\n"
            f"  credits          http://127.0.0.1:8002\n"
            f"  upstream AI      {upstream}\n"
            f"\n  Portal, signed in as demo-user:\n  {portal_url('demo-user', 'http://127.0.0.1:8000')}\n"
            "  (another user: make token USER=<id>)   Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.is_set():
            for child in children:
                assert child.proc is not None
                if child.proc.poll() is not None:
                    print(f"{child.name} exited with {child.proc.returncode}; stopping", file=sys.stderr)
                    return 1
            stopping.wait(0.5)
        return 0
    finally:
        print("\nstopping…", flush=True)
        _stop(children, hurry)


if __name__ == "__main__":
    raise SystemExit(main())
