import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.teachers import Batch, CachedTeacher, Ensemble, ModuleTeacher


def _nets(n=3, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Flatten(), nn.Linear(16, 5)) for _ in range(n)]


def _batch(b=6):
    return Batch(torch.randn(b, 1, 4, 4, generator=torch.Generator().manual_seed(1)), None,
                 torch.arange(b))  # fmt: skip


def test_module_teacher_is_frozen_and_eval():
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 5))
    t = ModuleTeacher(net)
    b = _batch()
    assert torch.equal(t.signals(b).logits, t.signals(b).logits)  # dropout off
    assert not any(p.requires_grad for p in net.parameters())


def test_prob_mean_is_the_mean_of_probabilities():
    nets, b = _nets(), _batch()
    probs = torch.stack([F.softmax(n(b.x), -1) for n in nets]).mean(0)
    got = F.softmax(Ensemble(nets, "prob_mean").signals(b).logits, -1)
    assert torch.allclose(got, probs, atol=1e-6)


def test_logit_mean_and_weights():
    nets, b = _nets(2), _batch()
    z = [n(b.x) for n in nets]
    got = Ensemble(nets, "logit_mean", weights=[3.0, 1.0]).signals(b).logits
    assert torch.allclose(got, 0.75 * z[0] + 0.25 * z[1], atol=1e-6)
    gp = F.softmax(Ensemble(nets, "prob_mean", weights=[1.0, 0.0]).signals(b).logits, -1)
    assert torch.allclose(gp, F.softmax(z[0], -1), atol=1e-6)


def test_cached_teacher_equals_online_by_example_id():
    nets = _nets()
    ens = Ensemble(nets)
    x = torch.randn(50, 1, 4, 4)
    ids = torch.arange(100, 150)  # ids need not start at 0
    cache = CachedTeacher(ens, x, ids, batch_size=7)
    pick = torch.tensor([49, 3, 17, 17])
    b = Batch(x[pick], None, ids[pick])
    assert torch.allclose(cache.signals(b).logits, ens.signals(b).logits, atol=1e-6)
