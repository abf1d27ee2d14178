"""Reading JSON and JSON-lines data with one-line errors, bounded in line size and depth.

A line longer than :data:`MAX_LINE_BYTES`, bytes that are not UTF-8, and JSON nested
deeper than :data:`MAX_JSON_DEPTH` (a 20,000-deep array would otherwise end in Python's
``RecursionError``) each stop with ``PATH:LINE: ...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DKError

MAX_LINE_BYTES = 16 << 20  # one JSONL row
MAX_JSON_DEPTH = 64  # nesting of one JSON value (objects and arrays)


def too_deep(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` (dicts and lists) nests deeper than ``limit``; iterative, and
    safe on self-referencing containers."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            kids = node.values()
        elif isinstance(node, (list, tuple)):
            kids = node
        else:
            continue
        if depth > limit:
            return True
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend((k, depth + 1) for k in kids if isinstance(k, (dict, list, tuple)))
    return False


def loads(text: str | bytes, where: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with one-line errors (``where: ...``) and a depth bound."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DKError(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DKError(f"{where}: not JSON ({e.msg})") from None
    except RecursionError:
        raise DKError(f"{where}: JSON nested deeper than {limit} levels") from None
    # cheap test first: a value with few brackets cannot be deep
    if text.count("[") + text.count("{") > limit and too_deep(obj, limit):
        raise DKError(f"{where}: JSON nested deeper than {limit} levels")
    return obj


def iter_lines(path: str | Path, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``path`` (1-based), each checked for
    size and UTF-8 before it is decoded."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DKError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        n = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_bytes:
                raise DKError(f"{path}:{n}: line longer than {max_bytes >> 20} MB")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DKError(
                    f"{path}:{n}: not UTF-8 text (bad byte at column {e.start + 1})"
                ) from None
            yield n, line


def iter_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of ``path`` (1-based numbers);
    a line that is not a JSON object stops with ``PATH:LINE: ...``."""
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        obj = loads(line, f"{path}:{n}")
        if not isinstance(obj, dict):
            raise DKError(f"{path}:{n}: expected a JSON object per line")
        yield n, obj
