"""Loss properties, a float64 reference, and one pinned value per loss."""

import math

import numpy as np
import pytest
import torch

from darkknowledge import losses as L

DIVS = {
    "forward_kl": L.forward_kl,
    "reverse_kl": L.reverse_kl,
    "jsd": L.jsd,
    "tvd": L.tvd,
}


def _pair(shape=(4, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*shape, generator=g)).to(dtype)
    t = (2 * torch.randn(*shape, generator=g)).to(dtype)
    return s, t


# ------------------------------------------------------------- float64 reference


def _softmax(z, temp=1.0):
    z = np.asarray(z, dtype=np.float64) / temp
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref(name, s, t, temp=1.0, beta=0.5):
    ps, pt = _softmax(s, temp), _softmax(t, temp)

    def kl(p, q):
        return (p * (np.log(p) - np.log(q))).sum(-1)

    if name == "forward_kl":
        per = kl(pt, ps)
    elif name == "reverse_kl":
        per = kl(ps, pt)
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        per = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    elif name == "tvd":
        per = 0.5 * np.abs(pt - ps).sum(-1)
    return per.mean()


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_matches_float64_reference(name, temp):
    s, t = _pair((3, 5, 11))
    got = DIVS[name](s, t, temperature=temp)
    want = ref(name, s.numpy(), t.numpy(), temp)
    assert got.dtype == torch.float32
    assert abs(float(got) - want) < 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("name", DIVS)
def test_zero_on_identical_inputs(name):
    s, _ = _pair()
    assert float(DIVS[name](s, s.clone())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", DIVS)
def test_non_negative_over_many_draws(name):
    for seed in range(20):
        s, t = _pair((8, 13), seed)
        assert float(DIVS[name](s, t)) >= 0.0


@pytest.mark.parametrize("name", DIVS)
def test_bf16_inputs_give_non_negative_finite(name):
    for seed in range(10):
        s, t = _pair((4, 6, 50), seed, torch.bfloat16)
        v = DIVS[name](s, t)
        assert v.dtype == torch.float32
        assert torch.isfinite(v) and float(v) >= 0.0


def test_jsd_beta_endpoints_are_the_two_kls():
    s, t = _pair()
    assert torch.equal(L.jsd(s, t, beta=0.0), L.forward_kl(s, t))
    assert torch.equal(L.jsd(s, t, beta=1.0), L.reverse_kl(s, t))


def test_jsd_tends_to_the_kls_near_the_ends():
    s, t = _pair(dtype=torch.float64)
    eps = 1e-4
    assert float(L.jsd(s, t, beta=eps)) / eps == pytest.approx(float(L.forward_kl(s, t)), rel=1e-3)
    assert float(L.jsd(s, t, beta=1 - eps)) / eps == pytest.approx(
        float(L.reverse_kl(s, t)), rel=1e-3
    )


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    s, t = _pair()
    assert float(L.jsd(s, t, 0.5)) == pytest.approx(float(L.jsd(t, s, 0.5)), rel=1e-5)
    assert float(L.jsd(s, t, 0.5)) <= math.log(2) + 1e-6


@pytest.mark.parametrize("name", [*DIVS, "hinton_kd", "ce"])
def test_all_masked_gives_zero_with_finite_gradients(name):
    s, t = _pair((2, 3, 9))
    s.requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    if name == "ce":
        v = L.cross_entropy(s, torch.zeros(2, 3, dtype=torch.long), mask)
    elif name == "hinton_kd":
        v = L.hinton_kd(s, t, torch.zeros(2, 3, dtype=torch.long), mask=mask)
    else:
        v = DIVS[name](s, t, mask=mask)
    assert float(v.detach()) == 0.0
    v.backward()
    assert torch.isfinite(s.grad).all()
    assert float(s.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("name", DIVS)
def test_masked_positions_contribute_nothing(name):
    s, t = _pair((2, 4, 6))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])  # garbage where masked
    t2[~mask] = -50.0
    a = DIVS[name](s, t, mask=mask)
    b = DIVS[name](s2, t2, mask=mask)
    assert torch.allclose(a, b)
    # the mean is over the 3 valid positions only
    want = DIVS[name](s[mask], t[mask])
    assert torch.allclose(a, want, atol=1e-6)


def test_hinton_kd_formula_and_t_squared_scaling():
    s, t = _pair((16, 10))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    for temp, alpha in [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3)]:
        got = L.hinton_kd(s, t, y, temperature=temp, alpha=alpha)
        want = alpha * temp**2 * L.forward_kl(s, t, temp) + (
            1 - alpha
        ) * torch.nn.functional.cross_entropy(s, y)
        assert torch.allclose(got, want, atol=1e-6)
    # no labels (a transfer set): the soft term alone
    assert torch.allclose(L.hinton_kd(s, t, None, 4.0, 0.9), 16 * L.forward_kl(s, t, 4.0))
    # alpha = 0 is plain cross-entropy
    assert torch.allclose(L.hinton_kd(s, t, y, 4.0, 0.0), torch.nn.functional.cross_entropy(s, y))


def test_hinton_kd_gradient_scale_is_stable_in_temperature():
    """The T² factor keeps the soft gradients' size roughly constant as T grows."""
    s, t = _pair((64, 10), seed=3)
    norms = []
    for temp in (4.0, 8.0, 16.0):
        x = s.clone().requires_grad_(True)
        L.hinton_kd(x, t, None, temp, 1.0).backward()
        norms.append(float(x.grad.norm()))
    assert max(norms) / min(norms) < 2.0


def test_partly_labelled_hard_term_uses_labelled_only():
    s, _t = _pair((4, 5))
    y = torch.tensor([1, L.IGNORE_INDEX, 3, L.IGNORE_INDEX])
    got = L.cross_entropy(s, y)
    want = torch.nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    assert torch.allclose(got, want)


def test_rejects_bad_hyperparameters():
    s, t = _pair()
    with pytest.raises(ValueError):
        L.hinton_kd(s, t, None, temperature=0.0)
    with pytest.raises(ValueError):
        L.hinton_kd(s, t, None, alpha=1.5)
    with pytest.raises(ValueError):
        L.jsd(s, t, beta=-0.1)


# One pinned value each: inputs from _pair((4, 7), seed=0).
PINNED = {
    "forward_kl": 1.0649482,
    "reverse_kl": 1.6393151,
    "jsd": 0.2464488,
    "tvd": 0.5712936,
    "hinton_kd": 2.1760986,
}


@pytest.mark.parametrize("name", PINNED)
def test_pinned_values(name):
    s, t = _pair()
    if name == "hinton_kd":
        v = L.hinton_kd(s, t, torch.tensor([0, 1, 2, 3]), temperature=2.0, alpha=0.7)
    else:
        v = DIVS[name](s, t)
    assert float(v) == pytest.approx(PINNED[name], rel=1e-5)
