"""Loss terms by name, and the weighted stack that a recipe's ``loss:`` section builds.

Each term takes the student's logits, the teacher's :class:`Signals` (or None), the hard
labels (or None) and an optional mask, and returns a scalar. A term uses the teacher's
dense logits when present, else its top-k + tail (:mod:`.sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import DKError
from ..signals import Signals
from . import divergences as D
from . import sparse as S
from .sampled import SampledTarget, check_sampled_divergence, sampled_forward_kl, sampled_hinton_kd


def _teacher(name: str, signals: Signals | None, temperature: float | None, divergence: str = ""):
    """The teacher's dense logits, or its top-k ``(ids, logprobs, tail)`` when that is
    what it gave (a top-k store), or a :class:`SampledTarget` (a sampled store, whose
    only estimable ``divergence`` is the forward KL). Top-k log-probs and draws hold only
    at the temperature they were computed at, so a term at another temperature is refused."""
    if signals is None:
        raise DKError(f"loss.{name} needs a teacher: add a 'teacher:' section or drop it")
    if signals.logits is not None:
        return signals.logits
    if signals.sampled_ids is not None and signals.sampled_weights is not None:
        check_sampled_divergence(divergence or name, f"loss.{name}")
        t = signals.temperature if signals.temperature is not None else 1.0
        if temperature is not None and abs(t - temperature) > 1e-9:
            raise DKError(
                f"loss.{name}.temperature is {temperature:g} but the teacher's samples were "
                f"drawn at temperature {t:g}: relabel with label.temperature={temperature:g}"
            )
        return SampledTarget(signals.sampled_ids, signals.sampled_weights)
    if signals.topk_ids is not None and signals.topk_logprobs is not None:
        if signals.tail_mass is None:
            raise DKError(f"loss.{name}: top-k teacher signals without a tail mass")
        t = signals.temperature if signals.temperature is not None else 1.0
        if temperature is not None and abs(t - temperature) > 1e-9:
            raise DKError(
                f"loss.{name}.temperature is {temperature:g} but the teacher's top-k "
                f"signals were stored at temperature {t:g}: relabel with "
                f"label.temperature={temperature:g}, or use a dense store"
            )
        return (signals.topk_ids, signals.topk_logprobs, signals.tail_mass)
    raise DKError(f"loss.{name} needs teacher logits or top-k, the teacher gave {signals.kinds}")


@dataclass(frozen=True)
class HintonKD:
    """α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE — Hinton, Vinyals & Dean (2015)."""

    temperature: float = 4.0
    alpha: float = 0.9
    needs_teacher = True

    def __call__(self, s: Tensor, sig: Signals | None, y: Tensor | None, mask=None):
        t = _teacher("hinton_kd", sig, self.temperature, "forward_kl")
        if isinstance(t, SampledTarget):
            return sampled_hinton_kd(s, *t, y, self.temperature, self.alpha, mask)
        if isinstance(t, tuple):
            return S.sparse_hinton_kd(
                s, *t, y, self.temperature, self.alpha, mask, log_prior=sig.tail_log_prior
            )
        return D.hinton_kd(s, t, y, self.temperature, self.alpha, mask)


@dataclass(frozen=True)
class ForwardKL:
    """KL(p_t ‖ p_s) at temperature T (Hinton et al. 2015)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher("forward_kl", sig, self.temperature)
        if isinstance(t, SampledTarget):
            return sampled_forward_kl(s, *t, self.temperature, mask)
        if isinstance(t, tuple):
            return S.sparse_forward_kl(s, *t, self.temperature, mask, log_prior=sig.tail_log_prior)
        return D.forward_kl(s, t, self.temperature, mask)


@dataclass(frozen=True)
class ReverseKL:
    """KL(p_s ‖ p_t) at temperature T (Gu et al. 2024, MiniLLM)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher("reverse_kl", sig, self.temperature)
        if isinstance(t, tuple):
            return S.sparse_reverse_kl(s, *t, self.temperature, mask)
        return D.reverse_kl(s, t, self.temperature, mask)


@dataclass(frozen=True)
class JSD:
    """Generalised JSD with β (Agarwal et al. 2024, GKD)."""

    beta: float = 0.5
    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher("jsd", sig, self.temperature)
        if isinstance(t, tuple):
            return S.sparse_jsd(s, *t, self.beta, self.temperature, mask)
        return D.jsd(s, t, self.beta, self.temperature, mask)


@dataclass(frozen=True)
class TVD:
    """Total variation distance (Wen et al. 2023)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher("tvd", sig, self.temperature)
        if isinstance(t, tuple):
            return S.sparse_tvd(s, *t, self.temperature, mask)
        return D.tvd(s, t, self.temperature, mask)


@dataclass(frozen=True)
class CE:
    """Hard-label cross-entropy (plain supervised training)."""

    needs_teacher = False

    def __call__(self, s, sig, y=None, mask=None):
        if y is None:
            raise DKError("loss.ce needs labels, the data gave none (an unlabelled transfer set)")
        return D.cross_entropy(s, y, mask)


@dataclass(frozen=True)
class Divergence:
    """Any registered divergence (:mod:`.registry`) by name, at temperature T, mean over
    valid positions; on dense teacher logits or a top-k + tail teacher's buckets."""

    name: str
    temperature: float = 1.0
    params: tuple[tuple[str, float], ...] = ()
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher(self.name, sig, self.temperature)
        kw = dict(self.params)
        if isinstance(t, SampledTarget):
            return sampled_forward_kl(s, *t, self.temperature, mask)  # forward_kl only
        if isinstance(t, tuple):
            return S.sparse_divergence_loss(self.name, s, *t, self.temperature, mask, **kw)
        return D.divergence_loss(self.name, s, t, self.temperature, mask, **kw)


class LossStack:
    """A weighted sum of named loss terms: ``total = Σ weight_i · term_i``."""

    def __init__(self, terms: dict[str, tuple[float, object]]):
        if not terms:
            raise DKError("loss: no loss term is set; add one, e.g. 'ce: {}'")
        self.terms = terms

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(t, "needs_teacher", False) for _, t in self.terms.values())

    def __call__(
        self,
        student_logits: Tensor,
        signals: Signals | None,
        labels: Tensor | None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        total = None
        parts: dict[str, float] = {}
        for name, (weight, term) in self.terms.items():
            value = term(student_logits, signals, labels, mask)  # scalar
            parts[name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        return total, parts  # type: ignore[return-value]

    @classmethod
    def of(cls, *terms: object, weights: list[float] | None = None) -> LossStack:
        """Stack of Python term objects, named after their class."""
        weights = weights or [1.0] * len(terms)
        names = [_NAME_OF.get(type(t), type(t).__name__.lower()) for t in terms]
        return cls({n: (w, t) for n, w, t in zip(names, weights, terms, strict=True)})


_NAME_OF = {
    HintonKD: "hinton_kd",
    ForwardKL: "forward_kl",
    ReverseKL: "reverse_kl",
    JSD: "jsd",
    TVD: "tvd",
    CE: "ce",
}
