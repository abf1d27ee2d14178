"""Crash points for the kill-and-resume tests: a real SIGKILL at a named point.

``DK_KILL_AT="step@7"`` makes the process kill itself (SIGKILL, nothing flushed or
cleaned up) the 7th time it passes :func:`point` ``("step")``; several may be given,
comma-separated (the first that matches fires). Unset (always, outside tests), a point
costs one dictionary lookup. Points: ``step`` (after each optimizer step, before any
checkpoint of that step), ``checkpoint`` (right after a checkpoint is written), ``saved``
(a finished model is on disk, its result record not yet), ``shard`` (a store shard is
on disk, the manifest not yet complete), ``answer`` (``dk generate`` wrote one prompt's
row to ``results.jsonl``).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_plan: dict[str, int] | None = None


def _parse() -> dict[str, int]:
    plan = {}
    for item in os.environ.get("DK_KILL_AT", "").split(","):
        name, _, n = item.strip().partition("@")
        if name:
            plan[name] = int(n) if n.isdecimal() else 1
    return plan


def point(name: str) -> None:
    global _plan
    if _plan is None:
        _plan = _parse()
    if name not in _plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
