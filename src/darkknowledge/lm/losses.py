"""Token-level distillation losses for causal LMs, computed in chunks along the tokens.

The LM head is where the memory goes: fp32 logits of a [batch, seq, vocab] tensor are
4·B·T·V bytes (4 × 1024 × 50,257 → 823 MB), and a naive KD step holds them for both
models plus their softmaxes and gradients. Here the student's body runs once to its
final hidden states ``(N, H)`` (only the N valid positions are kept); then, chunk by
chunk of ``chunk`` positions, both models' logits are projected through their LM heads,
the per-token divergence is evaluated and its gradient with respect to the chunk's
logits is pushed straight into the gradients of the student's hidden states and head
weight (the fused-linear idea of Liger Kernel's chunked losses). So at any time only one
chunk's [chunk, V] logits exist, and the backward pass costs the same matmuls as a plain
step's, nothing is recomputed. Forward KL and cross-entropy take closed-form gradients
(:mod:`.fast`), so their chunks cost about what a cross-entropy chunk costs.

Every loss is a sum over valid tokens divided by ``normalizer`` (the number of valid
tokens of the whole accumulated batch), so accumulating gradients over micro-batches
gives the update of one big batch. An all-masked input gives 0 with zero (finite)
gradients. Logits in bf16/fp16 are promoted to fp32 inside the divergence and every
divergence is clamped at 0, so half precision never gives a negative loss.

Divergences (``kind``): any name in the divergence registry
(:mod:`darkknowledge.losses.registry`): forward_kl (Hinton et al. 2015), reverse_kl (Gu
et al. 2024, MiniLLM), jsd (generalised JSD_β of Agarwal et al. 2024, GKD; β = 0 / 1 are
forward / reverse KL), tvd (Wen et al. 2023), skew_kl = KL(p_t ‖ α·p_t + (1−α)·p_s) and
skew_rkl = KL(p_s ‖ α·p_s + (1−α)·p_t) (Ko et al. 2024, DistiLLM), and whatever is
registered later. The same functions serve the dense classification losses and a top-k
+ tail teacher (stored signals), compared on the K + 1 buckets of
:mod:`darkknowledge.losses.sparse`. A sampled teacher (a sampled store: drawn ids and
count/k weights, :class:`~darkknowledge.losses.sampled.SampledTarget`) serves forward_kl
only, as the unbiased soft cross-entropy estimate of :mod:`darkknowledge.losses.sampled`
(the kd value is that cross-entropy: the forward KL plus the teacher's entropy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.divergences import _up
from ..losses.registry import DIVERGENCES, get_divergence
from ..losses.sampled import SampledTarget, sampled_cross_entropy_per_position
from ..losses.sparse import buckets
from . import fast

# Forward KL and cross-entropy chunks use closed-form gradients (:mod:`.fast`); the
# autograd path is the reference (tests compare the two) and serves the other divergences.
CLOSED_FORM = True


def __getattr__(name: str):
    # KINDS is read from the registry on every access (PEP 562), so a divergence
    # registered after import is a known kind too; a module constant would go stale.
    if name == "KINDS":
        return tuple(DIVERGENCES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TokenLoss:
    """``kd_weight``·divergence(teacher, student) + ``ce_weight``·CE(labels), per token."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_kl / skew_rkl: the α mixed into the second argument
    kd_weight: float = 1.0
    ce_weight: float = 0.0

    def __post_init__(self):
        get_divergence(self.kind)  # ValueError naming the registered kinds
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"jsd: beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def divergence_from_logprobs(s: Tensor, t: Tensor, spec: TokenLoss) -> Tensor:
    """Per-position divergence ``(n,)`` from student / teacher log-probabilities ``(n, V)``
    (or bucketed ``(n, K+1)``): the registry's ``spec.kind``, with the parameters it
    declares taken from the spec's fields of the same name (``beta``, ``skew``); a
    parameter the spec has no field for keeps the divergence's default. Never negative."""
    div = get_divergence(spec.kind)
    params = {p: getattr(spec, p) for p in div.params if hasattr(spec, p)}
    return div(s, t, **params)


def dense_divergence(s_logits: Tensor, t_logits: Tensor, spec: TokenLoss) -> Tensor:
    """Per-position divergence ``(n,)`` between student and teacher logits ``(n, V)``."""
    s = F.log_softmax(_up(s_logits) / spec.temperature, dim=-1)
    t = F.log_softmax(_up(t_logits) / spec.temperature, dim=-1)
    return divergence_from_logprobs(s, t, spec)


def sparse_divergence(
    s_logits: Tensor, ids: Tensor, logprobs: Tensor, tail: Tensor, spec: TokenLoss
) -> Tensor:
    """Per-position divergence ``(n,)`` against a top-k + tail teacher (stored at
    ``spec.temperature``), on the K + 1 buckets."""
    s, t = buckets(s_logits, ids, logprobs, tail, spec.temperature)
    return divergence_from_logprobs(s, t, spec)


def sampled_divergence(s_logits: Tensor, ids: Tensor, weights: Tensor, spec: TokenLoss) -> Tensor:
    """Per-position soft cross-entropy estimate ``(n,)`` against a sampled teacher (drawn
    at ``spec.temperature``); forward_kl only (the others have no unbiased estimate)."""
    if spec.kind != "forward_kl":
        raise ValueError(f"a sampled teacher serves forward_kl only, not {spec.kind!r}")
    return sampled_cross_entropy_per_position(s_logits, ids, weights, spec.temperature)


# A teacher for a chunk of rows [lo, hi): either dense logits (n, V), a top-k signal
# (ids (n, K), logprobs (n, K), tail (n,)) or a sampled one (SampledTarget(ids (n, K),
# weights (n, K))). None: no teacher (plain cross-entropy).
TeacherChunk = Callable[[int, int], "Tensor | tuple[Tensor, Tensor, Tensor] | SampledTarget"]


class HeadTeacher:
    """A live teacher as a :data:`TeacherChunk`: its final hidden states at the valid
    positions ``(N, H_t)`` (one per model of an ensemble) and LM heads; a chunk's
    logits are projected when the loss asks for them, so the teacher's logits never
    exist for more than ``chunk`` rows. Each call returns a new tensor that the loss may
    overwrite (``scratch``), which saves it one [chunk, V] buffer.

    ``combine``: how an ensemble's per-model logits become one (``LMEnsemble.combine``)."""

    scratch = True

    def __init__(
        self,
        hidden: list[Tensor],
        heads: list[tuple[Tensor, Tensor | None]],
        combine: Callable[[list[Tensor]], Tensor] | None = None,
    ):
        if len(hidden) != len(heads) or not hidden or (combine is None and len(hidden) > 1):
            raise ValueError("HeadTeacher: one head per hidden-state tensor (several: combine)")
        self.hidden, self.heads, self.combine = hidden, heads, combine

    def __call__(self, lo: int, hi: int) -> Tensor:
        with torch.no_grad():
            z = [
                F.linear(h[lo:hi], w, b) for h, (w, b) in zip(self.hidden, self.heads, strict=True)
            ]
            return z[0] if self.combine is None else self.combine(z)


def _chunk_terms(
    logits: Tensor, labels: Tensor | None, target, spec: TokenLoss
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kd sum, ce sum) over the rows of one chunk (sums, not means)."""
    zero = logits.new_zeros((), dtype=torch.float32)
    kd = ce = zero
    if target is not None and spec.kd_weight:
        if isinstance(target, SampledTarget):
            kd = sampled_divergence(logits, *target, spec).sum()
        elif isinstance(target, tuple):
            kd = sparse_divergence(logits, *target, spec).sum()
        else:
            kd = dense_divergence(logits, target, spec).sum()
    if labels is not None and spec.ce_weight:
        ce = F.cross_entropy(_up(logits), labels, reduction="sum", ignore_index=-100)
    return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss through the LM head chunk by chunk; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, spec, normalizer, chunk, parts):
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_b = (
            torch.zeros_like(bias, dtype=torch.float32)
            if bias is not None and bias.requires_grad
            else None
        )
        # the sums live where the chunks' losses do (a CPU tensor += a CUDA one fails)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        t_scratch = bool(getattr(teacher, "scratch", False))
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            h = hidden[lo:hi]
            target = teacher(lo, hi) if teacher is not None else None
            lab = labels[lo:hi] if labels is not None else None
            if CLOSED_FORM and fast.applies(spec, target):
                logits = F.linear(h, weight, bias)  # (c, V), overwritten by its gradient
                loss_c, kd_c, ce_c, g = fast.chunk_loss_and_grad(
                    logits, lab, target, spec, scratch=True, target_scratch=t_scratch
                )
            else:
                with torch.enable_grad():
                    logits = F.linear(h, weight, bias).detach().requires_grad_(True)
                    loss_c, kd_c, ce_c = _chunk_terms(logits, lab, target, spec)
                    (g,) = torch.autograd.grad(loss_c, logits)  # (c, V)
            g = g.to(weight.dtype)
            if grad_h.dtype == g.dtype and grad_h.is_contiguous():
                torch.mm(g, weight, out=grad_h[lo:hi])
            else:
                grad_h[lo:hi] = g @ weight
            if grad_w is not None:
                if g.dtype == torch.float32 and h.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)  # in place: no [V, H] temporary per chunk
                else:
                    grad_w += (g.t() @ h).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
            total += loss_c.detach()
            kd_sum += kd_c.detach()
            ce_sum += ce_c.detach()
            del logits, g, target
        scale = 1.0 / max(float(normalizer), 1.0)
        ctx.scale = scale
        ctx.save_for_backward(grad_h)
        ctx.grad_w = grad_w
        ctx.grad_b = grad_b
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        if parts is not None:
            parts["kd"] = float(kd_sum) * scale
            parts["ce"] = float(ce_sum) * scale
            parts["tokens"] = n
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        s = grad_out * ctx.scale
        gw = (ctx.grad_w * s).to(ctx.w_dtype) if ctx.grad_w is not None else None
        gb = (ctx.grad_b * s).to(ctx.b_dtype) if ctx.grad_b is not None else None
        return grad_h * s.to(grad_h.dtype), gw, gb, None, None, None, None, None, None


def chunked_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    spec: TokenLoss,
    *,
    labels: Tensor | None = None,
    teacher: TeacherChunk | None = None,
    normalizer: float | None = None,
    chunk: int = 1024,
    parts: dict | None = None,
) -> Tensor:
    """The loss of the valid rows ``hidden (N, H)`` (student final hidden states) through
    the LM head ``weight (V, H)`` / ``bias (V,)``, ``chunk`` rows at a time.

    ``labels (N,)``: next-token ids for the CE term; ``teacher(lo, hi)``: the teacher's
    logits ``(hi−lo, V)`` or top-k tuple for rows [lo, hi) (a :class:`HeadTeacher` for a
    live teacher: the loss then reuses its logits' buffer). ``normalizer`` (default N):
    what the sum over tokens is divided by. ``parts`` receives the kd / ce components.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    norm = hidden.shape[0] if normalizer is None else normalizer
    return _ChunkedHeadLoss.apply(hidden, weight, bias, labels, teacher, spec, norm, chunk, parts)


def unchunked_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    spec: TokenLoss,
    *,
    labels: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | SampledTarget | None = None,
    normalizer: float | None = None,
) -> Tensor:
    """The same loss the plain way: all logits at once, autograd through everything.
    The reference the chunked version is tested against (and the memory bench's
    'unchunked' column)."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    target = teacher_topk if teacher_topk is not None else teacher_logits
    total, _, _ = _chunk_terms(logits, labels, target, spec)
    norm = hidden.shape[0] if normalizer is None else normalizer
    return total / max(float(norm), 1.0)
