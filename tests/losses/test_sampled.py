"""The sampled teacher's loss (Anshumann et al. 2025): its mean over independent
labellings is the exact soft cross-entropy, and so is its gradient (within a few
standard errors of the Monte-Carlo mean); a biased variant fails the same check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.errors import DKError
from darkknowledge.lm import fast
from darkknowledge.lm import losses as L
from darkknowledge.losses.sampled import (
    SampledTarget,
    sampled_cross_entropy_per_position,
    sampled_forward_kl,
    sampled_hinton_kd,
)
from darkknowledge.losses.stack import HintonKD, ReverseKL
from darkknowledge.signals import Signals
from darkknowledge.store.label import sample_counts

V, P, K, T, N = 12, 3, 16, 2.0, 4000  # outputs, positions, draws, temperature, labellings


def _pair():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 2.0
    student = torch.randn(P, V, generator=g, dtype=torch.float64)
    return teacher, student


def _labellings(teacher):
    """N independent sampled labellings of the teacher, as the labeller draws them."""
    ids, counts = sample_counts(
        teacher.expand(N, P, V), K, T, torch.Generator().manual_seed(1)
    )  # (N, P, K) each
    assert bool((counts.sum(-1) == K).all())  # every position: K draws
    return ids, counts.double() / K


def _estimates(student, ids, w):
    """Per labelling: the loss (mean over positions) and its gradient in the student logits."""
    s = student.expand(N, P, V).clone().requires_grad_(True)
    per = sampled_cross_entropy_per_position(s, ids, w, T).mean(-1)  # (N,)
    (g,) = torch.autograd.grad(per.sum(), s)  # (N, P, V): each labelling's own gradient
    return per.detach(), g


def _within(mc: torch.Tensor, exact: torch.Tensor, z: float = 4.5) -> torch.Tensor:
    """|mean − exact| / standard error, elementwise; mc: (N, ...)."""
    se = mc.std(0) / mc.shape[0] ** 0.5
    return (mc.mean(0) - exact).abs() / se.clamp_min(1e-12)


def test_estimate_and_gradient_are_unbiased():
    teacher, student = _pair()
    ids, w = _labellings(teacher)
    s = student.clone().requires_grad_(True)
    p = F.softmax(teacher / T, -1)
    exact = -(p * F.log_softmax(s / T, -1)).sum(-1).mean()  # the soft cross-entropy
    (g_exact,) = torch.autograd.grad(exact, s)
    est, grads = _estimates(student, ids, w)
    assert float(est.std()) > 0.01  # a real estimate, not the exact value every time
    assert float(_within(est, exact.detach())) < 4.5
    z = _within(grads, g_exact)
    assert float(z.max()) < 4.5, z
    # the same check catches a biased estimator: the distinct ids weighted evenly
    even = (w > 0).double()
    biased, _ = _estimates(student, ids, even / even.sum(-1, keepdim=True))
    assert float(_within(biased, exact.detach())) > 10
    # Hinton's soft term is T² times it; sampled_forward_kl is its mean over positions
    one = (student, ids[0], w[0])
    assert torch.allclose(
        sampled_hinton_kd(*one, temperature=T), T**2 * sampled_forward_kl(*one, T)
    )


def test_chunked_head_closed_form_matches_autograd():
    g = torch.Generator().manual_seed(2)
    n, h = 10, 6
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(V, h, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    ids, counts = sample_counts(torch.randn(n, V, generator=g), K, T, g)
    tgt = SampledTarget(ids, counts.float() / K)
    spec = L.TokenLoss(kind="forward_kl", temperature=T, ce_weight=0.3)
    out = {}
    for closed in (True, False):
        fast_before, L.CLOSED_FORM = L.CLOSED_FORM, closed
        try:
            hd = hidden.clone().requires_grad_(True)
            loss = L.chunked_head_loss(
                hd,
                weight,
                None,
                spec,
                labels=labels,
                teacher=lambda lo, hi: SampledTarget(tgt.ids[lo:hi], tgt.weights[lo:hi]),
                chunk=4,
            )
            gh, gw = torch.autograd.grad(loss, (hd, weight))
            out[closed] = (loss.detach(), gh, gw)
        finally:
            L.CLOSED_FORM = fast_before
    assert fast.applies(spec, tgt)
    for a, b in zip(out[True], out[False], strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    ref = L.unchunked_head_loss(hidden, weight, None, spec, labels=labels, teacher_topk=tgt)
    assert torch.allclose(out[True][0], ref.detach(), atol=1e-5)
    with pytest.raises(ValueError, match="forward_kl only"):
        L.sampled_divergence(hidden @ weight.detach().t(), *tgt, L.TokenLoss(kind="tvd"))


def test_loss_terms_take_a_sampled_teacher_and_refuse_biased_ones():
    teacher, student = _pair()
    ids, counts = sample_counts(teacher, K, T, torch.Generator().manual_seed(3))
    sig = Signals(sampled_ids=ids, sampled_weights=counts.float() / K, temperature=T)
    s = student.float()
    got = HintonKD(temperature=T, alpha=1.0)(s, sig, torch.zeros(P, dtype=torch.long))
    assert torch.allclose(got, sampled_hinton_kd(s, *[ids, sig.sampled_weights], temperature=T))
    with pytest.raises(DKError, match="reverse_kl cannot be estimated without bias"):
        ReverseKL(temperature=T)(s, sig)
    with pytest.raises(DKError, match="drawn at temperature 2"):
        HintonKD(temperature=4.0)(s, sig, None)
