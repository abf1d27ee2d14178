"""The one metrics log and progress display of the engine."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Append-only JSON lines; on resume, lines written after the checkpoint are cut."""

    def __init__(self, path: Path | None, offset: int, resume: bool):
        self.path = path
        self.f = None
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

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def tell(self) -> int:
        return self.f.tell() if self.f is not None else 0


class Progress:
    """A bar on a terminal; elsewhere (a log file, CI) a line every ``every_s`` seconds
    with step, loss, rate and time left."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_s: float = 30):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every_s, self.t0, self.s0 = every_s, time.perf_counter(), initial
        self.last = self.t0
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False,
                 dynamic_ncols=True)
            if self.tty else None
        )  # fmt: skip

    def update(self, step: int, loss: float | None, **extra) -> None:
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self.bar.set_postfix(post | {k: f"{v:.3f}" for k, v in extra.items()})
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every_s:  # short runs stay quiet
            return
        self.last = now
        rate = (step - self.s0) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        loss_s = f" loss {loss:.4f}" if loss is not None else ""
        print(
            f"{self.desc}: step {step}/{self.total}{loss_s} {rate:.2f} steps/s ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
