"""Fingerprints of teacher weights: a tensor under several names (tied weights) is hashed
once, and the digest is the one every earlier store recorded (each name's tensor hashed
from its bytes, in name order)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from darkknowledge.store import fingerprint as fp


def _as_recorded(module: nn.Module) -> str:
    """The teacher digest, spelled out: per name, SHA-256 of dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({}).encode())
    for name, v in sorted(module.state_dict().items()):
        t = v.contiguous()
        d = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
        d.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
        h.update(f"0.{name}".encode())
        h.update(d.hexdigest().encode())
    return h.hexdigest()


def test_tied_weights_are_hashed_once_to_the_same_digest(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 8), nn.LayerNorm(8), nn.Linear(8, 50, bias=False))
    net[2].weight = net[0].weight  # tied: one tensor, two names in the state dict
    net.register_buffer("bf16", torch.randn(3, 2).to(torch.bfloat16).t())  # bf16, strided
    hashed = []
    real = fp.tensor_digest
    monkeypatch.setattr(fp, "tensor_digest", lambda t: hashed.append(t.shape) or real(t))
    assert fp.modules_digest([net]) == _as_recorded(net)
    assert len(hashed) == len(net.state_dict()) - 1  # the tied weight once
    # a changed weight changes the digest
    with torch.no_grad():
        net[0].weight[3, 1] += 1.0
    assert fp.modules_digest([net]) == _as_recorded(net) != real(torch.zeros(1))
