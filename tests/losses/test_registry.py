"""The divergence registry: one function per divergence behind every loss form.

(a) every registered divergence is ≥ 0, 0 at student == teacher, has finite gradients,
and its dense, top-k + tail and chunked-LM-head forms agree; (b) a divergence registered
here, in the test file only, is usable by name everywhere; (c) the refactor onto the
registry left the numbers as they were (old formulas copied below as references).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from darkknowledge import losses as L
from darkknowledge.lm import losses as LM
from darkknowledge.lm.losses import TokenLoss, chunked_head_loss, divergence_from_logprobs
from darkknowledge.losses.registry import (
    DIVERGENCES,
    get_divergence,
    per_position,
    register_divergence,
)
from darkknowledge.losses.sparse import buckets

BUILTIN = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl")
NAMES = tuple(DIVERGENCES)  # at collection: the built-in ones
VALUES = {"beta": 0.3, "skew": 0.2}  # the value each known parameter is tested at


def _params(name: str) -> dict[str, float]:
    return {p: VALUES[p] for p in get_divergence(name).params}


def _logits(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _topk(teacher_logits, k, temperature=1.0):
    lp = F.log_softmax(teacher_logits / temperature, -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals, 1 - vals.exp().sum(-1)


# ------------------------------------------------------------------ the registry API


def test_builtin_names_in_order_and_kinds_follow_the_registry():
    assert NAMES == BUILTIN
    assert LM.KINDS == tuple(DIVERGENCES)
    assert get_divergence("jsd").params == ("beta",)
    assert get_divergence("skew_rkl").params == ("skew",)
    assert get_divergence("tvd").params == ()


def test_unknown_names_and_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="unknown divergence 'kl'; known: forward_kl, "):
        get_divergence("kl")
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'; known: .*skew_rkl"):
        TokenLoss("kl")
    s, t = F.log_softmax(_logits((3, 5), 0), -1), F.log_softmax(_logits((3, 5), 1), -1)
    with pytest.raises(ValueError, match="'jsd' takes beta; got bta"):
        per_position("jsd", s, t, bta=0.3)
    with pytest.raises(ValueError, match="unknown divergence"):
        L.divergence_loss("nope", s, t)
    with pytest.raises(ValueError, match="beta must be in"):
        per_position("jsd", s, t, beta=1.5)
    with pytest.raises(ValueError, match="skew must be in"):
        per_position("skew_kl", s, t, skew=1.0)


def test_registration_refuses_duplicates_and_undeclared_parameters():
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("forward_kl")(lambda s, t: s.sum(-1))
    with pytest.raises(ValueError, match="has no parameter"):
        register_divergence("never_added", params=("gamma",))(lambda s, t: s.sum(-1))
    assert "never_added" not in DIVERGENCES


# ------------------------------------------------ (a) properties of every divergence


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_zero_at_equality_and_finite_gradients(name):
    params = _params(name)
    for seed in range(4):
        for scale, dtype in [(2.0, torch.float32), (20.0, torch.float32), (3.0, torch.bfloat16)]:
            z = _logits((5, 6, 33), seed, scale, dtype).requires_grad_(True)
            t = _logits((5, 6, 33), seed + 100, scale, dtype)
            t[0, :, 3:] = -1e4  # a teacher whose probabilities underflow to exactly 0
            s_lp = F.log_softmax(z.float(), -1)
            t_lp = F.log_softmax(t.float(), -1)
            per = per_position(name, s_lp, t_lp, **params)
            assert per.shape == (5, 6) and per.dtype == torch.float32
            assert bool((per >= 0).all()), (name, seed, scale, float(per.min()))
            (g,) = torch.autograd.grad(per.sum(), z)
            assert bool(torch.isfinite(g.float()).all())
            same = per_position(name, t_lp, t_lp, **params)
            assert bool((same >= 0).all()) and float(same.max()) <= 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_topk_tail_and_chunked_forms_agree(name, temperature):
    """Dense on V, top-k + tail with K = V − 1 (the tail bucket is exactly one class,
    so the buckets lose nothing) and the chunked LM head, dense and top-k teacher."""
    n, hdim, v = 23, 8, 17
    g = torch.Generator().manual_seed(7)
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(v, hdim, generator=g)
    b = 0.1 * torch.randn(v, generator=g)
    t = 2.0 * torch.randn(n, v, generator=g)
    s = F.linear(h, w, b)
    params = _params(name)
    dense = L.divergence_loss(name, s, t, temperature, **params)
    ids, lp, tail = _topk(t, v - 1, temperature)
    sparse = L.sparse_divergence_loss(name, s, ids, lp, tail, temperature, **params)
    spec = TokenLoss(kind=name, temperature=temperature, **params)
    chunk_dense = chunked_head_loss(h, w, b, spec, teacher=lambda lo, hi: t[lo:hi], chunk=5)
    chunk_topk = chunked_head_loss(
        h, w, b, spec, teacher=lambda lo, hi: (ids[lo:hi], lp[lo:hi], tail[lo:hi]), chunk=5
    )
    assert float(dense) > 0
    for other in (sparse, chunk_dense, chunk_topk):
        assert float(other) == pytest.approx(float(dense), rel=1e-5, abs=1e-6)
    # the per-position LM form is the registry's, parameters read off the spec
    lp_s, lp_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    assert torch.equal(
        divergence_from_logprobs(lp_s, lp_t, spec), per_position(name, lp_s, lp_t, **params)
    )


# ------------------------------------ (b) a divergence registered here, used by name


def _squared_hellinger(s: Tensor, t: Tensor) -> Tensor:
    """H²(p_s, p_t) = ½·Σ(√p_s − √p_t)², in [0, 1]; a sum of squares, so never negative."""
    return 0.5 * ((0.5 * s).exp() - (0.5 * t).exp()).pow(2).sum(-1)


def _kl_mix(s: Tensor, t: Tensor, beta: float = 0.5) -> Tensor:
    """β·KL(p_t ‖ p_s) + (1 − β)·KL(p_s ‖ p_t): takes TokenLoss's ``beta`` by name."""
    fwd = per_position("forward_kl", s, t)
    rev = per_position("reverse_kl", s, t)
    return beta * fwd + (1.0 - beta) * rev


@pytest.fixture
def extra_divergences():
    register_divergence("squared_hellinger")(_squared_hellinger)
    register_divergence("kl_mix", params=("beta",))(_kl_mix)
    try:
        yield ("squared_hellinger", "kl_mix")
    finally:
        DIVERGENCES.pop("squared_hellinger", None)
        DIVERGENCES.pop("kl_mix", None)
    assert tuple(DIVERGENCES) == BUILTIN
    with pytest.raises(ValueError, match="unknown divergence"):
        TokenLoss("squared_hellinger")


def test_a_new_divergence_is_usable_by_name_everywhere(extra_divergences):
    assert LM.KINDS[-2:] == extra_divergences
    n, hdim, v = 19, 6, 13
    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, requires_grad=True)
    t = 2.0 * torch.randn(n, v, generator=g)
    s = h @ w.t()
    lp_s, lp_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    ps, pt = lp_s.exp(), lp_t.exp()

    spec = TokenLoss(kind="squared_hellinger")
    want = (1.0 - (ps * pt).sqrt().sum(-1)).mean()  # H² = 1 − Σ√(p_s·p_t)
    per = divergence_from_logprobs(lp_s, lp_t, spec)
    assert float(per.detach().mean()) == pytest.approx(float(want), rel=1e-5)
    out = chunked_head_loss(h, w, None, spec, teacher=lambda lo, hi: t[lo:hi], chunk=4)
    ref = LM.unchunked_head_loss(h, w, None, spec, teacher_logits=t)
    assert float(out) == pytest.approx(float(want), rel=1e-5)
    gout, gref = torch.autograd.grad(out, (h, w)), torch.autograd.grad(ref, (h, w))
    for a, r in zip(gout, gref, strict=True):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-5)
    assert float(L.divergence_loss("squared_hellinger", s, t)) == pytest.approx(
        float(want), rel=1e-5
    )
    ids, lp, tail = _topk(t, v - 1)
    got = L.sparse_divergence_loss("squared_hellinger", s, ids, lp, tail)
    assert float(got) == pytest.approx(float(want), rel=1e-5)

    # a parameter named like a TokenLoss field is filled from the spec
    mix = TokenLoss(kind="kl_mix", beta=0.25)
    fwd = per_position("forward_kl", lp_s, lp_t)
    rev = per_position("reverse_kl", lp_s, lp_t)
    assert torch.allclose(divergence_from_logprobs(lp_s, lp_t, mix), 0.25 * fwd + 0.75 * rev)
    out = chunked_head_loss(h, w, None, mix, teacher=lambda lo, hi: t[lo:hi], chunk=4)
    assert float(out) == pytest.approx(float((0.25 * fwd + 0.75 * rev).mean()), rel=1e-5)


# --------------------------- (c) the same numbers as before the registry (reference)
# The formulas below are the pre-registry code, copied verbatim in substance: the core
# dense functions, the sparse JSD and the LM if-chain. Where the registry runs the same
# operations the results must be bit-identical (torch.equal, values and gradients);
# the core JSD / sparse JSD (stacked logsumexp for M, now logaddexp as the LM path had)
# and the core TVD (softmax, now exp of the log-softmax) were different float
# computations of the same formula, so they agree to rounding only.


def _old_kl(p_log, q_log):
    p = p_log.exp()
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p_log))
    return (p * diff).sum(-1).clamp_min(0.0)


def _old_mix_log(a, b, alpha):
    if alpha == 0.0:
        return b
    la = torch.log(torch.tensor(alpha, dtype=a.dtype))
    lb = torch.log(torch.tensor(1.0 - alpha, dtype=a.dtype))
    return torch.logaddexp(a + la, b + lb)


def _old_lm(s, t, kind, beta, skew):
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _old_kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _old_kl(s, t)
    if kind == "jsd":
        m = _old_mix_log(t, s, beta)
        return (beta * _old_kl(t, m) + (1.0 - beta) * _old_kl(s, m)).clamp_min(0.0)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return _old_kl(t, _old_mix_log(t, s, skew))
    return _old_kl(s, _old_mix_log(s, t, skew))


def _old_jsd_stacked(s, t, beta):
    log_beta = torch.log(torch.tensor(beta, dtype=s.dtype))
    log_1mb = torch.log(torch.tensor(1.0 - beta, dtype=s.dtype))
    m = torch.logsumexp(torch.stack([t + log_beta, s + log_1mb]), dim=0)
    return beta * _old_kl(t, m) + (1.0 - beta) * _old_kl(s, m)


def _old_dense(name, z, tz, temperature, mask, beta=0.5):
    s = F.log_softmax(z.float() / temperature, -1)
    t = F.log_softmax(tz.float() / temperature, -1)
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        per = _old_kl(t, s)
    elif name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        per = _old_kl(s, t)
    elif name == "jsd":
        per = _old_jsd_stacked(s, t, beta)
    else:  # tvd
        ps = F.softmax(z.float() / temperature, -1)
        pt = F.softmax(tz.float() / temperature, -1)
        per = 0.5 * (pt - ps).abs().sum(-1)
    return L.masked_mean(per, mask)


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    v = fn(z)
    (g,) = torch.autograd.grad(v.sum(), z)
    return v.detach(), g


def _same(a, b, exact):
    (va, ga), (vb, gb) = a, b
    if exact:
        assert torch.equal(va, vb) and torch.equal(ga, gb)
    else:
        assert torch.allclose(va, vb, rtol=1e-6, atol=1e-7)
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_form_is_bit_identical_to_the_old_if_chain(dtype):
    z, tz = _logits((41, 29), 11, 3.0, dtype), _logits((41, 29), 12, 3.0, dtype)
    ids, lp, tail = _topk(tz.float(), 6, 1.5)
    for kind in BUILTIN:
        for beta in (0.0, 0.3, 1.0):
            for skew in (0.0, 0.2):
                spec = TokenLoss(kind=kind, temperature=1.5, beta=beta, skew=skew)

                def new_dense(x, spec=spec):
                    return LM.dense_divergence(x, tz, spec)

                def old_dense(x, spec=spec):
                    s = F.log_softmax(x.float() / 1.5, -1)
                    t = F.log_softmax(tz.float() / 1.5, -1)
                    return _old_lm(s, t, spec.kind, spec.beta, spec.skew)

                def new_sparse(x, spec=spec):
                    return LM.sparse_divergence(x, ids, lp, tail, spec)

                def old_sparse(x, spec=spec):
                    s, t = buckets(x, ids, lp, tail, 1.5)
                    return _old_lm(s, t, spec.kind, spec.beta, spec.skew)

                _same(_value_and_grad(new_dense, z), _value_and_grad(old_dense, z), True)
                _same(_value_and_grad(new_sparse, z), _value_and_grad(old_sparse, z), True)


@pytest.mark.parametrize("masked", [False, True])
def test_core_dense_and_sparse_forms_match_the_old_formulas(masked):
    z, tz = _logits((6, 5, 31), 21, 3.0), _logits((6, 5, 31), 22, 3.0)
    mask = (torch.arange(30).reshape(6, 5) % 3 != 0) if masked else None
    labels = torch.arange(30).reshape(6, 5) % 31
    ids, lp, tail = _topk(tz, 7, 2.0)
    T = 2.0
    cases = [
        (lambda x: L.forward_kl(x, tz, T, mask), lambda x: _old_dense("forward_kl", x, tz, T, mask), True),
        (lambda x: L.reverse_kl(x, tz, T, mask), lambda x: _old_dense("reverse_kl", x, tz, T, mask), True),
        (lambda x: L.jsd(x, tz, 0.0, T, mask), lambda x: _old_dense("jsd", x, tz, T, mask, 0.0), True),
        (lambda x: L.jsd(x, tz, 1.0, T, mask), lambda x: _old_dense("jsd", x, tz, T, mask, 1.0), True),
        (lambda x: L.jsd(x, tz, 0.3, T, mask), lambda x: _old_dense("jsd", x, tz, T, mask, 0.3), False),
        (lambda x: L.tvd(x, tz, T, mask), lambda x: _old_dense("tvd", x, tz, T, mask), False),
        (
            lambda x: L.hinton_kd(x, tz, labels, T, 0.7, mask),
            lambda x: 0.7 * (T**2 * _old_dense("forward_kl", x, tz, T, mask))
            + (1.0 - 0.7) * L.cross_entropy(x, labels, mask),
            True,
        ),
    ]  # fmt: skip

    def old_sparse(name, beta=0.5):
        def fn(x):
            s, t = buckets(x, ids, lp, tail, T)
            if name == "forward_kl" or (name == "jsd" and beta == 0.0):
                per = _old_kl(t, s)
            elif name == "reverse_kl" or (name == "jsd" and beta == 1.0):
                per = _old_kl(s, t)
            elif name == "jsd":
                per = _old_jsd_stacked(s, t, beta)
            else:
                per = 0.5 * (t.exp() - s.exp()).abs().sum(-1)
            return L.masked_mean(per, mask)

        return fn

    cases += [
        (lambda x: L.sparse_forward_kl(x, ids, lp, tail, T, mask), old_sparse("forward_kl"), True),
        (lambda x: L.sparse_reverse_kl(x, ids, lp, tail, T, mask), old_sparse("reverse_kl"), True),
        (lambda x: L.sparse_tvd(x, ids, lp, tail, T, mask), old_sparse("tvd"), True),
        (lambda x: L.sparse_jsd(x, ids, lp, tail, 0.0, T, mask), old_sparse("jsd", 0.0), True),
        (lambda x: L.sparse_jsd(x, ids, lp, tail, 1.0, T, mask), old_sparse("jsd", 1.0), True),
        (lambda x: L.sparse_jsd(x, ids, lp, tail, 0.3, T, mask), old_sparse("jsd", 0.3), False),
    ]  # fmt: skip
    for new, old, exact in cases:
        _same(_value_and_grad(new, z), _value_and_grad(old, z), exact)
