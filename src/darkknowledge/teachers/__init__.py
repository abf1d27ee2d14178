"""Teachers: anything that, given a batch, returns :class:`~darkknowledge.signals.Signals`.

Transports behind one protocol: a local module, an ensemble, a per-run cache of a
teacher's outputs for fixed inputs, and a signal store written by ``dk label``
(:mod:`.store`). (Remote APIs plug in the same way.) The protocol, :class:`Teacher`, and
the :class:`Batch` it takes are defined in :mod:`darkknowledge.signals` (below both the
teachers and the store, which labels with a teacher) and re-exported here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..signals import Batch, Signals, Teacher
from .store import StoreTeacher


class ModuleTeacher:
    """A local ``nn.Module`` in eval mode, run without gradients."""

    def __init__(self, module: nn.Module):
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.inference_mode()
    def signals(self, batch: Batch) -> Signals:
        return Signals(logits=self.module(batch.x).float())  # (B, V)

    def modules(self) -> list[nn.Module]:
        return [self.module]


class Ensemble:
    """Several teachers combined into one distribution (Hinton et al. 2015 §4).

    ``combine='prob_mean'``: logits = log Σ w_i softmax(z_i) (arithmetic mean of
    probabilities); ``'logit_mean'``: Σ w_i z_i (geometric mean, renormalised).
    Weights are normalised to sum to 1.
    """

    def __init__(
        self,
        members: list[nn.Module | Teacher],
        combine: Literal["prob_mean", "logit_mean"] = "prob_mean",
        weights: list[float] | None = None,
    ):
        if not members:
            raise ValueError("Ensemble needs at least one member")
        if combine not in ("prob_mean", "logit_mean"):
            raise ValueError(f"Ensemble combine must be prob_mean or logit_mean, not {combine!r}")
        self.members = [m if isinstance(m, Teacher) else ModuleTeacher(m) for m in members]
        w = torch.tensor(weights if weights is not None else [1.0] * len(members))
        if len(w) != len(members):
            raise ValueError("Ensemble: one weight per member")
        self.weights = w / w.sum()
        self.combine = combine

    @torch.inference_mode()
    def signals(self, batch: Batch) -> Signals:
        logits = torch.stack([m.signals(batch).logits for m in self.members])  # (M, B, V)
        w = self.weights.to(logits.dtype).view(-1, *[1] * (logits.dim() - 1))  # (M,1,1)
        if self.combine == "logit_mean":
            out = (w * logits).sum(0)
        else:
            out = torch.logsumexp(F.log_softmax(logits, -1) + w.log(), dim=0)  # (B, V)
        return Signals(logits=out)

    def modules(self) -> list[nn.Module]:
        return [mod for m in self.members for mod in getattr(m, "modules", list)()]


class CachedTeacher:
    """A teacher's signals for a fixed set of inputs, computed once and looked up by
    example id. Valid only when inputs are not randomly augmented."""

    def __init__(self, teacher: Teacher, x: Tensor, ids: Tensor, batch_size: int = 512):
        parts = []
        for i in range(0, len(x), batch_size):
            parts.append(
                teacher.signals(Batch(x[i : i + batch_size], None, ids[i : i + batch_size]))
            )
        self.table = Signals.cat(parts) if parts else Signals()
        self.inner = teacher
        self._pos = torch.full((int(ids.max()) + 1 if len(ids) else 0,), -1, dtype=torch.long)
        self._pos[ids] = torch.arange(len(ids))

    def signals(self, batch: Batch) -> Signals:
        rows = self._pos[batch.ids]
        if (rows < 0).any():
            raise KeyError("CachedTeacher: batch holds examples that were not cached")
        return self.table.index(rows)

    def modules(self) -> list[nn.Module]:
        return getattr(self.inner, "modules", list)()


__all__ = ["Batch", "CachedTeacher", "Ensemble", "ModuleTeacher", "StoreTeacher", "Teacher"]
