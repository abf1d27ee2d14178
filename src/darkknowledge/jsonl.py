"""Reading JSON-lines data files with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import DKError


def iter_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of ``path`` (1-based numbers);
    a line that is not a JSON object stops with ``PATH:LINE: ...``."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DKError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DKError(f"{path}:{n}: expected a JSON object per line")
            yield n, obj
