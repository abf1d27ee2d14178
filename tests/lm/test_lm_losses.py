"""Chunked token-level losses: equal to the unchunked computation, masks, bf16, scaling,
and the [chunk, V] buffers a live-teacher chunk holds."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from darkknowledge.lm.losses import (
    KINDS,
    HeadTeacher,
    TokenLoss,
    chunked_head_loss,
    unchunked_head_loss,
)

N, H, HT, V = 37, 16, 24, 50


def _setup(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True)
    th = torch.randn(N, HT, generator=g, dtype=torch.float64).to(dtype)
    tw = torch.randn(V, HT, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return h, w, b, th, tw, labels


def _specs():
    for kind in KINDS:
        yield TokenLoss(kind=kind, temperature=1.5, beta=0.3, skew=0.2, ce_weight=0.5)
    yield TokenLoss(kind="jsd", beta=0.0)
    yield TokenLoss(kind="jsd", beta=1.0)


@pytest.mark.parametrize("spec", list(_specs()), ids=lambda s: f"{s.kind}-{s.beta}")
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_equals_unchunked_fp32(spec, chunk):
    h, w, b, th, tw, labels = _setup()
    tlog = th @ tw.t()
    ref = unchunked_head_loss(h, w, b, spec, labels=labels, teacher_logits=tlog, normalizer=50)
    gref = torch.autograd.grad(ref, (h, w, b))
    out = chunked_head_loss(
        h,
        w,
        b,
        spec,
        labels=labels,
        teacher=lambda lo, hi: tlog[lo:hi],
        normalizer=50,
        chunk=chunk,
    )
    gout = torch.autograd.grad(out, (h, w, b))
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-6 * max(
        1.0, abs(float(ref.detach()))
    )
    for a, r in zip(gout, gref, strict=True):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_chunked_equals_unchunked(kind):
    h, w, b, th, tw, _ = _setup(seed=1)
    tlp = torch.log_softmax(th @ tw.t(), -1)
    lp, ids = tlp.topk(8, dim=-1)
    tail = 1 - lp.exp().sum(-1)
    spec = TokenLoss(kind=kind, beta=0.4)
    ref = unchunked_head_loss(h, w, b, spec, teacher_topk=(ids, lp, tail))
    gref = torch.autograd.grad(ref, (h, w))
    out = chunked_head_loss(
        h, w, b, spec, teacher=lambda lo, hi: (ids[lo:hi], lp[lo:hi], tail[lo:hi]), chunk=5
    )
    gout = torch.autograd.grad(out, (h, w))
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-6 * max(
        1.0, abs(float(ref.detach()))
    )
    for a, r in zip(gout, gref, strict=True):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-5)


def test_forward_kl_matches_the_core_divergence():
    from darkknowledge.losses import forward_kl

    h, w, b, th, tw, _ = _setup()
    tlog = th @ tw.t()
    out = chunked_head_loss(
        h, w, b, TokenLoss("forward_kl", 2.0), teacher=lambda lo, hi: tlog[lo:hi], chunk=7
    )
    ref = forward_kl(h @ w.t() + b, tlog, temperature=2.0)
    assert abs(float(out.detach()) - float(ref.detach())) < 1e-6


def test_masked_rows_contribute_nothing_and_all_masked_is_zero():
    """Rows the caller drops (masked positions) change nothing; N = 0 gives exactly 0
    with finite (zero) gradients, also for the CE term."""
    h, w, b, th, tw, labels = _setup()
    tlog = th @ tw.t()
    spec = TokenLoss("reverse_kl", ce_weight=1.0)
    keep = torch.arange(N) % 3 != 0
    # garbage (inf/nan) in masked rows must not leak: the loss only sees kept rows
    tlog_bad = tlog.clone()
    tlog_bad[~keep] = float("nan")
    a = chunked_head_loss(
        h[keep], w, b, spec, labels=labels[keep], teacher=lambda lo, hi: tlog_bad[keep][lo:hi]
    )
    c = chunked_head_loss(
        h[keep], w, b, spec, labels=labels[keep], teacher=lambda lo, hi: tlog[keep][lo:hi]
    )
    assert torch.isfinite(a) and float(a) == pytest.approx(float(c), abs=1e-7)
    e = h[:0]
    z = chunked_head_loss(
        e, w, b, spec, labels=labels[:0], teacher=lambda lo, hi: tlog[:0], normalizer=0
    )
    assert float(z) == 0.0
    gh, gw = torch.autograd.grad(z, (h, w))
    assert torch.isfinite(gw).all() and float(gw.abs().sum()) == 0.0
    assert float(gh.abs().sum()) == 0.0


def test_labels_ignore_index_contributes_nothing():
    h, w, b, *_, labels = _setup()
    lab = labels.clone()
    lab[::2] = -100
    spec = TokenLoss("forward_kl", kd_weight=0.0, ce_weight=1.0)
    full = chunked_head_loss(h, w, b, spec, labels=lab, normalizer=1)
    part = chunked_head_loss(h[1::2], w, b, spec, labels=lab[1::2], normalizer=1)
    assert float(full) == pytest.approx(float(part), rel=1e-6)


def test_normalised_by_tokens_so_accumulation_equals_one_batch():
    h, w, b, th, tw, labels = _setup()
    tlog = th @ tw.t()
    spec = TokenLoss("jsd", beta=0.5, ce_weight=0.3)
    whole = chunked_head_loss(h, w, b, spec, labels=labels, teacher=lambda lo, hi: tlog[lo:hi])
    g_whole = torch.autograd.grad(whole, (w,))[0]
    acc = torch.zeros_like(w)
    for lo, hi in [(0, 10), (10, 30), (30, N)]:
        part = chunked_head_loss(
            h[lo:hi],
            w,
            b,
            spec,
            labels=labels[lo:hi],
            teacher=lambda a, c, lo=lo: tlog[lo + a : lo + c],
            normalizer=N,
        )
        acc += torch.autograd.grad(part, (w,))[0]
    assert torch.allclose(acc, g_whole, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_non_negative_divergences(kind):
    # teacher == student in bf16: every divergence is ~0 and must never be negative
    h, w, b, *_ = _setup(torch.bfloat16)
    same = (h @ w.t() + b).detach()
    out = chunked_head_loss(h, w, b, TokenLoss(kind), teacher=lambda lo, hi: same[lo:hi], chunk=9)
    assert float(out) >= 0.0 and torch.isfinite(out)
    gh, gw, _ = torch.autograd.grad(out, (h, w, b))
    assert torch.isfinite(gh.float()).all()
    assert gw.dtype == torch.bfloat16 and torch.isfinite(gw.float()).all()
    # and a different teacher gives a positive, finite value
    _, _, _, th, tw, _ = _setup(torch.bfloat16, seed=3)
    t = th @ tw.t()
    out2 = chunked_head_loss(h, w, b, TokenLoss(kind), teacher=lambda lo, hi: t[lo:hi], chunk=9)
    assert float(out2) > 0.0 and torch.isfinite(out2)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        TokenLoss("kl")
    with pytest.raises(ValueError, match="beta"):
        TokenLoss("jsd", beta=2.0)


@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_form_equals_autograd(monkeypatch, topk, ce_weight, temperature):
    """The closed-form forward-KL/CE chunk gradients equal autograd's, to 1e-6 (fp32)."""
    import darkknowledge.lm.losses as L

    h, w, b, th, tw, labels = _setup(seed=4)
    labels[::5] = -100
    tlog = th @ tw.t()
    lp, ids = torch.log_softmax(tlog, -1).topk(6, dim=-1)
    tail = 1 - lp.exp().sum(-1)
    tail[0] = 0.0  # an empty tail (top-k holds all the teacher's mass)
    target = (
        (lambda lo, hi: (ids[lo:hi], lp[lo:hi], tail[lo:hi]))
        if topk
        else (lambda lo, hi: tlog[lo:hi])
    )
    spec = TokenLoss("forward_kl", temperature=temperature, ce_weight=ce_weight)
    out = {}
    for closed in (True, False):
        monkeypatch.setattr(L, "CLOSED_FORM", closed)
        v = chunked_head_loss(h, w, b, spec, labels=labels, teacher=target, chunk=6)
        out[closed] = (float(v.detach()), torch.autograd.grad(v, (h, w, b)))
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    for a, r in zip(out[True][1], out[False][1], strict=True):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-5)


def test_closed_form_exact_when_the_student_tail_is_tiny(monkeypatch):
    """A sharp student whose mass sits on the teacher's top-k (tail < 1e-3): the
    closed form sums that tail exactly instead of 1 − Σ top-k."""
    import darkknowledge.lm.losses as L

    h, w, b, *_ = _setup(seed=5)
    with torch.no_grad():
        h.mul_(40.0)
        p = torch.softmax(h @ w.t() + b, -1)
    s_ids = p.topk(6, dim=-1).indices
    assert (1 - p.gather(-1, s_ids).sum(-1) < 1e-3).sum() > N // 2  # the exact path runs
    lp = torch.log_softmax(torch.randn(N, 6, generator=torch.Generator().manual_seed(1)), -1) - 0.01
    tail = 1 - lp.exp().sum(-1)
    spec = TokenLoss("forward_kl")
    out = {}
    for closed in (True, False):
        monkeypatch.setattr(L, "CLOSED_FORM", closed)
        v = chunked_head_loss(
            h, w, b, spec, teacher=lambda lo, hi: (s_ids[lo:hi], lp[lo:hi], tail[lo:hi]), chunk=8
        )
        out[closed] = (float(v.detach()), torch.autograd.grad(v, (w,))[0])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    # logits of a few hundred: fp32 rounding of both paths, relative to the largest entry
    g, ref = out[True][1], out[False][1]
    assert float((g - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def _head_teacher(th, tw):
    return HeadTeacher([th], [(tw, None)])


@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_live_teacher_equals_stored_logits(ce_weight, temperature):
    """A HeadTeacher (its chunk logits overwritten by the loss) gives the loss and
    gradients of the same logits read from a tensor, and of the unchunked reference."""
    h, w, b, th, tw, labels = _setup(seed=6)
    labels[::4] = -100
    spec = TokenLoss("forward_kl", temperature=temperature, ce_weight=ce_weight)
    tlog = th @ tw.t()
    ref = unchunked_head_loss(h, w, b, spec, labels=labels, teacher_logits=tlog)
    gref = torch.autograd.grad(ref, (h, w, b))
    for teacher in (_head_teacher(th, tw), lambda lo, hi: tlog[lo:hi]):
        out = chunked_head_loss(h, w, b, spec, labels=labels, teacher=teacher, chunk=8)
        assert float(out.detach()) == pytest.approx(float(ref.detach()), abs=1e-6, rel=1e-6)
        for a, r in zip(torch.autograd.grad(out, (h, w, b)), gref, strict=True):
            assert torch.allclose(a, r, atol=1e-6, rtol=1e-5)
    assert torch.equal(tlog, th @ tw.t())  # stored logits are read, never overwritten


class _VocabBuffers(TorchDispatchMode):
    """Counts the tensors of at least ``numel`` elements that ops allocate (not views,
    not in-place results) while they are alive; ``peak``: the most at once."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.live, self.peak = numel, 0, 0

    def _free(self):
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            x.untyped_storage().data_ptr()
            for x in tree_leaves((args, kwargs))
            if isinstance(x, torch.Tensor)
        }
        for x in tree_leaves(out):
            if (
                isinstance(x, torch.Tensor)
                and x.numel() >= self.numel
                and x.untyped_storage().data_ptr() not in seen
            ):
                self.live += 1
                self.peak = max(self.peak, self.live)
                weakref.finalize(x, self._free)
        return out


def test_live_teacher_step_holds_no_more_vocab_buffers_than_cross_entropy():
    """The memory of a live-teacher KD chunk: no more [chunk, V] buffers alive at once
    than a plain cross-entropy chunk (the teacher's logits are the loss's scratch)."""
    h, w, b, th, tw, labels = _setup(seed=7)
    chunk = 8

    def peak(spec, **kw):
        counter = _VocabBuffers(chunk * V)
        with counter:
            chunked_head_loss(h, w, b, spec, labels=labels, chunk=chunk, **kw)
        return counter.peak

    ce = peak(TokenLoss("forward_kl", kd_weight=0.0, ce_weight=1.0))
    kd = peak(TokenLoss("forward_kl"), teacher=_head_teacher(th, tw))
    kd_ce = peak(TokenLoss("forward_kl", ce_weight=0.5), teacher=_head_teacher(th, tw))
    assert 0 < ce and kd <= ce and kd_ce <= ce
