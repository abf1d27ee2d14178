"""Signals.to / index / cat keep every field: a dropped one silently changes the loss
(the tail prior of a top-k store was lost on .to(device) before)."""

from __future__ import annotations

from dataclasses import fields

import torch

from darkknowledge.signals import Signals


def _full() -> Signals:
    b, t, k, v = 3, 4, 2, 7
    return Signals(
        logits=torch.randn(b, t, v),
        topk_ids=torch.randint(0, v, (b, t, k)),
        topk_logprobs=torch.randn(b, t, k),
        tail_mass=torch.rand(b, t),
        sampled_ids=torch.randint(0, v, (b, t, k)),
        sampled_weights=torch.rand(b, t, k),
        hidden={"h": torch.randn(b, t, 5)},
        mask=torch.ones(b, t, dtype=torch.bool),
        text=["a", "b", "c"],
        temperature=2.0,
        tail_log_prior=torch.randn(v),
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    return a == b


def test_every_field_survives_to_index_and_cat():
    s = _full()
    assert all(getattr(s, f.name) not in (None, {}) for f in fields(s))  # the fixture is full
    moved = s.to("cpu")
    for f in fields(s):
        assert _same(getattr(moved, f.name), getattr(s, f.name)), f.name
    both = Signals.cat([s.index(torch.tensor([0, 1])), s.index(torch.tensor([2]))])
    for f in fields(s):
        assert _same(getattr(both, f.name), getattr(s, f.name)), f.name
