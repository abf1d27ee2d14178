"""The one divergence vocabulary: every per-position divergence, written once, by name.

A divergence is one pure function over log-probabilities::

    fn(student_logp (..., V), teacher_logp (..., V), **params) -> (...)

computed in fp32 (fp64 stays fp64, for references) and never negative. ``V`` is whatever
the caller compares on: the full vocabulary / class set (dense teacher), the K + 1
buckets of a top-k + tail teacher (:func:`darkknowledge.losses.sparse.buckets`), or one
chunk of an LM head's rows (:mod:`darkknowledge.lm.losses`). Every loss form looks its
divergence up here, so a divergence registered with :func:`register_divergence` is at
once usable by name in all of them (``divergence_loss``, ``sparse_divergence_loss``,
``TokenLoss(kind=...)``), and the forms cannot drift apart.

Registered: ``forward_kl`` (Hinton et al. 2015), ``reverse_kl`` (Gu et al. 2024,
MiniLLM), ``jsd`` (β; Agarwal et al. 2024, GKD), ``tvd`` (Wen et al. 2023), ``skew_kl`` /
``skew_rkl`` (skew α; Ko et al. 2024, DistiLLM).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DivergenceFn = Callable[..., Tensor]


def _up(x: Tensor) -> Tensor:
    """Half-precision inputs are promoted to fp32; fp64 stays fp64 (for references)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class Divergence:
    """One registered divergence: ``fn`` and the names of its keyword parameters.

    Calling it promotes the log-probabilities to fp32 and passes only the parameters it
    declares, so a typo (``bta=0.3``) is an error rather than a silent default.
    """

    name: str
    fn: DivergenceFn
    params: tuple[str, ...] = ()
    cite: str = ""

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor, **params: float) -> Tensor:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            takes = ", ".join(self.params) or "no parameters"
            raise ValueError(f"divergence {self.name!r} takes {takes}; got {', '.join(unknown)}")
        return self.fn(_up(student_logp), _up(teacher_logp), **params)


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(
    name: str, *, params: tuple[str, ...] = (), cite: str = ""
) -> Callable[[DivergenceFn], DivergenceFn]:
    """Decorator: add ``fn(student_logp, teacher_logp, **params) -> (...)`` to
    :data:`DIVERGENCES` under ``name``; returns ``fn`` unchanged.

    ``params`` are the names of ``fn``'s keyword parameters (their defaults are ``fn``'s
    defaults). The function must be pure, compute in the dtype it is given (the registry
    hands it fp32 or fp64), and never return a negative value (clamp rounding at 0).
    Loss forms that carry named fields (``TokenLoss.beta`` / ``.skew``) fill parameters
    of the same name; others keep ``fn``'s default.
    """
    if name in DIVERGENCES:
        raise ValueError(f"divergence {name!r} is already registered")
    params = tuple(params)

    def add(fn: DivergenceFn) -> DivergenceFn:
        accepted = inspect.signature(fn).parameters
        missing = [p for p in params if p not in accepted]
        if missing:
            raise ValueError(f"divergence {name!r}: {fn.__name__} has no parameter {missing}")
        DIVERGENCES[name] = Divergence(name, fn, params, cite)
        return fn

    return add


def get_divergence(name: str) -> Divergence:
    """The registered divergence ``name``; a ``ValueError`` naming the known ones if none."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        known = ", ".join(DIVERGENCES)
        raise ValueError(f"unknown divergence {name!r}; known: {known}") from None


def per_position(name: str, student_logp: Tensor, teacher_logp: Tensor, **params: float) -> Tensor:
    """Divergence ``name`` per position ``(...)`` from log-probabilities ``(..., V)``."""
    return get_divergence(name)(student_logp, teacher_logp, **params)


# ------------------------------------------------------------------ building blocks


def _kl_per_position(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) per position from log-probabilities (..., V) -> (...).

    Uses p·(log p − log q) with 0·log 0 = 0, so one-hot or underflowed p is safe, and
    clamps at 0 to remove tiny negative rounding (bf16 inputs).
    """
    p = p_log.exp()
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p_log))
    return (p * diff).sum(-1).clamp_min(0.0)


def _mix_log(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """log(α·e^a + (1−α)·e^b) for log-probabilities a, b ``(..., V)``.

    ``logaddexp`` rather than a stacked logsumexp: no (2, ..., V) temporary, which
    matters on an LM head's [chunk, V] rows.
    """
    if alpha == 0.0:
        return b
    la = torch.log(torch.tensor(alpha, dtype=a.dtype))
    lb = torch.log(torch.tensor(1.0 - alpha, dtype=a.dtype))
    return torch.logaddexp(a + la, b + lb)


# ------------------------------------------------------------------ the divergences


@register_divergence("forward_kl", cite="Hinton, Vinyals & Dean 2015")
def _forward_kl(s: Tensor, t: Tensor) -> Tensor:
    """KL(p_t ‖ p_s): mode-covering; the divergence of Hinton et al. (2015),
    "Distilling the Knowledge in a Neural Network"."""
    return _kl_per_position(t, s)


@register_divergence("reverse_kl", cite="Gu et al. 2024, MiniLLM")
def _reverse_kl(s: Tensor, t: Tensor) -> Tensor:
    """KL(p_s ‖ p_t): mode-seeking (Gu et al. 2024, "MiniLLM: Knowledge Distillation of
    Large Language Models")."""
    return _kl_per_position(s, t)


@register_divergence("jsd", params=("beta",), cite="Agarwal et al. 2024, GKD")
def _jsd(s: Tensor, t: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD_β of Agarwal et al. (2024), "On-Policy Distillation of Language
    Models" (GKD): with M = β·p_t + (1−β)·p_s, JSD_β = β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M).

    As in GKD, β = 0 is *defined* as forward KL and β = 1 as reverse KL (JSD_β itself
    vanishes there; JSD_β/β → KL(p_t‖p_s) and JSD_β/(1−β) → KL(p_s‖p_t)), and those
    ends are computed exactly as :func:`_forward_kl` / :func:`_reverse_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_per_position(t, s)
    if beta == 1.0:
        return _kl_per_position(s, t)
    m = _mix_log(t, s, beta)  # (..., V)
    return (beta * _kl_per_position(t, m) + (1.0 - beta) * _kl_per_position(s, m)).clamp_min(0.0)


@register_divergence("tvd", cite="Wen et al. 2023")
def _tvd(s: Tensor, t: Tensor) -> Tensor:
    """Total variation ½·Σ|p_t − p_s|, in [0, 1] (Wen et al. 2023, "f-Divergence
    Minimization for Sequence-Level Knowledge Distillation")."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def _check_skew(skew: float) -> None:
    # skew = 1 would compare a distribution with itself: always 0, no gradient.
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")


@register_divergence("skew_kl", params=("skew",), cite="Ko et al. 2024, DistiLLM")
def _skew_kl(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    """Skew KL(p_t ‖ α·p_t + (1−α)·p_s), α = ``skew`` (Ko et al. 2024, "DistiLLM:
    Towards Streamlined Distillation for Large Language Models"). Mixing some p_t into
    the second argument bounds the log-ratio where p_s ≈ 0; α = 0 is forward KL."""
    _check_skew(skew)
    return _kl_per_position(t, _mix_log(t, s, skew))


@register_divergence("skew_rkl", params=("skew",), cite="Ko et al. 2024, DistiLLM")
def _skew_rkl(s: Tensor, t: Tensor, skew: float = 0.1) -> Tensor:
    """Skew reverse KL(p_s ‖ α·p_s + (1−α)·p_t), α = ``skew`` (Ko et al. 2024,
    DistiLLM); α = 0 is reverse KL."""
    _check_skew(skew)
    return _kl_per_position(s, _mix_log(s, t, skew))
