"""`make test` says what system packages it is about to install before it does, and where it cannot
(or is told not to), says so and carries on: the tests that need them are then skipped, not failed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def stand_ins(folder: Path, *names: str) -> str:
    """Executables that do nothing, so that the machine's own packages don't decide what is missing."""
    for name in names:
        tool = folder / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def make_browser(repo_root: Path, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-s", "browser", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": path},
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["NO_SYSTEM_PACKAGES=1"], "not installing chromium chromium-driver (NO_SYSTEM_PACKAGES is set)"),
        (
            ["APT_GET=/nonexistent/apt-get"],
            "cannot install chromium chromium-driver: no apt-get on this machine",
        ),
    ],
)
def test_says_why_it_skips_and_carries_on(
    repo_root: Path, tmp_path: Path, args: list[str], reason: str
) -> None:
    path = stand_ins(tmp_path, "docker-compose", "pgbouncer")
    done = make_browser(repo_root, path, "CHROMIUM=/nonexistent/chromium", *args)
    assert done.returncode == 0, done.stderr
    assert reason in done.stdout
    assert "the tests that need them (browser, docker-compose, PgBouncer) will be skipped" in done.stdout


def test_says_nothing_when_everything_is_there(repo_root: Path, tmp_path: Path) -> None:
    path = stand_ins(tmp_path, "chromium", "docker-compose", "pgbouncer")
    done = make_browser(repo_root, path, f"CHROMIUM={tmp_path / 'chromium'}")
    assert done.returncode == 0 and done.stdout == "", done.stdout
