"""Losses against a sampled teacher: the importance-weighted soft cross-entropy.

A sampled store (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs") keeps, per position, the distinct ids of ``k`` draws with
replacement from the teacher's distribution ``p`` at temperature ``T`` and their counts
``c_i``; the reader turns them into weights ``w_i = c_i / k`` (0 on padding slots).
Since ``E[c_v / k] = p_v`` for every output ``v``,

    Ĥ = −Σ_i w_i · log q_{id_i}          (q: the student's softmax at temperature T)

is an unbiased estimate of the soft cross-entropy ``H(p, q) = −Σ_v p_v log q_v``, and
its gradient in the student logits is an unbiased estimate of the exact gradient
(``(q − p)/T`` per position, estimated by ``(q − w)/T``). The forward KL is
``H(p, q) − H(p)``; the teacher's entropy ``H(p)`` is constant for the student (the
store does not keep it), so the two losses train identically and **the value reported
is the cross-entropy estimate Ĥ**, which is ≥ H(p) ≥ 0, not 0 at a perfect student.

Only these losses are linear in ``p``: reverse KL, JSD, TVD and the skew divergences are
not, and plugging the draws into them gives a biased estimate; they are refused
(:func:`check_sampled_divergence`).

Shapes: ``student_logits (..., V)``, ``ids (..., K)`` int64, ``weights (..., K)``,
``mask (...)``. fp32 inside, mean over valid positions; an all-masked input gives 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from ..errors import DKError
from .divergences import _up, cross_entropy, masked_mean

# The divergences a sampled teacher estimates without bias (as a cross-entropy).
UNBIASED = ("forward_kl",)


class SampledTarget(NamedTuple):
    """A sampled teacher's signal: distinct drawn ``ids (..., K)`` and ``weights (..., K)``
    (count / draws; they sum to 1 per position)."""

    ids: Tensor
    weights: Tensor


def check_sampled_divergence(name: str, where: str) -> None:
    """Refuse (one-line DKError) a divergence that samples do not estimate unbiasedly."""
    if name not in UNBIASED:
        raise DKError(
            f"{where}: {name} cannot be estimated without bias from a sampled store (only "
            "the forward KL / soft cross-entropy is linear in the teacher's probabilities); "
            "use forward_kl or hinton_kd, or a top-k or dense store"
        )


def sampled_cross_entropy_per_position(
    student_logits: Tensor, ids: Tensor, weights: Tensor, temperature: float = 1.0
) -> Tensor:
    """Ĥ per position ``(...)``: −Σ_i w_i log softmax(z/T)_{id_i}."""
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)
    return -(_up(weights) * s.gather(-1, ids.long())).sum(-1)


def sampled_forward_kl(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """The forward-KL loss from a sampled teacher: the unbiased soft cross-entropy
    estimate Ĥ (forward KL + the teacher's entropy, a constant), mean over valid positions."""
    return masked_mean(
        sampled_cross_entropy_per_position(student_logits, ids, weights, temperature), mask
    )


def sampled_hinton_kd(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    mask: Tensor | None = None,
) -> Tensor:
    """Hinton et al. (2015) from a sampled teacher drawn at ``temperature``:
    α·T²·Ĥ + (1 − α)·CE(y); only the soft term when ``labels`` is None."""
    if temperature <= 0:
        raise ValueError(f"hinton_kd: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"hinton_kd: alpha must be in [0, 1], got {alpha}")
    soft = temperature**2 * sampled_forward_kl(student_logits, ids, weights, temperature, mask)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels, mask)
