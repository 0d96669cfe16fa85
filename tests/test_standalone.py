"""The repository stands alone: no tracked file points at anything beside or above it.

A clone into an empty folder must run and test with nothing next to it, so code, tests, docs, the
Makefile and deploy files may not name a sibling folder (``../<anything>`` leaving the tree), the
design notes the project was started from, or a path of the machine it was written on.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so this file does not match itself.
_FORBIDDEN = [
    re.compile(r"\.\./" + "shared"),
    re.compile("shared/" + r"(specs|CONTRACT|DESIGN)"),
    re.compile(r"\b(CONTRACT|DESIGN)" + r"\.md\b"),
    re.compile(r"(?<![\w.])/" + r"work/"),
]


def tracked_files() -> list[Path]:
    """Files git tracks (plus new ones not yet added), or every file when this is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "node_modules", "__pycache__", "test-artifacts"}
        return [p for p in REPO_ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]
    return [REPO_ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    offenders: list[str] = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in _FORBIDDEN):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_no_symlink_leaves_the_repository() -> None:
    for path in tracked_files():
        if path.is_symlink():
            assert path.resolve().is_relative_to(REPO_ROOT), f"{path} points outside the repository"


def test_the_vendored_specs_are_in_the_tree() -> None:
    from tests import openai_schema
    from tests.billing.conftest import SPECS_DIR

    for directory in (openai_schema.SPECS_DIR, SPECS_DIR):
        assert directory.resolve().is_relative_to(REPO_ROOT)
    assert openai_schema.spec()["components"]["schemas"]["CreateChatCompletionResponse"]
    assert (SPECS_DIR / "stripe-checkout-subset.json").is_file()
    assert (SPECS_DIR / "stripe-fixtures3.json").is_file()
