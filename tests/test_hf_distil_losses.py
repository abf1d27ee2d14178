"""DistilBERT's loss terms, and the task-agnostic triple loss on tiny BERT-MLM models."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from darkknowledge.errors import DKError  # noqa: E402
from darkknowledge.hf.distil_losses import (  # noqa: E402
    HiddenProjection,
    attention_transfer,
    cosine_distance,
    hidden_cosine,
    mask_tokens,
    pool,
    soft_target,
    triple_loss,
)
from darkknowledge.hf.io import build_tiny  # noqa: E402
from darkknowledge.hf.layers import student_from_teacher  # noqa: E402
from darkknowledge.losses import IGNORE_INDEX  # noqa: E402

MASK_ID, CLS, SEP, PAD = 4, 2, 3, 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed=0, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = PAD
    return ids, mask


def test_soft_target_pinned_value_and_zero_at_equality():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    # T=2: p_t = softmax([0, .5]), p_s = softmax([.5, 0]); KL = (p1 - p0)·1 ... times T²
    pt = torch.softmax(t / 2, -1)
    ps = torch.softmax(s / 2, -1)
    want = 4 * (pt * (pt.log() - ps.log())).sum()
    assert torch.allclose(soft_target(s, t, 2.0), want)
    assert float(soft_target(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_cosine_distance_properties():
    h = torch.randn(2, 5, 8)
    assert float(cosine_distance(h, 3 * h)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(h, -h)) == pytest.approx(2.0, abs=1e-6)
    mask = torch.zeros(2, 5)
    x = cosine_distance(h.requires_grad_(), torch.randn(2, 5, 8), mask)
    x.backward()
    assert float(x.detach()) == 0.0 and torch.isfinite(h.grad).all()  # all masked: 0, finite grads


def test_mean_pool_ignores_padding():
    h = torch.randn(1, 4, 3)
    m = torch.tensor([[1, 1, 0, 0]])
    assert torch.allclose(pool(h, m, "mean"), h[:, :2].mean(1))
    assert torch.equal(pool(h, m, "cls"), h[:, 0])


def test_projection_only_when_widths_differ():
    same = HiddenProjection({2: 4}, 64, 64)
    assert sum(p.numel() for p in same.parameters()) == 0
    narrow = HiddenProjection({1: 2, 2: 4}, 32, 64)
    assert narrow(2, torch.randn(1, 3, 32)).shape == (1, 3, 64)


def test_hidden_cosine_rejects_a_missing_student_layer():
    proj = HiddenProjection({5: 4}, 8, 8)
    with pytest.raises(DKError, match="student layer 5 does not exist"):
        hidden_cosine([torch.randn(1, 2, 8)] * 3, {4: torch.randn(1, 2, 8)}, torch.ones(1, 2), proj)


def test_mask_tokens_follows_bert():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 32), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    inp, labels = mask_tokens(ids, mask, MASK_ID, 1000, (CLS, SEP, PAD), 0.15, generator=g)
    picked = labels != IGNORE_INDEX
    assert not picked[:, 0].any() and not picked[:, 20:].any()  # never specials or padding
    assert torch.equal(labels[picked], ids[picked])
    frac = picked.sum() / mask[:, 1:].sum()
    assert 0.11 < float(frac) < 0.19
    masked = (inp == MASK_ID) & picked
    assert 0.7 < float(masked.sum() / picked.sum()) < 0.9
    assert torch.equal(inp[~picked], ids[~picked])


def test_attention_transfer_zero_for_identical_maps_and_positive_otherwise():
    a = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    b = torch.softmax(torch.randn(2, 2, 6, 6), -1)  # a different head count is fine
    m = torch.ones(2, 6)
    assert float(attention_transfer((a,), (a,), {1: 1}, m)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_transfer((b,), (a,), {1: 1}, m)) > 0


def _mlm_step(teacher, student, proj, ids, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp, labels = mask_tokens(ids, mask, MASK_ID, 1000, (CLS, SEP, PAD), 0.3, generator=g)
    with torch.no_grad():
        t_out = teacher(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    s_out = student(input_ids=inp, attention_mask=mask, output_hidden_states=True)
    return triple_loss(s_out, t_out, labels, mask, proj)


def test_triple_loss_on_tiny_bert_mlm():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM", seed=0).eval()
    ids, mask = _batch()
    # a student that is the whole teacher: soft and cosine terms vanish, MLM does not
    clone = student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    total, parts = _mlm_step(teacher, clone, HiddenProjection({4: 4}, 64, 64), ids, mask)
    assert parts["soft"] == pytest.approx(0.0, abs=1e-5)
    assert parts["cos"] == pytest.approx(0.0, abs=1e-5)
    assert parts["mlm"] > 1.0
    assert float(total) == pytest.approx(2.0 * parts["mlm"], rel=1e-4)

    # a 2-layer student from teacher layers [0, 2]: every term is positive and training
    # on the triple loss lowers it
    student = student_from_teacher(teacher, [0, 2]).eval()
    proj = HiddenProjection({2: 4}, 64, 64)
    first, parts = _mlm_step(teacher, student, proj, ids, mask)
    assert all(parts[k] > 0 for k in ("soft", "mlm", "cos"))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for _ in range(8):
        total, _ = _mlm_step(teacher, student, proj, ids, mask)
        opt.zero_grad()
        total.backward()
        opt.step()
    last, _ = _mlm_step(teacher, student, proj, ids, mask)
    assert float(last) < float(first)


def test_triple_loss_learns_a_projection_for_a_narrower_student():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM", seed=0).eval()
    student = build_tiny(
        "tiny-bert",
        "AutoModelForMaskedLM",
        seed=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    proj = HiddenProjection({1: 2, 2: 4}, 32, 64)
    ids, mask = _batch(1)
    total, _ = _mlm_step(teacher, student, proj, ids, mask)
    total.backward()
    grads = [p.grad for p in proj.parameters()]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_triple_loss_refuses_different_vocabularies():
    teacher = build_tiny("tiny-bert", "AutoModelForMaskedLM").eval()
    student = build_tiny("tiny-bert", "AutoModelForMaskedLM", vocab_size=1200, num_hidden_layers=2)
    ids, mask = _batch()
    with pytest.raises(DKError, match="vocab sizes differ"):
        _mlm_step(teacher, student, HiddenProjection({2: 4}, 64, 64), ids, mask)
