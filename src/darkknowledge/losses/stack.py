"""Loss terms by name, and the weighted stack that a recipe's ``loss:`` section builds.

Each term takes the student's logits, the teacher's :class:`Signals` (or None), the hard
labels (or None) and an optional mask, and returns a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import DKError
from ..signals import Signals
from . import divergences as D


def _teacher_logits(name: str, signals: Signals | None) -> Tensor:
    if signals is None:
        raise DKError(f"loss.{name} needs a teacher: add a 'teacher:' section or drop it")
    if signals.logits is None:
        raise DKError(f"loss.{name} needs dense teacher logits, the teacher gave {signals.kinds}")
    return signals.logits


@dataclass(frozen=True)
class HintonKD:
    """α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE — Hinton, Vinyals & Dean (2015)."""

    temperature: float = 4.0
    alpha: float = 0.9
    needs_teacher = True

    def __call__(self, s: Tensor, sig: Signals | None, y: Tensor | None, mask=None):
        t = _teacher_logits("hinton_kd", sig)
        return D.hinton_kd(s, t, y, self.temperature, self.alpha, mask)


@dataclass(frozen=True)
class ForwardKL:
    """KL(p_t ‖ p_s) at temperature T (Hinton et al. 2015)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        return D.forward_kl(s, _teacher_logits("forward_kl", sig), self.temperature, mask)


@dataclass(frozen=True)
class ReverseKL:
    """KL(p_s ‖ p_t) at temperature T (Gu et al. 2024, MiniLLM)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        return D.reverse_kl(s, _teacher_logits("reverse_kl", sig), self.temperature, mask)


@dataclass(frozen=True)
class JSD:
    """Generalised JSD with β (Agarwal et al. 2024, GKD)."""

    beta: float = 0.5
    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        t = _teacher_logits("jsd", sig)
        return D.jsd(s, t, self.beta, self.temperature, mask)


@dataclass(frozen=True)
class TVD:
    """Total variation distance (Wen et al. 2023)."""

    temperature: float = 1.0
    needs_teacher = True

    def __call__(self, s, sig, y=None, mask=None):
        return D.tvd(s, _teacher_logits("tvd", sig), self.temperature, mask)


@dataclass(frozen=True)
class CE:
    """Hard-label cross-entropy (plain supervised training)."""

    needs_teacher = False

    def __call__(self, s, sig, y=None, mask=None):
        if y is None:
            raise DKError("loss.ce needs labels, the data gave none (an unlabelled transfer set)")
        return D.cross_entropy(s, y, mask)


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
