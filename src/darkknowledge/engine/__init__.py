"""The engine: one training loop (:mod:`.loop`), one checkpoint format
(:mod:`.checkpoint`), one optimizer and schedule builder (:mod:`.optim`), one metrics
log and progress display (:mod:`.log`), and the run folder's rules (:mod:`.rundir`).
Families sit above it and give it a :class:`Task`; it sits above losses, teachers,
stores and signals."""

from . import checkpoint
from .loop import Fit, Task, train
from .optim import Schedule, build_optimizer

__all__ = ["Fit", "Schedule", "Task", "build_optimizer", "checkpoint", "train"]
