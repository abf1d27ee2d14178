"""Top-k + tail divergences: properties against the dense ones, one pinned value, masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from darkknowledge.errors import DKError
from darkknowledge.losses import (
    ForwardKL,
    HintonKD,
    LossStack,
    forward_kl,
    jsd,
    reconstruct,
    reverse_kl,
    sparse_forward_kl,
    sparse_hinton_kd,
    sparse_jsd,
    sparse_reverse_kl,
    sparse_tvd,
    tvd,
)
from darkknowledge.signals import Signals

PAIRS = [
    (sparse_forward_kl, forward_kl),
    (sparse_reverse_kl, reverse_kl),
    (
        lambda s, i, lp, t, T, m=None: sparse_jsd(s, i, lp, t, 0.3, T, m),
        lambda s, t, T, m=None: jsd(s, t, 0.3, T, m),
    ),
    (sparse_tvd, tvd),
]


def topk_of(teacher_logits, k, temperature=1.0):
    lp = F.log_softmax(teacher_logits / temperature, -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals, 1 - vals.exp().sum(-1)


@pytest.mark.parametrize("sparse, dense", PAIRS)
def test_equals_dense_when_tail_is_one_class(sparse, dense):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 7, generator=g), torch.randn(4, 6, 7, generator=g) * 2
    ids, lp, tail = topk_of(t, 6, 2.0)  # K = V − 1: the tail bucket is exactly one class
    assert torch.allclose(sparse(s, ids, lp, tail, 2.0), dense(s, t, 2.0), atol=1e-5)


@pytest.mark.parametrize("sparse, dense", PAIRS)
def test_never_above_dense(sparse, dense):
    # Coarse-graining to K+1 buckets cannot increase a divergence (data processing).
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        s, t = torch.randn(8, 50, generator=g) * 3, torch.randn(8, 50, generator=g) * 3
        ids, lp, tail = topk_of(t, 5)
        assert sparse(s, ids, lp, tail, 1.0) <= dense(s, t, 1.0) + 1e-6


def test_forward_kl_equals_dense_when_teacher_has_no_tail():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    t[:, 4:] = -1e4  # the teacher puts no mass outside its top 4
    ids, lp, tail = topk_of(t, 4)
    assert torch.allclose(sparse_forward_kl(s, ids, lp, tail), forward_kl(s, t), atol=1e-6)


def test_pinned_value():
    # Teacher top-2 = {0: 0.5, 2: 0.3}, tail 0.2; student uniform over 4 classes, so its
    # buckets are (0.25, 0.25, 0.5). KL = .5 ln 2 + .3 ln 1.2 + .2 ln .4
    s = torch.zeros(1, 4)
    ids, lp, tail = torch.tensor([[0, 2]]), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([0.2])
    want = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert sparse_forward_kl(s, ids, lp, tail).item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.2180, abs=1e-4)  # 0.34657 + 0.05470 − 0.18326


@pytest.mark.parametrize("fn", [sparse_forward_kl, sparse_reverse_kl, sparse_tvd])
def test_all_masked_is_zero_with_finite_grads(fn):
    s = torch.randn(2, 5, 30, requires_grad=True)
    ids, lp, tail = topk_of(torch.randn(2, 5, 30), 8)
    out = fn(s, ids, lp, tail, 1.0, torch.zeros(2, 5, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(s.grad).all()


def test_mask_selects_positions_and_half_inputs_are_fp32_inside():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 40, generator=g)
    ids, lp, tail = topk_of(t, 8)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    full = sparse_forward_kl(s[0, :2], ids[0, :2], lp[0, :2], tail[0, :2])
    assert torch.allclose(sparse_forward_kl(s, ids, lp, tail, 1.0, mask), full)
    half = sparse_forward_kl(s.half(), ids, lp.half(), tail.half(), 1.0, mask)
    assert half.dtype == torch.float32 and abs(half - full) < 2e-3


def test_full_topk_has_finite_grads():
    # K = V: the tail is empty; the student's tail bucket must not produce NaN.
    s = torch.randn(3, 5, requires_grad=True)
    ids, lp, tail = topk_of(torch.randn(3, 5), 5)
    sparse_reverse_kl(s, ids, lp, tail).backward()
    assert torch.isfinite(s.grad).all()


def test_hinton_kd_mixes_ce_and_scales_by_t_squared():
    g = torch.Generator().manual_seed(4)
    s, t, y = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g), torch.arange(6)
    ids, lp, tail = topk_of(t, 4, 3.0)
    soft = sparse_forward_kl(s, ids, lp, tail, 3.0)
    assert torch.allclose(sparse_hinton_kd(s, ids, lp, tail, None, 3.0), 9 * soft)
    ce = F.cross_entropy(s, y)
    mix = sparse_hinton_kd(s, ids, lp, tail, y, 3.0, 0.25)
    assert torch.allclose(mix, 0.25 * 9 * soft + 0.75 * ce, atol=1e-6)


def test_stack_uses_topk_when_no_dense_logits_and_refuses_other_temperature():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    ids, lp, tail = topk_of(t, 3, 2.0)
    sig = Signals(topk_ids=ids, topk_logprobs=lp, tail_mass=tail, temperature=2.0)
    total, _parts = LossStack.of(ForwardKL(2.0))(s, sig, None)
    assert torch.allclose(total, sparse_forward_kl(s, ids, lp, tail, 2.0))
    with pytest.raises(DKError, match="stored at temperature 2"):
        LossStack.of(HintonKD(4.0))(s, sig, torch.arange(4))


def test_reconstruct_sums_to_one_and_keeps_topk():
    t = torch.randn(2, 3, 50)
    ids, lp, tail = topk_of(t, 7)
    rec = reconstruct(ids, lp, tail, 50)
    assert torch.allclose(rec.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(rec.gather(-1, ids), lp, atol=1e-5)


def test_prior_tail_kl_is_the_exact_kl_to_the_reconstruction_with_gradients():
    from darkknowledge.losses import reconstruct, sparse_forward_kl, sparse_hinton_kd

    torch.manual_seed(1)
    v, k = 40, 6
    s = torch.randn(2, 5, v, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(2, 5, v, dtype=torch.float64) * 2, -1)
    vals, ids = p.topk(k, -1)
    tail = 1 - vals.sum(-1)
    log_prior = (torch.rand(v, dtype=torch.float64) + 0.05).log()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    q = reconstruct(ids, vals.log(), tail, v, log_prior)
    dense = (q.exp() * (q - torch.log_softmax(s / 2, -1))).sum(-1)[mask].mean()
    sparse = sparse_forward_kl(s, ids, vals.log(), tail, 2.0, mask, log_prior=log_prior)
    assert abs(dense.item() - sparse.item()) < 1e-10
    g1 = torch.autograd.grad(dense, s)[0]
    g2 = torch.autograd.grad(sparse, s)[0]
    assert torch.allclose(g1, g2, atol=1e-12)
    # a flat prior gives the even-tail reconstruction; Hinton KD passes the prior through
    flat = torch.zeros(v, dtype=torch.float64)
    qf = reconstruct(ids, vals.log(), tail, v)
    even = (qf.exp() * (qf - torch.log_softmax(s, -1))).sum(-1).mean()
    assert (
        abs(sparse_forward_kl(s, ids, vals.log(), tail, log_prior=flat).item() - even.item()) < 1e-6
    )
    hk = sparse_hinton_kd(s, ids, vals.log(), tail, None, 2.0, 0.9, mask, log_prior=log_prior)
    assert abs(hk.item() - 4.0 * sparse.item()) < 1e-10
