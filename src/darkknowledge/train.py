"""The classify family's task for the engine: plain supervised training and
distillation are the same task, with or without a teacher.

The step's forward fits on one screen (:func:`distill_step`); the loop, checkpoints,
optimizer, schedule and metrics are the engine's (:mod:`darkknowledge.engine`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import dist
from .config import TrainConfig
from .data.vision import ArrayDataset, augment
from .engine import checkpoint, train
from .losses import LossStack, cross_entropy
from .signals import Signals
from .teachers import Batch, Teacher

CKPT = checkpoint.NAME


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    resumed_from: int  # the step training restarted from (0 when not resumed)
    wall_s: float
    history: list[dict] = field(default_factory=list)


def distill_step(
    student: nn.Module,
    teacher: Teacher | None,
    batch: Batch,
    loss: LossStack,
    device: torch.device | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """One step's forward: teacher under no-grad, student, each loss term, weighted sum.

    ``device``: where the student runs, when the teacher's signals come from elsewhere
    (a store, a cache on CPU)."""
    signals: Signals | None = None
    if teacher is not None:
        with torch.no_grad():
            signals = teacher.signals(batch)  # logits (B, V)
        if device is not None and device.type != "cpu":
            signals = signals.to(device)
    logits = student(batch.x)  # (B, V)
    total, parts = loss(logits, signals, batch.y)  # scalar, {term: value}
    return total, parts, logits


def _global_batch(n: int, bs: int, seed: int, epoch: int, k: int) -> Tensor:
    """Example indices ``(B,)`` of step ``k`` of ``epoch``: the same on every process."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * bs : (k + 1) * bs]


class ClassifyTask:
    """Images (or any fixed-size inputs) → class logits.

    Every process draws the same global batch (and the same jitter for it), keeps its
    contiguous slice (:func:`darkknowledge.dist.shard`) and splits that into
    ``grad_accum`` micro-batches. A micro-batch's mean loss is weighted by ``its
    examples / global batch examples``: with the engine's ``× processes`` (DDP averages)
    the update is the gradient of the mean loss over the whole global batch. Dropout
    draws from a per-process RNG stream, so recipes with dropout match a one-process run
    in distribution, not bit for bit."""

    def __init__(self, net, trained, train_set, cfg, loss, teacher, val, dev):
        self.net, self.trained = net, trained
        self.data, self.cfg, self.loss, self.teacher, self.val = train_set, cfg, loss, teacher, val
        self.dev = dev
        self.steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        self.stat_names = ("acc", *loss.terms)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 7919)

    def micro_batches(self, step: int) -> list[Batch]:
        cfg, d = self.cfg, self.data
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = _global_batch(len(d), cfg.batch_size, cfg.seed, epoch, k)  # the same everywhere
        gx = d.x[idx]
        if cfg.augment != "none":  # augment the global batch: one aug stream for all
            gx = augment(gx, cfg.augment, cfg.jitter_px, self.aug_gen)
        pos = dist.shard(torch.arange(len(idx)))  # this process's rows of the batch
        count = dist.all_reduce_sum(torch.tensor([float(len(pos))], device=self.dev))
        self.n_global = float(count.item())  # examples in the global batch (all processes)
        out = []
        for p in pos.tensor_split(cfg.grad_accum):
            y = None if d.y is None else d.y[idx[p]].to(self.dev)
            out.append(Batch(gx[p].to(self.dev), y, d.ids[idx[p]]))
        return out

    def forward(self, mb: Batch) -> tuple[Tensor, dict[str, float]]:
        if not len(mb.x):  # an empty slice (a short last batch) still joins the all-reduce
            return self.net(mb.x).sum() * 0.0, {}  # (0, V) logits: zero gradients
        total, parts, logits = distill_step(self.net, self.teacher, mb, self.loss, self.dev)
        w = len(mb.x) / self.n_global
        stats = {k: v * w for k, v in parts.items()}
        if mb.y is not None:
            stats["acc"] = float((logits.argmax(-1) == mb.y).sum()) / self.n_global
        return total * w, stats

    def after_update(self) -> None:
        if hasattr(self.trained, "apply_constraints"):
            self.trained.apply_constraints()

    def evaluate(self, step: int) -> dict:
        if self.val is None or not len(self.val) or self.val.y is None:
            return {}
        with torch.autocast(self.dev.type, torch.bfloat16, enabled=self._autocast()):
            return _val_metrics(self.net, self.val)  # every process: FSDP needs all

    def _autocast(self) -> bool:
        return self.cfg.dtype == "bf16" or dist.state().mixed_precision == "bf16"

    def state_dict(self) -> dict:
        return {"aug_rng": self.aug_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.aug_gen.set_state(state["aug_rng"])


def fit(
    model: nn.Module,
    train_set: ArrayDataset,
    cfg: TrainConfig,
    loss: LossStack,
    teacher: Teacher | None = None,
    val: ArrayDataset | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train_set`` for ``cfg.epochs`` (or ``cfg.steps``) through the
    engine. With ``run_dir``: ``metrics.jsonl`` and a checkpoint every
    ``cfg.checkpoint_every`` steps (or each epoch); ``resume=True`` continues from it and
    ends with the weights of an uninterrupted run. Under a distributed launcher each
    process trains on its slice of every global batch and process 0 alone writes files."""
    st = dist.state()
    dev = st.device
    teacher_nets = getattr(teacher, "modules", list)() if dev.type != "cpu" else []
    for t in teacher_nets:  # replicated: every process runs the whole teacher
        t.to(dev)
    net = copy.deepcopy(model).to(dev) if st.fsdp else model.to(dev)
    ddp = dist.wrap(net)  # DDP, FSDP (net sharded in place) or net
    task = ClassifyTask(ddp, net, train_set, cfg, loss, teacher, val, dev)
    res = train(task, cfg, Path(run_dir) if run_dir is not None else None, resume=resume, desc=desc)
    if st.fsdp:
        model.load_state_dict(dist.full_state_dict(net))
    else:
        model.to("cpu")
    model.eval()
    for t in teacher_nets:
        t.to("cpu")
    return TrainResult(model, res.steps, res.resumed_from, res.wall_s, res.history)


@torch.no_grad()
def _val_metrics(model: nn.Module, val: ArrayDataset, batch_size: int = 1024) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat(
        [
            model(val.x[i : i + batch_size].to(dev)).float().cpu()
            for i in range(0, len(val), batch_size)
        ]
    )
    return {
        "val_loss": float(cross_entropy(logits, val.y)),
        "val_acc": float((logits.argmax(-1) == val.y).float().mean()),
    }
