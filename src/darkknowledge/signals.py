"""What a teacher hands to the loss stack, and the protocol it hands it through.

A teacher may give any subset of these. Classification: one distribution per example,
shapes ``(B, V)``; token sequences: one per position, ``(B, T, V)`` with ``mask (B, T)``.

:class:`Batch` and :class:`Teacher` live here, in the lowest layer, so that the signal
store (which labels with a teacher) and the teachers (one of which reads a store) both
import them from below instead of from each other. :mod:`darkknowledge.teachers`
re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Signals:
    logits: Tensor | None = None  # dense logits (B, V) or (B, T, V)
    topk_ids: Tensor | None = None  # (B, K) or (B, T, K), int64
    topk_logprobs: Tensor | None = None  # (B, K) or (B, T, K), log p at T=1
    tail_mass: Tensor | None = None  # (B,) or (B, T): 1 − Σ top-k probabilities
    # sampled teacher (a sampled store): the distinct ids of k draws from the teacher at
    # ``temperature`` and their weights count/k (0 on padding slots), (B, [T,] K)
    sampled_ids: Tensor | None = None
    sampled_weights: Tensor | None = None
    hidden: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, [T,] H)
    mask: Tensor | None = None  # (B,) or (B, T) valid positions
    text: list[str] | None = None  # generated text (sequence-level KD)
    # temperature at which topk_logprobs / tail_mass were computed, or sampled_ids
    # drawn (None: neither)
    temperature: float | None = None
    # (V,) log of the store's tail prior: how the mass outside a position's top-k is
    # spread over the other outputs (None: evenly). One vector for the whole store.
    tail_log_prior: Tensor | None = None

    @property
    def kinds(self) -> list[str]:
        """Names of the signals present, e.g. ``['logits']``."""
        out = []
        if self.logits is not None:
            out.append("logits")
        if self.topk_ids is not None:
            out.append("topk")
        if self.sampled_ids is not None:
            out.append("sampled")
        if self.hidden:
            out.append("hidden")
        if self.text is not None:
            out.append("text")
        return out

    def index(self, idx: Tensor) -> Signals:
        """Rows ``idx`` of every tensor signal (for caches keyed by example)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return Signals(
            logits=pick(self.logits),
            topk_ids=pick(self.topk_ids),
            topk_logprobs=pick(self.topk_logprobs),
            tail_mass=pick(self.tail_mass),
            sampled_ids=pick(self.sampled_ids),
            sampled_weights=pick(self.sampled_weights),
            hidden={k: v[idx] for k, v in self.hidden.items()},
            mask=pick(self.mask),
            text=None if self.text is None else [self.text[i] for i in idx.tolist()],
            temperature=self.temperature,
            tail_log_prior=self.tail_log_prior,
        )

    def to(self, device: torch.device | str) -> Signals:
        """Every tensor signal moved to ``device``; every other field as it is (each
        field of the dataclass: a new one can not be dropped here)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif f.name == "hidden":
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return Signals(**out)

    @staticmethod
    def cat(parts: list[Signals]) -> Signals:
        """Concatenate along the example dimension."""

        def cat(name: str) -> Tensor | None:
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else torch.cat(xs)

        hidden = {k: torch.cat([p.hidden[k] for p in parts]) for k in parts[0].hidden}
        texts = None
        if parts[0].text is not None:
            texts = [t for p in parts for t in p.text]  # type: ignore[union-attr]
        return Signals(
            logits=cat("logits"),
            topk_ids=cat("topk_ids"),
            topk_logprobs=cat("topk_logprobs"),
            tail_mass=cat("tail_mass"),
            sampled_ids=cat("sampled_ids"),
            sampled_weights=cat("sampled_weights"),
            hidden=hidden,
            mask=cat("mask"),
            text=texts,
            temperature=parts[0].temperature,
            tail_log_prior=parts[0].tail_log_prior,
        )


@dataclass
class Batch:
    """One batch. ``x (B, ...)`` inputs, ``y (B,)`` labels or None, ``ids (B,)`` example
    ids (stable across epochs: caches and stores look signals up by them)."""

    x: Tensor
    y: Tensor | None
    ids: Tensor


@runtime_checkable
class Teacher(Protocol):
    """Given a batch, return the teacher's signals. Called under no-grad."""

    def signals(self, batch: Batch) -> Signals: ...
