"""Divergences between teacher and student distributions, as pure tensor functions.

Shapes: logits are ``(..., V)``; ``mask`` (optional) is ``(...)`` with 1/True at valid
positions. Every function computes in fp32 (or fp64 if given fp64), reduces by the mean
over valid positions, and returns 0 with finite gradients when nothing is valid.

The per-position divergences themselves live in :mod:`.registry` (written once, shared
with the top-k + tail forms of :mod:`.sparse` and the chunked LM-head losses of
:mod:`darkknowledge.lm.losses`); this module turns logits into log-probabilities at a
temperature and averages. :func:`divergence_loss` does that for any registered name;
``forward_kl`` / ``reverse_kl`` / ``jsd`` / ``tvd`` are its named forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# _kl_per_position is re-exported: it was importable from here before the registry.
from .registry import _kl_per_position, _up, get_divergence  # noqa: F401

IGNORE_INDEX = -100


def masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` (...) over positions where ``mask`` is true.

    An all-masked input gives exactly 0 and a finite (zero) gradient: the sum is
    divided by max(count, 1), never by 0.
    """
    if mask is None:
        return per_position.mean() if per_position.numel() else per_position.sum()
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) ``(..., V)``, in fp32 (fp64 kept)."""
    return F.log_softmax(_up(logits) / temperature, dim=-1)


def divergence_loss(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **params: float,
) -> Tensor:
    """Registered divergence ``name`` between softmax(teacher/T) and softmax(student/T)
    (logits ``(..., V)``), mean over valid positions; ``params`` go to the divergence
    (``beta`` for jsd, ``skew`` for skew_kl / skew_rkl)."""
    div = get_divergence(name)  # an unknown name fails before any softmax
    s = log_probs(student_logits, temperature)  # (..., V)
    t = log_probs(teacher_logits, temperature)  # (..., V)
    return masked_mean(div(s, t, **params), mask)


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
    return divergence_loss("forward_kl", student_logits, teacher_logits, temperature, mask)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL(p_student ‖ p_teacher), mode-seeking (Gu et al. 2024, "MiniLLM")."""
    return divergence_loss("reverse_kl", student_logits, teacher_logits, temperature, mask)


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
    return divergence_loss("jsd", student_logits, teacher_logits, temperature, mask, beta=beta)


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Total variation distance ½·Σ|p_t − p_s| (Wen et al. 2023, "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation"), in [0, 1]."""
    return divergence_loss("tvd", student_logits, teacher_logits, temperature, mask)


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
    # the registry's forward_kl: the same KL as every other form, only scaled by T²
    kl = divergence_loss("forward_kl", student_logits, teacher_logits, temperature, mask)
    soft = temperature**2 * kl
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels, mask)
