"""A failing test is reported as a failure, never as a crash of the whole run.

On Python 3.11.7 pytest crashed with "INTERNALERROR ... SystemError: AST constructor recursion
depth mismatch" while formatting a failure when the garbage collector ran a finalizer that parsed
code in the middle of pytest's own parse (see tests/support/ast_guard.py). These tests run pytest
with the repository's configuration on a deliberately failing test that provokes exactly that.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ast_guard import AFFECTED
from tests.support.servers import REPO_ROOT

FAILING_TEST = '''
import ast
import gc


class ParsesWhenCollected:
    """Like an asyncio task whose unretrieved exception is logged when the collector frees it."""

    def __init__(self):
        self.me = self  # a cycle: only the garbage collector frees it

    def __del__(self):
        ast.parse("x = (1 + 2) * 3")
        ParsesWhenCollected()  # always one more to collect


def test_deliberately_failing():
    ParsesWhenCollected()
    gc.set_threshold(50)
    assert {"credits": 1}["credits"] == 2


def test_after_the_failure():
    pass
'''


def run_pytest(test_file: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, str(test_file)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_failing_test_is_reported_with_the_projects_configuration(tmp_path: Path) -> None:
    test_file = tmp_path / "test_deliberately_failing.py"
    test_file.write_text(FAILING_TEST)
    result = run_pytest(test_file, "-c", str(REPO_ROOT / "pyproject.toml"), "--rootdir", str(REPO_ROOT))
    output = result.stdout + result.stderr
    assert "INTERNALERROR" not in output, output[-3000:]
    assert result.returncode == 1, output[-3000:]  # 1: tests failed (3 would be an internal error)
    assert "assert 1 == 2" in output
    assert "1 failed, 1 passed" in output


@pytest.mark.skipif(not AFFECTED, reason="this Python has CPython's fix (3.11.8+, 3.12.2+)")
def test_without_the_guard_this_python_crashes(tmp_path: Path) -> None:
    """The guard is what makes the difference: the same run without it ends in the crash."""
    test_file = tmp_path / "test_deliberately_failing.py"
    test_file.write_text(FAILING_TEST)
    result = run_pytest(test_file, "-c", "/dev/null", "--rootdir", str(tmp_path))
    output = result.stdout + result.stderr
    assert "AST constructor recursion depth mismatch" in output, output[-3000:]
    assert result.returncode == 3
