"""The training loop: plain supervised training and distillation are the same loop,
with or without a teacher. Checkpoints hold everything needed for a bit-exact resume."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import TrainConfig
from .data.vision import ArrayDataset, jitter
from .losses import LossStack, cross_entropy
from .signals import Signals
from .teachers import Batch, Teacher

CKPT = "checkpoint.pt"


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    resumed_from: int  # the step training restarted from (0 when not resumed)
    wall_s: float
    history: list[dict] = field(default_factory=list)


def distill_step(
    student: nn.Module, teacher: Teacher | None, batch: Batch, loss: LossStack
) -> tuple[Tensor, dict[str, float], Tensor]:
    """One step's forward: teacher under no-grad, student, each loss term, weighted sum."""
    signals: Signals | None = None
    if teacher is not None:
        with torch.no_grad():
            signals = teacher.signals(batch)  # logits (B, V)
    logits = student(batch.x)  # (B, V)
    total, parts = loss(logits, signals, batch.y)  # scalar, {term: value}
    return total, parts, logits


def fit(
    model: nn.Module,
    train: ArrayDataset,
    cfg: TrainConfig,
    loss: LossStack,
    teacher: Teacher | None = None,
    val: ArrayDataset | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train`` for ``cfg.epochs`` (or ``cfg.max_steps``).

    With ``run_dir``: ``metrics.jsonl`` gets one line per logged step and per epoch, and
    ``checkpoint.pt`` is rewritten atomically every ``cfg.checkpoint_every`` steps (or
    each epoch). ``resume=True`` continues from it: weights, optimizer, scheduler, RNG
    and data position are restored, so the result equals an uninterrupted run's.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else None
    n, bs = len(train), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, total)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    step, resumed_from, metrics_offset = 0, 0, 0
    ckpt_path = run_dir / CKPT if run_dir else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        aug_gen.set_state(state["aug_rng"])
        step = resumed_from = int(state["step"])
        metrics_offset = int(state["metrics_bytes"])
    log = _MetricsLog(run_dir / "metrics.jsonl" if run_dir else None, metrics_offset, resume)
    if resumed_from:
        log.write({"event": "resume", "step": step, "phase": desc})
    every = cfg.checkpoint_every or steps_per_epoch
    history: list[dict] = []
    bar = tqdm(
        total=total,
        initial=step,
        desc=desc,
        file=sys.stderr,
        leave=False,
        disable=None,
        dynamic_ncols=True,
    )
    model.train()
    run_loss = run_acc = None
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        )
        idx = perm[k * bs : (k + 1) * bs]
        batch = Batch(train.x[idx], None if train.y is None else train.y[idx], train.ids[idx])
        if cfg.augment == "jitter":
            batch.x = jitter(batch.x, cfg.jitter_px, aug_gen)
        # ---- the step: forward (teacher no-grad, student), loss terms, update
        total_loss, parts, logits = distill_step(model, teacher, batch, loss)
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if hasattr(model, "apply_constraints"):
            model.apply_constraints()
        if sched is not None:
            sched.step()
        step += 1
        # ---- bookkeeping
        lv = float(total_loss.detach())
        run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
        if batch.y is not None:
            acc = float((logits.argmax(-1) == batch.y).float().mean())
            run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss:.4f}", **({"acc": f"{run_acc:.3f}"} if run_acc else {}))
        if step % 50 == 0 or step == total:
            log.write(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": lv,
                    "lr": opt.param_groups[0]["lr"],
                    **{f"loss/{k_}": v for k_, v in parts.items()},
                }
            )
        if step % steps_per_epoch == 0 or step == total:
            rec = {"step": step, "epoch": epoch + 1, "train_loss": run_loss}
            if val is not None and len(val) and val.y is not None:
                rec.update(_val_metrics(model, val))
                model.train()
            history.append(rec)
            log.write(rec)
        if ckpt_path is not None and (step % every == 0) and step < total:
            _save_checkpoint(ckpt_path, model, opt, sched, aug_gen, step, log.tell())
    bar.close()
    log.close()
    model.eval()
    return TrainResult(model, step, resumed_from, time.perf_counter() - t0, history)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt, cfg: TrainConfig, total: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
    if cfg.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 2))
    return None


@torch.no_grad()
def _val_metrics(model: nn.Module, val: ArrayDataset, batch_size: int = 1024) -> dict:
    model.eval()
    logits = torch.cat([model(val.x[i : i + batch_size]) for i in range(0, len(val), batch_size)])
    return {
        "val_loss": float(cross_entropy(logits, val.y)),
        "val_acc": float((logits.argmax(-1) == val.y).float().mean()),
    }


def _save_checkpoint(path: Path, model, opt, sched, aug_gen, step: int, metrics_bytes: int):
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else {},
        "torch_rng": torch.get_rng_state(),
        "aug_rng": aug_gen.get_state(),
        "step": step,
        "metrics_bytes": metrics_bytes,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old or the new checkpoint


class _MetricsLog:
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
