"""The Python entry points: compose teachers, students and losses without YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import TrainConfig
from .data.vision import ArrayDataset
from .evaluate import bytes_on_disk, param_count, predict_logits, quality, speed
from .losses import CE, HintonKD, LossStack
from .report import table
from .teachers import ModuleTeacher, Teacher


@dataclass
class Report:
    rows: dict[str, dict] = field(default_factory=dict)

    def table(self) -> str:
        return table({"rows": self.rows})


@dataclass
class DistillResult:
    student: nn.Module
    history: list[dict]
    report: Report


def distill(
    teacher: nn.Module | Teacher | None,
    student: nn.Module,
    train_set: ArrayDataset,
    val_set: ArrayDataset | None = None,
    loss: object | LossStack | None = None,
    test_set: ArrayDataset | None = None,
    run_dir=None,
    resume: bool = False,
    **train_kwargs,
) -> DistillResult:
    """Train ``student`` on ``train_set`` from ``teacher`` (None: plain training).

    ``loss`` is a term (e.g. ``HintonKD(temperature=4, alpha=0.9)``) or a
    :class:`LossStack`; ``train_kwargs`` are :class:`TrainConfig` fields (epochs, lr, ...).
    With ``test_set`` the report holds teacher and student quality, size and speed.
    """
    from .train import fit

    cfg = TrainConfig(**train_kwargs)
    if teacher is not None and not isinstance(teacher, Teacher):
        teacher = ModuleTeacher(teacher)
    if loss is None:
        loss = HintonKD() if teacher is not None else CE()
    stack = loss if isinstance(loss, LossStack) else LossStack.of(loss)
    res = fit(student, train_set, cfg, stack, teacher, val_set, run_dir, resume, "distil")
    report = Report()
    if test_set is not None:
        shape = test_set.input_shape
        tlog = None
        if teacher is not None:
            tlog = predict_logits(teacher, test_set)
            mods = getattr(teacher, "modules", list)()
            report.rows["teacher"] = (
                quality(tlog, test_set.y)
                | {"params": param_count(mods), "bytes": bytes_on_disk(mods)}
                | speed(teacher, shape)
            )
        slog = predict_logits(student, test_set)
        report.rows["student"] = (
            quality(slog, test_set.y, tlog)
            | {"params": param_count([student]), "bytes": bytes_on_disk([student])}
            | speed(student, shape)
        )
    return DistillResult(res.model, res.history, report)
