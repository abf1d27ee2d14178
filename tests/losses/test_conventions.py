"""The numbers docs/conventions.md quotes for its fixed example: the JSD end points and
the jump near them, and where T² applies (hinton_kd, not the named divergences)."""

import pytest
import torch

from darkknowledge.lm.losses import TokenLoss, dense_divergence
from darkknowledge.losses import forward_kl, hinton_kd, jsd, reverse_kl

S = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 0.5, 1.0, 0.0]], dtype=torch.float64)


def test_jsd_end_points_and_the_jump_near_them():
    fkl, rkl = forward_kl(S, T).item(), reverse_kl(S, T).item()
    assert (round(fkl, 6), round(rkl, 6)) == (0.519502, 0.642469)
    assert jsd(S, T, beta=0.0).item() == fkl and jsd(S, T, beta=1.0).item() == rkl
    assert round(jsd(S, T, beta=0.5).item(), 6) == 0.135158
    assert round(jsd(S, T, beta=1e-3).item(), 6) == 0.000519
    assert round(jsd(S, T, beta=0.999).item(), 6) == 0.000641
    assert jsd(S, T, beta=1e-6).item() / 1e-6 == pytest.approx(fkl, rel=1e-5)  # → 0, no 1/β
    assert jsd(S, T, beta=1 - 1e-6).item() / 1e-6 == pytest.approx(rkl, rel=1e-4)


def test_t_squared_only_in_hinton_kd():
    kl4 = forward_kl(S, T, temperature=4.0).item()
    assert round(kl4, 6) == 0.033869
    assert hinton_kd(S, T, None, temperature=4.0).item() == pytest.approx(16 * kl4)
    assert round(hinton_kd(S, T, torch.tensor([0]), 4.0, 0.9).item(), 6) == 0.637238
    # the causal_lm token loss: the divergence at T, no T² factor
    lm = dense_divergence(S, T, TokenLoss(kind="forward_kl", temperature=4.0)).item()
    assert lm == pytest.approx(kl4)
