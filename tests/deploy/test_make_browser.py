"""`make test` says what system packages it is about to install before it does, and where it cannot
(or is told not to), says so and carries on: the tests that need them are then skipped, not failed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def make_browser(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-s", "browser", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
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
def test_says_why_it_skips_and_carries_on(repo_root: Path, args: list[str], reason: str) -> None:
    done = make_browser(repo_root, "CHROMIUM=/nonexistent/chromium", *args)
    assert done.returncode == 0, done.stderr
    assert reason in done.stdout
    assert "the tests that need them (browser, docker-compose, PgBouncer) will be skipped" in done.stdout


def test_says_nothing_when_everything_is_there(repo_root: Path, tmp_path: Path) -> None:
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    compose = tmp_path / "docker-compose"
    compose.write_text("#!/bin/sh\n")
    compose.chmod(0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "browser", f"CHROMIUM={chromium}"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stdout == "", done.stdout
