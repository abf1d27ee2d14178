"""Divergences against a top-k teacher: ids, log-probabilities and the tail mass.

A top-k teacher gives, per position, the ``K`` most probable classes/tokens ``ids
(..., K)`` with log-probabilities ``logprobs (..., K)`` and the mass of everything else,
``tail (...)`` = 1 − Σ exp(logprobs). Both distributions are compared on the same
K + 1 buckets: the K teacher ids, and one "tail bucket" holding all other outputs
(the student's tail is its probability outside the K ids). This keeps the teacher
distribution normalised, as in the tail-bucket treatment of offline top-k logits in
LLM distillation tools, rather than renormalising the top-k alone (which Anshumann et
al. 2025, "Sparse Logit Sampling", show biases the student's calibration).

Coarse-graining can only lose information (data-processing inequality), so each
bucketed divergence is ≤ the dense one, with equality when the teacher has no mass
outside the top-k or when K = V − 1 (the tail is one class). The student still gets a
gradient on every output through its softmax normaliser.

**Tail prior.** A store may also hold one vector ``log_prior (V,)``: how the teacher's
mass outside its top-k is spread over the other outputs on average (``dk label`` measures
it while labelling). The teacher is then reconstructed as its top-k plus the tail mass
spread in proportion to the prior over the outputs outside that position's top-k, and
``sparse_forward_kl`` / ``sparse_hinton_kd`` compute the exact KL against that full
distribution (no longer ≤ the dense one: it compares with the reconstruction). This
tells the student *where* the tail mass goes, which the bucket form leaves free. The
cost is one ``(..., V) @ (V,)`` product per position. Reverse KL, JSD and TVD keep the
bucket form.

Shapes: ``student_logits (..., V)``, ``ids (..., K)`` int64, ``logprobs (..., K)``,
``tail (...)``, ``mask (...)``. fp32 inside, mean over valid positions, an all-masked
input gives 0 with finite gradients. ``temperature`` divides the student logits; the
teacher's log-probs must have been stored at that same temperature (the store records
it and training refuses a mismatch).

The divergence on the buckets is the registry's (:mod:`.registry`), the same function
the dense forms use on the full ``V``: :func:`sparse_divergence_loss` takes any
registered name; ``sparse_forward_kl`` / ``sparse_reverse_kl`` / ``sparse_jsd`` /
``sparse_tvd`` are its named forms. Only the prior-tail KL is its own computation (it
compares with a V-wide reconstruction without building it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import _up, cross_entropy, masked_mean
from .registry import get_divergence

# A finite stand-in for −∞ in the student's tail: keeps logsumexp's gradient finite
# when the top-k covers every output (an empty tail).
_NEG = -1.0e4


def buckets(
    student_logits: Tensor, ids: Tensor, logprobs: Tensor, tail: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Log-probabilities of student and teacher on the K + 1 buckets, each ``(..., K+1)``.

    The teacher's buckets are renormalised (stored log-probs may be rounded to
    fp16/bf16/8 bits), so they always sum to one.
    """
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)  # (..., V)
    ids = ids.long()
    s_k = s.gather(-1, ids)  # (..., K)
    s_rest = s.scatter(-1, ids, _NEG)  # (..., V): top-k ids removed
    s_tail = torch.logsumexp(s_rest, dim=-1, keepdim=True)  # (..., 1)
    s_b = torch.cat([s_k, s_tail], dim=-1)  # (..., K+1)
    return s_b, _teacher_buckets(logprobs, tail)


def _teacher_buckets(logprobs: Tensor, tail: Tensor) -> Tensor:
    """The teacher's K + 1 bucket log-probabilities ``(..., K+1)``, renormalised."""
    t_tail = _up(tail).clamp_min(1e-30).log().unsqueeze(-1)  # (..., 1)
    t_b = torch.cat([_up(logprobs), t_tail], dim=-1)  # (..., K+1)
    return t_b - torch.logsumexp(t_b, dim=-1, keepdim=True)


def sparse_forward_kl(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    log_prior: Tensor | None = None,
) -> Tensor:
    """KL(p_teacher ‖ p_student) on the top-k + tail buckets (Hinton et al. 2015), or,
    with ``log_prior``, against the top-k + prior-shaped tail reconstruction."""
    if log_prior is not None:
        return masked_mean(
            _prior_kl(student_logits, ids, logprobs, tail, log_prior, temperature), mask
        )
    return sparse_divergence_loss(
        "forward_kl", student_logits, ids, logprobs, tail, temperature, mask
    )


def sparse_divergence_loss(
    name: str,
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **params: float,
) -> Tensor:
    """Registered divergence ``name`` on the K + 1 buckets (:func:`buckets`), mean over
    valid positions; ``params`` go to the divergence (``beta``, ``skew``)."""
    div = get_divergence(name)  # an unknown name fails before any softmax
    s, t = buckets(student_logits, ids, logprobs, tail, temperature)  # (..., K+1) each
    return masked_mean(div(s, t, **params), mask)


def _prior_kl(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    log_prior: Tensor,
    temperature: float,
) -> Tensor:
    """Per position KL(q ‖ p_s), q = top-k + tail·π̃ (π̃: the prior restricted to the
    outputs outside the top-k, renormalised), without building q:

    KL = Σ_K q_k (log q_k − s_k) + τ log τ + τ Σ_{j∉K} π̃_j log π̃_j − τ Σ_{j∉K} π̃_j s_j,
    where Σ_{j∉K} π_j f_j = Σ_j π_j f_j − Σ_K π_k f_k and π̃ = π / Z, Z = 1 − Σ_K π_k."""
    s = F.log_softmax(_up(student_logits) / temperature, dim=-1)  # (..., V)
    ids = ids.long()
    lp = _up(log_prior).to(s.device)
    lp = lp - torch.logsumexp(lp, dim=0)  # (V,) normalised
    pi = lp.exp()
    t_b = _teacher_buckets(logprobs, tail)
    t_k, log_tau = t_b[..., :-1], t_b[..., -1]  # (..., K), (...)
    tau = log_tau.exp()
    s_k = s.gather(-1, ids)  # (..., K)
    pi_k, lp_k = pi[ids], lp[ids]  # (..., K)
    z = (1.0 - pi_k.sum(-1)).clamp_min(1e-12)  # (...) prior mass outside the top-k
    log_z = z.log()
    h_all = (pi * lp).sum()  # Σ_j π_j log π_j
    rest_plogp = h_all - (pi_k * lp_k).sum(-1)  # Σ_{j∉K} π_j log π_j
    rest_ps = s @ pi - (pi_k * s_k).sum(-1)  # Σ_{j∉K} π_j s_j
    top = (t_k.exp() * (t_k - s_k)).sum(-1)
    tail_term = tau * (log_tau + rest_plogp / z - log_z - rest_ps / z)
    return top + tail_term


def sparse_reverse_kl(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(p_student ‖ p_teacher) on the buckets (Gu et al. 2024, "MiniLLM")."""
    return sparse_divergence_loss(
        "reverse_kl", student_logits, ids, logprobs, tail, temperature, mask
    )


def sparse_jsd(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Generalised JSD_β on the buckets (Agarwal et al. 2024, GKD); β = 0 / 1 are
    forward / reverse KL, as in the dense version."""
    return sparse_divergence_loss(
        "jsd", student_logits, ids, logprobs, tail, temperature, mask, beta=beta
    )


def sparse_tvd(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Total variation ½·Σ|p_t − p_s| on the buckets (Wen et al. 2023), in [0, 1]."""
    return sparse_divergence_loss("tvd", student_logits, ids, logprobs, tail, temperature, mask)


def sparse_hinton_kd(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    mask: Tensor | None = None,
    log_prior: Tensor | None = None,
) -> Tensor:
    """Hinton, Vinyals & Dean (2015) against a top-k teacher stored at ``temperature``:
    α·T²·KL_buckets + (1 − α)·CE(y); only the soft term when ``labels`` is None.
    ``log_prior``: KL against the prior-shaped tail instead of the buckets."""
    if temperature <= 0:
        raise ValueError(f"hinton_kd: temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"hinton_kd: alpha must be in [0, 1], got {alpha}")
    soft = temperature**2 * sparse_forward_kl(
        student_logits, ids, logprobs, tail, temperature, mask, log_prior
    )
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels, mask)


def reconstruct(
    ids: Tensor, logprobs: Tensor, tail: Tensor, vocab: int, log_prior: Tensor | None = None
) -> Tensor:
    """A dense distribution ``(..., V)`` (log-probs) from top-k + tail, the tail spread
    evenly over the V − K other outputs, or in proportion to ``log_prior (V,)`` when
    given. For measuring what a top-k store loses."""
    k = ids.shape[-1]
    ids = ids.long()
    log_tail = _up(tail).clamp_min(1e-30).log()  # (...)
    if log_prior is None:
        fill = log_tail - torch.log(torch.tensor(float(max(vocab - k, 1))))
        out = fill.unsqueeze(-1).expand(*ids.shape[:-1], vocab).clone()  # (..., V)
    else:
        lp = _up(log_prior).expand(*ids.shape[:-1], vocab).clone()  # (..., V)
        lp.scatter_(-1, ids, _NEG * 1e3)
        lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        out = lp + log_tail.unsqueeze(-1)
    out.scatter_(-1, ids, _up(logprobs))
    return out - torch.logsumexp(out, dim=-1, keepdim=True)
