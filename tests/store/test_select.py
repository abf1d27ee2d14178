"""Top-k and sampled labelling from the teacher's output layer, one vocabulary chunk at a
time (store/select.py): the same ids, log-probabilities, tail masses and tail prior as
the plain computation on the whole logits, for logits in the usual range and for logits
far below 0 or far above it (the shifted paths); draws that follow the distribution and
agree with those from the logits but for rounding; and the output layer's
vocabulary-sized product never runs per batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.store import LabelSpec, label
from darkknowledge.store import select as S
from darkknowledge.store.label import sample_counts
from darkknowledge.teachers import ModuleTeacher

V = 1200  # three chunks, the last one short


class HeadLM(nn.Module):
    """Token ids (B, T) → logits (B, T, V), exactly its output layer's."""

    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.emb, self.out = nn.Embedding(50, 16), nn.Linear(16, V)
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias.add_(offset)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def _setup(scale=4.0, offset=0.0):
    torch.manual_seed(0)
    lm = HeadLM(scale, offset)
    x = torch.randint(0, 50, (10, 7))
    mask = torch.ones(10, 7, dtype=torch.bool)
    mask[::3, 4:] = False
    return lm, x, torch.arange(10), mask


def _head_products(monkeypatch) -> list:
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda i, w, b=None: calls.append(w.shape[0]) or real(i, w, b))
    return calls


# logits around 0; all far below 0 (as GPT-2's); above the range exp takes unshifted at T=0.5
@pytest.mark.parametrize("scale, offset", [(4.0, 0.0), (4.0, -120.0), (40.0, 30.0)])
def test_fused_topk_is_the_plain_computation(tmp_path, monkeypatch, scale, offset):
    lm, x, ids, mask = _setup(scale, offset)
    with torch.no_grad():
        z = lm(x) / 0.5  # (B, T, V)
    calls = _head_products(monkeypatch)
    spec = LabelSpec(signal="topk", k=20, dtype="fp32", temperature=0.5, shard_size=4, batch_size=3)
    store = label(ModuleTeacher(lm), x, ids, tmp_path / "s", spec, mask=mask, progress=False)
    monkeypatch.undo()
    assert calls.count(V) == 2  # the probe and its check: no batch ran the output layer
    lp = F.log_softmax(z.double(), -1)
    want_lp, want_ids = lp.topk(20, -1)
    sig = store.get(ids)
    assert torch.equal(sig.topk_ids, want_ids)
    # within rounding at the logits' magnitude (the shift subtracts in fp32)
    tol = 1e-5 + 2**-21 * float(z.abs().max())
    assert torch.allclose(sig.topk_logprobs.double(), want_lp, atol=tol, rtol=0)
    assert torch.allclose(sig.tail_mass.double(), 1 - want_lp.exp().sum(-1), atol=1e-6, rtol=0)
    # the tail prior: the positions' mass outside their top-k, summed and normalised
    p = lp.exp().scatter(-1, want_ids, 0.0) * mask.unsqueeze(-1)
    prior = p.sum((0, 1)) / p.sum()
    want = prior.clamp_min(1e-20).log()
    got = store.tail_log_prior.double()  # stored in fp16
    assert bool(((got - want).abs() <= 2**-10 * want.abs() + 1e-3).all())


@pytest.mark.parametrize("scale, offset", [(4.0, 0.0), (4.0, -120.0), (40.0, 30.0)])
def test_fused_draws_are_the_draws_from_the_logits(tmp_path, monkeypatch, scale, offset):
    lm, x, ids, mask = _setup(scale, offset)
    calls = _head_products(monkeypatch)
    spec = LabelSpec(signal="sampled", k=200, temperature=0.5, shard_size=4, batch_size=3)
    store = label(ModuleTeacher(lm), x, ids, tmp_path / "s", spec, mask=mask, progress=False)
    monkeypatch.undo()
    assert calls.count(V) == 2
    # shard i draws from Generator(seed · 1,000,003 + i), its batches in order
    want_ids, want_counts = [], []
    with torch.no_grad():
        for i, lo in enumerate(range(0, 10, 4)):
            gen = torch.Generator().manual_seed(i)
            for b in range(lo, min(lo + 4, 10), 3):
                got = sample_counts(lm(x[b : min(b + 3, lo + 4, 10)]), 200, 0.5, gen)
                want_ids.append(got[0])
                want_counts.append(got[1])
    sig = store.get(ids)

    def histogram(ids, counts):  # (B, T, V): how often each id was drawn
        return torch.zeros(10, 7, V).scatter_add_(-1, ids, counts.float())

    got = histogram(sig.sampled_ids, sig.sampled_weights * 200)
    want = histogram(torch.cat(want_ids), torch.cat(want_counts))
    # the product by chunks (and a shift inside it) may round the last bit of a logit
    # otherwise, and so move a draw that falls that close to a boundary between two ids
    assert float((got - want).abs().sum()) / 2 < 0.01 * 10 * 7 * 200


def test_draws_follow_the_distribution_in_every_range():
    torch.manual_seed(1)
    base = torch.randn(3, V) * 3
    for offset in (0.0, -150.0, 80.0):
        z = base + offset
        ids, counts = sample_counts(z.expand(400, 3, V), 64, 1.0, torch.Generator().manual_seed(2))
        freq = torch.zeros(3, V, dtype=torch.float64)
        freq.scatter_add_(
            -1, ids.transpose(0, 1).reshape(3, -1), counts.transpose(0, 1).reshape(3, -1).double()
        )
        freq /= freq.sum(-1, keepdim=True)  # 25,600 draws per row
        p = torch.softmax(z.double(), -1)
        common = p * 25600 >= 20  # each seen ≥ 20 times on average; the rest as one
        assert int(common.sum()) > 100
        p = torch.cat([p, (p * ~common).sum(-1, keepdim=True)], -1)
        freq = torch.cat([freq, (freq * ~common).sum(-1, keepdim=True)], -1)
        keep = torch.cat([common, torch.ones(3, 1, dtype=torch.bool)], -1)
        se = (p * (1 - p) / 25600).sqrt()
        z_scores = ((freq - p).abs() / se)[keep]
        assert float(z_scores.max()) < 5.0, offset


def test_chunks_of_the_product_are_the_whole_product():
    torch.manual_seed(0)
    h, head = torch.randn(64, 32), nn.Linear(32, V, bias=False)
    out = torch.empty(64, S.CHUNK)
    fill = S.head_filler(h, head)
    whole = head(h)
    for a in range(0, V, S.CHUNK):
        b = min(a + S.CHUNK, V)
        fill(a, b, out[:, : b - a], None)
        assert torch.equal(out[:, : b - a], whole[:, a:b])


def _reference(z: torch.Tensor, k: int, w: torch.Tensor):
    lp = F.log_softmax(z.double(), -1)
    vals, ids = lp.topk(k, -1)
    tail_sum = (lp.exp().scatter(-1, ids, 0.0) * w.unsqueeze(-1)).sum(0)
    return vals, ids, 1 - vals.exp().sum(-1), tail_sum


@pytest.mark.parametrize("case", ["overflow in a later chunk", "top-k far below the maximum"])
def test_the_rare_paths_give_the_plain_computation(case):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, V, generator=g)
    if case == "overflow in a later chunk":  # chunk 0 near 0: no shift; exp(z) overflows later
        z[:, 700:760] += 120.0
    else:  # a few entries at 0, the rest ≥ 150 below: exp of the top-k underflows
        z = z - 150.0 - 10 * torch.rand(6, V, generator=g)
        z[:, 5:9] = torch.randn(6, 4, generator=g)
    w = torch.rand(6, generator=g)
    got = S.topk_signals(S.logits_filler(z), 6, V, 20, 1.0, w, S.ChunkedLogits())
    vals, ids, tail, tail_sum = _reference(z, 20, w)
    assert torch.equal(got["ids"], ids)
    tol = 1e-5 + 2**-21 * float(z.abs().max())
    assert torch.allclose(got["logprobs"].double(), vals, atol=tol, rtol=0)
    assert torch.allclose(got["tail"].double(), tail, atol=tol, rtol=0)
    assert torch.allclose(got["tail_sum"], tail_sum, rtol=1e-4, atol=1e-30)
    # draws land where the mass is, and spread over it
    drawn, counts = sample_counts(z, 255, 1.0, torch.Generator().manual_seed(4))
    lo, hi = (700, 760) if case == "overflow in a later chunk" else (5, 9)
    assert bool(((drawn >= lo) & (drawn < hi) | (counts == 0)).all())
    assert int((counts > 0).sum(-1).min()) >= (hi - lo) // 3


def test_row_groups_give_the_same_store(tmp_path, monkeypatch):
    """A batch too large for one buffer is labelled in groups of rows: the same signals."""
    lm, x, ids, mask = _setup()
    specs = {
        "topk": LabelSpec(signal="topk", k=20, dtype="fp32", shard_size=10, batch_size=10),
        "sampled": LabelSpec(signal="sampled", k=50, shard_size=10, batch_size=10),
    }
    whole = {n: label(ModuleTeacher(lm), x, ids, tmp_path / n, s, mask=mask, progress=False)
             for n, s in specs.items()}  # fmt: skip
    monkeypatch.setattr(S, "MAX_BUFFER", 4 * 3 * S.CHUNK * 16)  # 16 rows of 70 a group
    assert len(S.row_groups(70, V)) == 5
    for n, s in specs.items():
        split = label(ModuleTeacher(lm), x, ids, tmp_path / f"{n}-split", s, mask=mask,
                      progress=False)  # fmt: skip
        a, b = whole[n].get(ids), split.get(ids)
        for f in ("topk_ids", "topk_logprobs", "tail_mass", "sampled_ids", "sampled_weights"):
            if getattr(a, f) is not None:
                assert torch.equal(getattr(a, f), getattr(b, f)), (n, f)
        if n == "topk":  # the tail prior's sum adds the groups up in another order
            assert torch.allclose(whole[n].tail_log_prior, split.tail_log_prior, atol=2e-3)


class WholeWindows(HeadLM):
    """A teacher that refuses anything but whole 40-token windows."""

    def forward(self, x):
        if x.shape[1] != 40:
            raise ValueError("this teacher reads 40-token windows")
        return super().forward(x)


def test_the_probe_reads_a_prefix_or_else_a_whole_window(tmp_path):
    from darkknowledge.store.label import PROBE_POSITIONS

    torch.manual_seed(0)
    lm = HeadLM(4.0, 0.0)
    x, ids = torch.randint(0, 50, (4, 40)), torch.arange(4)
    mask = torch.ones(4, 40, dtype=torch.bool)
    spec = LabelSpec(signal="topk", k=8, dtype="fp32", shard_size=4, batch_size=2)
    lengths = []
    lm.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1]))
    a = label(ModuleTeacher(lm), x, ids, tmp_path / "a", spec, mask=mask, progress=False)
    assert lengths == [PROBE_POSITIONS, 40, 40]  # the probe, then the two batches
    strict = WholeWindows(4.0, 0.0)
    strict.load_state_dict(lm.state_dict())
    b = label(ModuleTeacher(strict), x, ids, tmp_path / "b", spec, mask=mask, progress=False)
    sa, sb = a.get(ids), b.get(ids)
    assert torch.equal(sa.topk_ids, sb.topk_ids)
    assert torch.equal(sa.topk_logprobs, sb.topk_logprobs)
