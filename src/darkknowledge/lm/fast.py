"""Closed-form gradients for the most used chunk losses, so a chunk costs about what a
cross-entropy chunk costs (a softmax and one subtraction) instead of an autograd graph
of a dozen [chunk, V] tensors.

Forward KL(p_t ‖ p_s) at temperature τ, per row, with z the student's logits:

- dense teacher: ∂/∂z = (p_s − p_t) / τ.
- top-k + tail teacher on K + 1 buckets (:mod:`darkknowledge.losses.sparse`): a top-k
  token j is its own bucket, so ∂/∂z_j = (p_j − t_j) / τ; every other token shares the
  tail bucket, ∂/∂z_j = p_j · (1 − t_tail / s_tail) / τ, where s_tail is the student's
  mass outside the top-k.

Plus ``ce_weight`` · CE(labels) (at temperature 1): ∂/∂z = softmax(z) − onehot(y). The autograd path stays the reference (tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.divergences import _up


def applies(spec, target) -> bool:
    """Whether the closed form covers this chunk: forward KL (or no KD term) plus CE."""
    if target is None or spec.kd_weight == 0.0:
        return True
    return spec.kind == "forward_kl" or (spec.kind == "jsd" and spec.beta == 0.0)


def chunk_loss_and_grad(
    logits: Tensor, labels: Tensor | None, target, spec
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total, kd sum, ce sum, ∂total/∂logits) for one chunk ``logits (n, V)``."""
    z = _up(logits)
    tau = spec.temperature
    zero = z.new_zeros(())
    kd = ce = zero
    grad = torch.zeros_like(z)
    if target is not None and spec.kd_weight:
        ls = F.log_softmax(z / tau, dim=-1)  # (n, V)
        ps = ls.exp()
        if isinstance(target, tuple):
            ids, lp, tail = target
            ids = ids.long()
            t_k = _up(lp)
            t_tail = _up(tail).clamp_min(1e-30).log().unsqueeze(-1)
            t_b = torch.cat([t_k, t_tail], -1)
            t_b = t_b - torch.logsumexp(t_b, -1, keepdim=True)  # renormalised buckets
            t_k, t_tail = t_b[:, :-1], t_b[:, -1]
            s_k = ls.gather(-1, ids)  # (n, K)
            in_k = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True)
            s_tail_p = ps.masked_fill(in_k, 0.0).sum(-1)  # (n,) student mass off the top-k
            s_tail = torch.where(
                s_tail_p > 0, s_tail_p.clamp_min(1e-45).log(), torch.full_like(s_tail_p, -1e4)
            )
            pt_k, pt_tail = t_k.exp(), t_tail.exp()
            per = (pt_k * (t_k - s_k)).sum(-1) + torch.where(
                pt_tail > 0, pt_tail * (t_tail - s_tail), torch.zeros_like(pt_tail)
            )
            ratio = torch.where(s_tail_p > 0, pt_tail / s_tail_p.clamp_min(1e-45), 0.0)
            g = ps * (1.0 - ratio).unsqueeze(-1)
            g.scatter_(-1, ids, ps.gather(-1, ids) - pt_k)
        else:
            lt = F.log_softmax(_up(target) / tau, dim=-1)
            pt = lt.exp()
            per = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(lt)).sum(-1)
            g = ps - pt
        kd = per.clamp_min(0.0).sum()
        grad += g * (spec.kd_weight / tau)
    if labels is not None and spec.ce_weight:
        valid = labels != -100
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        l1 = F.log_softmax(z, dim=-1)
        ce = -(l1.gather(-1, safe[:, None]).squeeze(-1) * valid).sum()
        g = l1.exp()
        g[torch.arange(len(z)), safe] -= 1.0
        grad += g * valid[:, None] * spec.ce_weight
    return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, grad
