"""Divergences between teacher and student distributions, as pure tensor functions.

Shapes: logits are ``(..., V)``; ``mask`` (optional) is ``(...)`` with 1/True at valid
positions. Every function computes in fp32 (or fp64 if given fp64), reduces by the mean
over valid positions, and returns 0 with finite gradients when nothing is valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _up(x: Tensor) -> Tensor:
    """Half-precision inputs are promoted to fp32; fp64 stays fp64 (for references)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` (...) over positions where ``mask`` is true.

    An all-masked input gives exactly 0 and a finite (zero) gradient: the sum is
    divided by max(count, 1), never by 0.
    """
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)


def _kl_per_position(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) per position from log-probabilities (..., V) -> (...).

    Uses p·(log p − log q) with 0·log 0 = 0, so one-hot or underflowed p is safe, and
    clamps at 0 to remove tiny negative rounding (bf16 inputs).
    """
    p = p_log.exp()
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p_log))
    return (p * diff).sum(-1).clamp_min(0.0)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL(p_teacher ‖ p_student) at temperature T, mean over valid positions.

    Mode-covering; the divergence of Hinton et al. (2015) "Distilling the Knowledge in a
    Neural Network". No T² factor here (see :func:`hinton_kd`).
    """
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)  # (..., V)
    t = F.log_softmax(_up(teacher_logits) / temperature, dim=-1)  # (..., V)
    return masked_mean(_kl_per_position(t, s), mask)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL(p_student ‖ p_teacher), mode-seeking (Gu et al. 2024, "MiniLLM")."""
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)
    t = F.log_softmax(_up(teacher_logits) / temperature, dim=-1)
    return masked_mean(_kl_per_position(s, t), mask)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Generalised Jensen–Shannon divergence of Agarwal et al. (2024), "On-Policy
    Distillation of Language Models" (GKD).

    With M = β·p_t + (1−β)·p_s: JSD_β = β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M).
    As in GKD, β = 0 is defined as forward KL and β = 1 as reverse KL (near the ends
    JSD_β/β → KL(p_t‖p_s) and JSD_β/(1−β) → KL(p_s‖p_t)).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)  # (..., V)
    t = F.log_softmax(_up(teacher_logits) / temperature, dim=-1)  # (..., V)
    log_beta = torch.log(torch.tensor(beta, dtype=s.dtype))
    log_1mb = torch.log(torch.tensor(1.0 - beta, dtype=s.dtype))
    m = torch.logsumexp(torch.stack([t + log_beta, s + log_1mb]), dim=0)  # (..., V)
    per = beta * _kl_per_position(t, m) + (1.0 - beta) * _kl_per_position(s, m)
    return masked_mean(per, mask)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Total variation distance ½·Σ|p_t − p_s| (Wen et al. 2023, "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation"), in [0, 1]."""
    s = F.softmax(_up(student_logits) / temperature, dim=-1)
    t = F.softmax(_up(teacher_logits) / temperature, dim=-1)
    return masked_mean(0.5 * (t - s).abs().sum(-1), mask)


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Hard-label cross-entropy, mean over valid positions.

    ``labels`` (...) of class ids; ``IGNORE_INDEX`` (−100) marks positions without a
    label. ``mask`` (optional) further restricts the positions.
    """
    logits = _up(student_logits)
    valid = labels != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.bool()
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    per = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none"
    ).reshape(labels.shape)
    return masked_mean(per, valid)


def hinton_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft targets of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a
    Neural Network":

        L = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(y, softmax(s))

    The T² keeps the soft term's gradients the same size as T changes. With
    ``labels=None`` (an unlabelled transfer set) only the soft term is used,
    T²·KL, since there is nothing to mix it with. Positions labelled ``IGNORE_INDEX``
    add nothing to the hard term (a partly labelled transfer set).
    """
    if temperature <= 0:
        raise ValueError(f"hinton_kd: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"hinton_kd: alpha must be in [0, 1], got {alpha}")
    soft = temperature**2 * forward_kl(student_logits, teacher_logits, temperature, mask)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels, mask)
