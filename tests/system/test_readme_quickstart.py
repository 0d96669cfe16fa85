"""The README's quick start, run as written: `make run`, then its curl lines and its `openai` SDK snippet,
each a paid call for demo-user. Only the environment differs from a developer's terminal: the test's
own databases, Redis namespace and broker names (see tests/support/make_run.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from tests.support.make_run import (
    INTERNAL,
    assert_ports_free,
    ctrl_c,
    drop_databases,
    own_databases,
    processes_with_marker,
    start_system,
    system_env,
    wait_ready,
    wait_until,
)
from tests.support.servers import REPO_ROOT


def quick_start() -> tuple[list[str], str]:
    """The shell lines and the Python snippet of the README's "Quick start" section."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert shell and python, "the quick start needs a sh block and a python block"
    return shell.group(1).strip().splitlines(), python.group(1)


def test_readme_quick_start_as_written(tmp_path: Path, run_id: str) -> None:
    shell, python = quick_start()
    assert len(shell) <= 5, "a five-line quick start"
    assert shell[0].split("#")[0].strip() == "make run"
    commands = [line for line in shell[1:] if line.strip() and not line.lstrip().startswith("#")]
    assert any(c.startswith("curl") and "/v1/chat/completions" in c for c in commands)

    assert_ports_free()
    marker = uuid.uuid4().hex
    settings = own_databases(run_id, "quickstart")
    env = system_env(marker, settings)
    log_path = tmp_path / "make-run.log"
    proc = start_system(["bash", "-c", shell[0]], env, log_path)  # terminal 1, as written
    try:
        wait_ready(proc, log_path)
        account = "http://127.0.0.1:8000/v1/account"
        as_demo = {**INTERNAL, "X-User-Id": "demo-user"}

        # Terminal 2: the README's lines, one by one, through a shell.
        outputs = []
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            outputs.append(json.loads(done.stdout))
        chat, after_curl = outputs[0], outputs[-1]
        assert chat["choices"][0]["message"]["content"], chat
        # A new account starts with 10 signup credits; the chat cost one.
        assert after_curl["user_id"] == "demo-user" and after_curl["credits_remaining"] == 9, after_curl

        # The SDK snippet, as written, with the project's Python.
        sdk = subprocess.run(
            [sys.executable, "-c", python], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert sdk.returncode == 0, sdk.stderr
        assert sdk.stdout.strip(), "the snippet prints the reply"

        def charged_twice() -> bool:
            return bool(httpx.get(account, headers=as_demo).json()["credits_remaining"] == 8)

        wait_until(charged_twice, 15, "the SDK call to be charged")
    finally:
        ctrl_c(proc, timeout=30)
        wait_until(lambda: not processes_with_marker(marker), 15, "make run to stop")
        drop_databases(settings)
