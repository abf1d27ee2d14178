"""The one metrics log and progress display of the engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..console import Progress as _Progress

_log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSON lines; on resume, lines written after the checkpoint are cut."""

    def __init__(self, path: Path | None, offset: int, resume: bool, trackers=None):
        self.path = path
        self.f = None
        self.trackers = trackers  # train.report_to: each line mirrored there too
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            with open(path, "r+b") as f:
                f.truncate(offset)
        elif path.exists():
            path.unlink()
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if self.trackers is not None:
            self.trackers.write(rec)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        if self.f is not None:
            self.f.close()
            self.f = None

    def tell(self) -> int:
        return self.f.tell() if self.f is not None else 0


class Progress:
    """The engine's progress: a bar on a terminal; elsewhere (a log file, CI) a line with
    step, loss, rate and time left every ``DK_PROGRESS_EVERY_S`` seconds (30), and one at
    each evaluation with its numbers."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_s=None):
        self.p = _Progress(total, initial, desc, unit="step", enabled=enabled,
                           logger=_log, every_s=every_s)  # fmt: skip

    def update(self, step: int, loss: float | None, **extra) -> None:
        fields = {"loss": loss} if loss is not None else {}
        self.p.update(step, **fields, **extra)

    def evaluation(self, rec: dict) -> None:
        """The line of an evaluation: its record's numbers (not step/epoch/time)."""
        skip = {"step", "epoch", "elapsed_s", "stop"}
        self.p.line(**{k: v for k, v in rec.items() if k not in skip and _number(v)})

    def close(self) -> None:
        self.p.close()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
