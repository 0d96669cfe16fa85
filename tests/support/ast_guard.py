"""Keeps a failing test from crashing pytest on Python 3.11.0-3.11.7 (and 3.12.0-3.12.1).

Those versions keep the AST constructor's recursion counter in one shared place (CPython
gh-106905, fixed in 3.11.8 and 3.12.2). If the garbage collector runs while `ast.parse` builds its
tree, and a finalizer it runs parses too (formatting a traceback parses the line for its ^^^
carets on 3.11: an asyncio task's unretrieved exception logged when the task is freed does that),
the outer parse fails with "SystemError: AST constructor recursion depth mismatch". pytest parses
the failing test's source to report it, so the whole run ended in an INTERNALERROR.

The guard runs every `ast.parse` with the garbage collector paused: nothing else can run Python
code in the middle of building the tree, so no nested parse can happen. Loaded by tests/conftest.py
(and usable alone as `-p tests.support.ast_guard`).
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
from typing import Any

AFFECTED = (3, 11, 0) <= sys.version_info[:3] < (3, 11, 8) or (3, 12, 0) <= sys.version_info[:3] < (3, 12, 2)


def _guarded(parse: Any) -> Any:
    @functools.wraps(parse)
    def parse_without_collection(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return parse(*args, **kwargs)
        gc.disable()
        try:
            return parse(*args, **kwargs)
        finally:
            gc.enable()

    parse_without_collection.__ast_guard__ = True  # type: ignore[attr-defined]
    return parse_without_collection


def install() -> None:
    if AFFECTED and not getattr(ast.parse, "__ast_guard__", False):
        ast.parse = _guarded(ast.parse)


install()
