"""The one optimizer and learning-rate schedule builder, for every family.

Weight-decay grouping lives here and nowhere else: ``decay: all`` puts every trainable
parameter in one group; ``decay: matrices`` decays tensors of two or more dimensions
only (biases and norm scales are not decayed, as in nanoGPT and BERT's recipes).

Schedules, with ``s`` the step (from 0), ``T`` the run's steps, ``w`` the warm-up steps:

- ``constant``: ``lr``; with warm-up, ``lr·(s+1)/(w+1)`` first.
- ``cosine``: after the warm-up ramp, ``min_lr + ½(1 + cos(π·(s−w)/(T−w)))·(lr − min_lr)``
  (nanoGPT's schedule; ``w = 0, min_lr = 0`` is the plain cosine decay to 0).
- ``linear``: ``lr·(s+1)/w`` during warm-up, then ``lr·(T−s)/(T−w)`` down to 0 (the BERT /
  transformers linear schedule; a fractional warm-up is at least one step).
- ``one_cycle``: PyTorch's ``OneCycleLR`` (Smith & Topin 2019) peaking at ``lr``.

The rate of step ``s`` is set before that step; it depends only on ``s``, so a resumed
run needs no scheduler state (``one_cycle`` keeps PyTorch's, checkpointed).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """Trainable parameters in optimizer groups, in module order."""
    params = [(n, p) for n, p in named if p.requires_grad]
    if cfg.decay == "all":
        return [{"params": [p for _, p in params], "weight_decay": cfg.weight_decay}]
    decay = [p for _, p in params if p.dim() >= 2]
    rest = [p for _, p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(list(module.named_parameters()), cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


class Schedule:
    """The rate of every step (see the module docstring); ``apply`` sets it."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
        self.cfg, self.total = cfg, total
        self.warmup = cfg.warmup_steps(total)
        self.torch_sched = None
        if cfg.schedule == "one_cycle":
            self.torch_sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=cfg.lr, total_steps=max(total, 2)
            )

    def lr(self, s: int) -> float:
        cfg, T, w = self.cfg, self.total, self.warmup
        if cfg.schedule == "linear":
            if s < w:
                return cfg.lr * ((s + 1) / w)
            return cfg.lr * max(0.0, (T - s) / max(1, T - w))
        if s < w:
            return cfg.lr * (s + 1) / (w + 1)
        if cfg.schedule == "constant":
            return cfg.lr
        if w == 0 and cfg.min_lr == 0:  # the plain cosine decay to 0
            return cfg.lr * (0.5 * (1 + math.cos(math.pi * min(s, T) / max(T, 1))))
        frac = (s - w) / max(T - w, 1)
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (cfg.lr - cfg.min_lr)

    def apply(self, opt: torch.optim.Optimizer, s: int) -> float:
        """Set step ``s``'s rate on every group; returns it."""
        if self.torch_sched is not None:
            return opt.param_groups[0]["lr"]  # OneCycleLR set it after the last step
        lr = self.lr(s)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    def step(self) -> None:
        if self.torch_sched is not None:
            self.torch_sched.step()

    def state_dict(self) -> dict:
        return self.torch_sched.state_dict() if self.torch_sched is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.torch_sched is not None:
            self.torch_sched.load_state_dict(state)
