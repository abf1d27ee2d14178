"""Hidden-state terms of the loss stack: the FitNet hint with its learned projection."""

import torch

from darkknowledge.losses.features import HiddenProjection, hidden_cosine, hidden_mse


def test_hint_mse_is_zero_on_a_match_and_trains_the_projection():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)  # teacher layer 2: (B, T, Ht)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    same = HiddenProjection({1: 2}, 8, 8)  # equal widths: identity, no parameters
    assert not list(same.parameters())
    assert float(hidden_mse([None, t], {2: t}, mask, same)) == 0.0
    s = torch.randn(2, 5, 4, requires_grad=True)  # a narrower student: a learned map
    proj = HiddenProjection({1: 2}, 4, 8)
    loss = hidden_mse([None, s], {2: t}, mask, proj)
    loss.backward()
    assert loss > 0 and proj.proj["1"].weight.grad.abs().sum() > 0 and s.grad is not None
    # padding does not count: changing a masked position leaves the loss as it was
    t2 = t.clone()
    t2[0, 4] += 100.0
    assert torch.equal(hidden_mse([None, s], {2: t2}, mask, proj), loss.detach())
    # pooled: the teacher's pooled vector (B, Ht)
    pooled = hidden_mse([None, s], {2: t.mean(1)}, torch.ones(2, 5), proj, how="mean")
    cos = hidden_cosine([None, s], {2: t.mean(1)}, torch.ones(2, 5), proj, how="mean")
    assert pooled > 0 and cos > 0
