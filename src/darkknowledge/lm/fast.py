"""Closed-form gradients for the most used chunk losses, so a chunk costs about what a
cross-entropy chunk costs (a softmax and one subtraction) instead of an autograd graph
of a dozen [chunk, V] tensors.

Forward KL(p_t ‖ p_s) at temperature τ, per row, with z the student's logits:

- dense teacher: ∂/∂z = (p_s − p_t) / τ.
- top-k + tail teacher on K + 1 buckets (:mod:`darkknowledge.losses.sparse`): a top-k
  token j is its own bucket, so ∂/∂z_j = (p_j − t_j) / τ; every other token shares the
  tail bucket, ∂/∂z_j = p_j · (1 − t_tail / s_tail) / τ, where s_tail is the student's
  mass outside the top-k.
- sampled teacher (drawn ids with weights w = count/k, :mod:`darkknowledge.losses.sampled`):
  the soft cross-entropy estimate −Σ w_i log p_{s,id_i}, ∂/∂z = (p_s·Σw − w) / τ.

Plus ``ce_weight`` · CE(labels) (at temperature 1): ∂/∂z = softmax(z) − onehot(y). The autograd path stays the reference (tests compare them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses.divergences import _up
from ..losses.sampled import SampledTarget


def applies(spec, target) -> bool:
    """Whether the closed form covers this chunk: forward KL (or no KD term) plus CE."""
    if target is None or spec.kd_weight == 0.0:
        return True
    return spec.kind == "forward_kl" or (spec.kind == "jsd" and spec.beta == 0.0)


def _softmax_parts(z: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """(z/τ, logsumexp (n, 1), softmax (n, V)) with as few [n, V] tensors as possible."""
    zt = z if tau == 1.0 else z / tau
    lse = torch.logsumexp(zt, dim=-1, keepdim=True)  # (n, 1)
    return zt, lse, torch.exp(zt - lse)


def _add(grad: Tensor | None, g: Tensor, scale: float) -> Tensor:
    if scale != 1.0:
        g.mul_(scale)
    return g if grad is None else grad.add_(g)


# Below this student tail mass, 1 − Σ top-k loses digits to cancellation: those rows sum
# the tail exactly.
_EXACT_TAIL = 1e-3


def _log_softmax_(z: Tensor) -> Tensor:
    """``z (n, V)`` turned into its log-softmax in place (one transient [n, V] buffer,
    for the exponentials; ``F.log_softmax`` would allocate its result besides)."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(m)
    z.sub_(z.exp().sum(-1, keepdim=True).log())
    return z


def _dense_forward_kl(
    z: Tensor, labels: Tensor | None, t: Tensor, spec, t_scratch: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward KL against dense teacher logits ``t (n, V)`` (plus ``ce_weight`` · CE),
    with three [n, V] fp32 buffers alive at once, as many as a cross-entropy chunk: the
    student's logits ``z`` (overwritten: log-probs, then probabilities, then the
    gradient), the teacher's log-probs (written into ``t`` when ``t_scratch``: a live
    teacher's logits, computed for this chunk) and the teacher's probabilities. Stored
    teacher logits (not ``t_scratch``) are copied first: one buffer more, as is CE at a
    temperature ≠ 1 (its gradient is computed before the logits are scaled)."""
    tau = spec.temperature
    a = spec.kd_weight / tau
    ce_w = spec.ce_weight if labels is not None else 0.0
    grad_ce = None
    if ce_w and tau != 1.0:  # CE at temperature 1 needs the logits before they are scaled
        grad_ce, ce = _ce_grad(z, labels, ce_w)
    if tau != 1.0:
        z.div_(tau)
    ls = _log_softmax_(z)  # the student's log-probs, in z
    if ce_w and tau == 1.0:
        valid = labels != -100
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = -(ls.gather(-1, safe[:, None]).squeeze(-1) * valid).sum()
    lt = t if t_scratch else t.clone()
    if tau != 1.0:
        lt.div_(tau)
    m = lt.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lt.sub_(m)
    pt = lt.exp()
    s = pt.sum(-1, keepdim=True)
    pt.div_(s)
    lt.sub_(s.log())  # the teacher's log-probs
    # Σ p_t (log p_t − log p_s) per row, in lt's buffer; 0 where p_t = 0 (as 0·log 0)
    per = lt.sub_(ls).mul_(pt).sum(-1)
    bad = per.isnan().nonzero().squeeze(1)
    if len(bad):
        rows = lt[bad]
        per[bad] = rows.masked_fill_(pt[bad] == 0, 0.0).sum(-1)
    del lt
    kd = per.clamp_min(0.0).sum()
    ps = ls.exp_()  # the student's probabilities, in z
    if ce_w and tau == 1.0:  # a·(p_s − p_t) + ce_w·(p_s − onehot(y)) on valid rows
        ps.mul_((a + ce_w * valid.to(ps.dtype))[:, None]).sub_(pt, alpha=a)
        rows = torch.arange(len(ps), device=ps.device)[valid]
        ps[rows, safe[valid]] -= ce_w
        g = ps
    else:
        g = ps.sub_(pt)
        if a != 1.0:
            g.mul_(a)
        if grad_ce is not None:
            g.add_(grad_ce)
    del pt
    ce = ce if ce_w else z.new_zeros(())
    return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, g


def _ce_grad(z: Tensor, labels: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """(``weight`` · ∂CE/∂z (n, V), CE sum) at temperature 1, ignoring label −100;
    ``z`` is kept."""
    valid = labels != -100
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    _, lse1, p1 = _softmax_parts(z, 1.0)
    ce = ((lse1.squeeze(-1) - z.gather(-1, safe[:, None]).squeeze(-1)) * valid).sum()
    p1[torch.arange(len(z)), safe] -= 1.0
    if not bool(valid.all()):
        p1.mul_(valid[:, None])
    return _add(None, p1, weight), ce


def chunk_loss_and_grad(
    logits: Tensor,
    labels: Tensor | None,
    target,
    spec,
    *,
    scratch: bool = False,
    target_scratch: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(total, kd sum, ce sum, ∂total/∂logits) for one chunk ``logits (n, V)``.

    ``scratch``: ``logits`` are the caller's own and may be overwritten (the gradient is
    returned in their buffer when they are fp32); ``target_scratch``: so are dense
    teacher logits (a live teacher's, computed for this chunk)."""
    z = _up(logits)
    if target is not None and spec.kd_weight and isinstance(target, Tensor):
        if not scratch and z is logits:
            z = z.clone()
        t = _up(target)
        return _dense_forward_kl(z, labels, t, spec, target_scratch or t is not target)
    tau = spec.temperature
    zero = z.new_zeros(())
    kd = ce = zero
    grad: Tensor | None = None
    if target is not None and spec.kd_weight:
        zt, lse, ps = _softmax_parts(z, tau)  # ps: (n, V), becomes the gradient in place
        if isinstance(target, SampledTarget):
            # −Σ w_i log q_{id_i}; ∂/∂(z/τ) = q·Σw − w scattered onto the ids
            ids, w = target.ids.long(), _up(target.weights)
            per = -(w * (zt.gather(-1, ids) - lse)).sum(-1)
            g = ps.mul_(w.sum(-1, keepdim=True)).scatter_add_(-1, ids, -w)
        elif isinstance(target, tuple):
            ids, lp, tail = target
            ids = ids.long()
            t_k = _up(lp)
            t_tail = _up(tail).clamp_min(1e-30).log().unsqueeze(-1)
            t_b = torch.cat([t_k, t_tail], -1)
            t_b = t_b - torch.logsumexp(t_b, -1, keepdim=True)  # renormalised buckets
            t_k, t_tail = t_b[:, :-1], t_b[:, -1]
            s_k = zt.gather(-1, ids) - lse  # (n, K) student log-probs of the top-k ids
            p_k = ps.gather(-1, ids)
            # log of the student's mass off the top-k: 1 − Σ p_k, or, where that loses
            # digits (a tiny tail), a logsumexp over the other tokens' log-probs
            s_tail_p = (1.0 - p_k.sum(-1)).clamp_min(1e-45)
            s_tail = s_tail_p.log()
            low = (s_tail_p < _EXACT_TAIL).nonzero().squeeze(1)
            if len(low):
                rest = (zt[low] - lse[low]).scatter(-1, ids[low], -1.0e4)
                s_tail = s_tail.index_put((low,), torch.logsumexp(rest, -1))
            pt_k, pt_tail = t_k.exp(), t_tail.exp()
            per = (pt_k * (t_k - s_k)).sum(-1) + pt_tail * (t_tail - s_tail)
            log_ratio = t_tail - s_tail  # log(t_tail / s_tail): the tail tokens' factor
            if len(low):  # p_j − p_j·ratio in log space, the ratio may overflow
                g_low = ps[low] - torch.exp(rest + log_ratio[low].unsqueeze(-1))
            g = ps.mul_(1.0 - log_ratio.clamp_max(80.0).exp().unsqueeze(-1))
            if len(low):
                g[low] = g_low
            g.scatter_(-1, ids, p_k - pt_k)
        kd = per.clamp_min(0.0).sum()
        grad = _add(grad, g, spec.kd_weight / tau)
        del ps, g
    if labels is not None and spec.ce_weight:
        g, ce = _ce_grad(z, labels, spec.ce_weight)
        grad = g if grad is None else grad.add_(g)
    if grad is None:
        grad = torch.zeros_like(z)
    return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, grad
