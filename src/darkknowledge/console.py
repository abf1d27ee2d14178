"""What a run says while it works: the ``darkknowledge`` logger hierarchy, ``dk``'s
``-q``/``-v``, and progress (a bar on a terminal, a line every ``DK_PROGRESS_EVERY_S``
seconds elsewhere).

Every module logs to ``logging.getLogger(__name__)`` (children of ``darkknowledge``).
As a library nothing is configured (a ``NullHandler``; ``logging.basicConfig(level=
logging.INFO)`` shows the progress lines); ``dk`` calls :func:`configure`: info lines to
stderr, the command's result on stdout."""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from .errors import DKError

ROOT = "darkknowledge"
log = logging.getLogger(ROOT)
log.addHandler(logging.NullHandler())

ENV_EVERY = "DK_PROGRESS_EVERY_S"
QUIET, NORMAL, VERBOSE = -1, 0, 1


class _Handler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (pytest swaps it), above any tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never break a run
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno < logging.INFO:
            return f"[{stamp}] debug {record.name}: {msg}"
        return f"[{stamp}] {msg}"


def configure(verbosity: int = NORMAL) -> None:
    """``dk``'s logging: QUIET (-q) errors only, NORMAL info and progress, VERBOSE (-v)
    debug lines, and the progress bars and info logs of transformers/datasets too."""
    level = {QUIET: logging.ERROR, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[verbosity]
    progress_every_s()  # a bad DK_PROGRESS_EVERY_S is one line now, not mid-run
    for h in list(log.handlers):
        if isinstance(h, _Handler):
            log.removeHandler(h)
    h = _Handler()
    h.setFormatter(_Formatter())
    log.addHandler(h)
    log.setLevel(level)
    log.propagate = False  # a root handler (the user's, pytest's) would print it twice
    quiet_libraries(verbosity < VERBOSE)


_LIB_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet_libraries(quiet: bool = True) -> None:
    """transformers' and datasets' progress bars and info logs off (``quiet``) or back
    on: through their environment variables before they are imported, their own
    switches once they are (a variable the user set is left alone)."""
    for k, v in _LIB_ENV.items():
        if quiet:
            os.environ.setdefault(k, v)
        elif os.environ.get(k) == v:
            del os.environ[k]
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as tlog

            if quiet:
                tlog.set_verbosity_error()
                tlog.disable_progress_bar()
            else:
                tlog.set_verbosity_info()
                tlog.enable_progress_bar()
        except Exception:  # pragma: no cover - another transformers layout
            pass
    if "datasets" in sys.modules:
        try:
            import datasets

            if quiet:
                datasets.utils.logging.set_verbosity_error()
                datasets.disable_progress_bars()
            else:
                datasets.utils.logging.set_verbosity_info()
                datasets.enable_progress_bars()
        except Exception:  # pragma: no cover
            pass


def progress_every_s() -> float:
    """Seconds between progress lines off a terminal (``DK_PROGRESS_EVERY_S``, 30)."""
    raw = os.environ.get(ENV_EVERY)
    if raw is None or not raw.strip():
        return 30.0
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not math.isfinite(v) or v < 0:
        raise DKError(f"{ENV_EVERY}={raw}: give a number of seconds ≥ 0")
    return v


def duration(s: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.4g}" if abs(v) >= 1000 or v == int(v) else f"{v:.4f}"


class Progress:
    """Progress of ``total`` units (steps, examples, prompts): a tqdm bar when stderr is
    a terminal; elsewhere (a log file, CI, a job's log) an info line
    ``desc: unit done/total, fields, rate, ETA`` at most every ``every_s`` seconds
    (``DK_PROGRESS_EVERY_S``, 30) and whenever :meth:`line` is called. Silent when not
    ``enabled`` or when the logger does not show info (``dk -q``)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        *,
        unit: str = "step",
        enabled: bool = True,
        logger: logging.Logger | None = None,
        every_s: float | None = None,
    ):
        self.log = logger or log
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled and self.log.isEnabledFor(logging.INFO)
        self.every_s = progress_every_s() if every_s is None else every_s
        self.t0 = self.last = time.perf_counter()
        self.n0 = self.n = initial
        self.tty = self.enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                            file=sys.stderr, leave=False, dynamic_ncols=True)  # fmt: skip

    def rate(self) -> float:
        return (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)

    def eta_s(self) -> float:
        r = self.rate()
        return (self.total - self.n) / r if r > 0 else math.inf

    def update(self, n: int, **fields) -> None:
        """``n`` units done; ``fields`` (name: value) go on the bar or the line."""
        if not self.enabled:
            return
        step, self.n = n - self.n, n
        if self.bar is not None:
            self.bar.update(step)
            if fields:
                self.bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.line(**fields)

    def line(self, **fields) -> None:
        """Say where it is now, whatever the time since the last line (on a terminal:
        above the bar)."""
        if not self.enabled:
            return
        self.last = time.perf_counter()
        parts = [f"{self.unit} {self.n}/{self.total}"]
        parts += [f"{k} {_fmt(v)}" for k, v in fields.items()]
        r = self.rate()
        parts.append(f"{r:.3g} {self.unit}s/s" if r < 100 else f"{r:.0f} {self.unit}s/s")
        parts.append(f"ETA {duration(self.eta_s()) if self.n < self.total else '0s'}")
        self.log.info("%s: %s", self.desc, ", ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
