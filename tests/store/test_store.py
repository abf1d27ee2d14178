"""The signal store through the Python API: formats, lookups, fingerprints, refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge.errors import DKError
from darkknowledge.store import LabelSpec, label, open_store
from darkknowledge.store.format import Q8_STEP
from darkknowledge.teachers import Batch, ModuleTeacher, StoreTeacher


class TinyLM(nn.Module):
    """Embedding → linear: logits (B, T, V) for token ids (B, T)."""

    def __init__(self, vocab=300, dim=16):
        super().__init__()
        self.emb, self.mix, self.out = (
            nn.Embedding(vocab, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, vocab),
        )

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x)))) * 3


def clf_setup(n=100, v=10):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, v))
    x = torch.randn(n, 1, 4, 4)
    ids = torch.arange(1000, 1000 + n) * 3  # ids need not be 0..N−1
    return ModuleTeacher(net), x, ids


def test_dense_fp32_roundtrip_is_exact_in_any_order_and_shard_layout(tmp_path):
    teacher, x, ids = clf_setup()
    spec = LabelSpec(signal="dense", k=None, dtype="fp32", shard_size=17, batch_size=8)
    store = label(teacher, x, ids, tmp_path / "s", spec, progress=False)
    assert len(store) == 100 and len(list((tmp_path / "s" / "shards").iterdir())) == 6
    want = teacher.signals(Batch(x, None, ids)).logits
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    got = store.get(ids[perm]).logits
    assert torch.allclose(got, want[perm], atol=1e-6)
    # the memory-mapped path (no preload) gives the same rows
    lazy = open_store(tmp_path / "s", preload_bytes=0)
    assert lazy._tables is None and torch.equal(lazy.get(ids[perm]).logits, got)


@pytest.mark.parametrize("dtype, tol", [("fp16", 2e-3), ("bf16", 2e-2), ("q8", Q8_STEP / 2 + 1e-6)])
def test_topk_matches_the_teacher_within_storage_precision(tmp_path, dtype, tol):
    teacher, x, ids = clf_setup(v=40)
    spec = LabelSpec(signal="topk", k=5, dtype=dtype, temperature=2.0, shard_size=30)
    store = label(teacher, x, ids, tmp_path / dtype, spec, progress=False)
    sig = StoreTeacher(store).signals(Batch(x[:10], None, ids[:10]))
    lp = F.log_softmax(teacher.signals(Batch(x[:10], None, ids[:10])).logits / 2.0, -1)
    vals, top = lp.topk(5, -1)
    assert torch.equal(sig.topk_ids, top) and sig.topk_ids.dtype == torch.int64
    assert (sig.topk_logprobs - vals).abs().max() <= tol
    assert torch.allclose(sig.tail_mass, 1 - vals.exp().sum(-1), atol=1e-6)
    assert sig.temperature == 2.0 and store.manifest["fingerprint"]["k"] == 5


def test_sequences_store_mask_and_bytes_per_token(tmp_path):
    torch.manual_seed(0)
    lm = TinyLM()
    x = torch.randint(0, 300, (12, 9))
    mask = torch.ones(12, 9, dtype=torch.bool)
    mask[::3, 5:] = False  # padded tails
    ids = torch.arange(12)
    spec = LabelSpec(signal="topk", k=8, dtype="fp16", shard_size=5, batch_size=4)
    store = label(ModuleTeacher(lm), x, ids, tmp_path / "lm", spec, mask=mask, progress=False)
    sig = store.get(torch.tensor([3, 0]))
    assert sig.topk_ids.shape == (2, 9, 8) and sig.tail_mass.shape == (2, 9)
    assert torch.equal(sig.mask, mask[[3, 0]])
    info = store.info()
    assert info["task"] == "sequence" and info["positions"] == int(mask.sum())
    # uint16 ids, fp16 log-probs, fp32 tail: 8·2 + 8·2 + 4 bytes per position + headers
    assert 36 <= info["bytes_per_token"] < 36 * 12 * 9 / int(mask.sum()) + 25


def test_hidden_states_are_stored(tmp_path):
    teacher, x, ids = clf_setup()
    spec = LabelSpec(signal="dense", k=None, hidden=("2",), shard_size=64)
    store = label(teacher, x, ids, tmp_path / "h", spec, progress=False)
    h = store.get(ids[:3]).hidden["2"]
    want = teacher.module[:3](x[:3])
    assert h.shape == (3, 32) and torch.allclose(h, want, atol=1e-2)
    assert store.manifest["hidden"] == {"2": [32]}
    with pytest.raises(DKError, match="no layer 'nope'"):
        label(teacher, x, ids, tmp_path / "h2", LabelSpec(signal="dense", k=None, hidden=("nope",)))


def test_mismatch_is_refused_naming_the_field(tmp_path):
    teacher, x, ids = clf_setup()
    store = label(
        teacher, x, ids, tmp_path / "s", LabelSpec(signal="dense", k=None), progress=False
    )
    fpr = store.fingerprint
    for field in ("teacher", "data", "example_ids", "dtype"):
        with pytest.raises(DKError, match=f"fingerprint field '{field}' differs"):
            StoreTeacher(store, expect={**fpr, field: "something else"})
    # relabelling into the same folder with another teacher is refused, not mixed
    other, _, _ = clf_setup()
    torch.nn.init.zeros_(other.module[1].weight)
    with pytest.raises(DKError, match="'teacher' differs"):
        label(other, x, ids, tmp_path / "s", LabelSpec(signal="dense", k=None))
    with pytest.raises(DKError, match="example id 5 is not in the store"):
        StoreTeacher(store).signals(Batch(x[:1], None, torch.tensor([5])))


def test_bad_specs_and_unfinished_stores_get_one_line(tmp_path):
    teacher, x, ids = clf_setup()
    with pytest.raises(DKError, match=r"label\.k=10 but the teacher has only 10 outputs"):
        label(teacher, x, ids, tmp_path / "a", LabelSpec(signal="topk", k=10))
    with pytest.raises(DKError, match="q8 is for top-k"):
        label(teacher, x, ids, tmp_path / "b", LabelSpec(signal="dense", dtype="q8"))
    with pytest.raises(DKError, match="not a signal store"):
        open_store(tmp_path)
    store = label(
        teacher, x, ids, tmp_path / "c", LabelSpec(signal="dense", k=None), progress=False
    )
    m = json.loads((store.path / "manifest.json").read_text())
    (store.path / "manifest.json").write_text(json.dumps(m | {"complete": False}))
    with pytest.raises(DKError, match="unfinished"):
        open_store(store.path)


def test_rerun_after_a_kill_between_manifest_and_shards_finishes_identically(tmp_path):
    teacher, x, ids = clf_setup()
    spec = LabelSpec(signal="topk", k=3, shard_size=16, batch_size=8)
    ref = label(teacher, x, ids, tmp_path / "ref", spec, progress=False)
    want = {p.name: p.read_bytes() for p in sorted((ref.path / "shards").iterdir())}
    out = tmp_path / "s"
    label(teacher, x, ids, out, spec, progress=False)
    # state of a run killed early: the first manifest, one half-written shard, no others
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m | {"complete": False, "shards": []}))
    for p in (out / "shards").iterdir():
        p.unlink()
    (out / "shards" / "shard-00002.safetensors.tmp").write_bytes(b"\0" * 10)
    store = label(teacher, x, ids, out, spec, progress=False)
    assert {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())} == want
    assert (out / "manifest.json").read_bytes() == (ref.path / "manifest.json").read_bytes()
    assert sorted(store.ids.tolist()) == sorted(ids.tolist())


def _skewed_lm_setup():
    torch.manual_seed(0)
    lm = TinyLM()
    with torch.no_grad():  # a Zipf-like output bias: the tail is far from uniform
        lm.out.bias.copy_(-torch.log1p(torch.arange(300.0)))
    x = torch.randint(0, 300, (12, 9))
    mask = torch.ones(12, 9, dtype=torch.bool)
    mask[::3, 5:] = False
    return lm, x, torch.arange(12), mask


def test_tail_prior_is_the_mean_tail_and_beats_a_uniform_tail(tmp_path):
    from darkknowledge.losses import reconstruct

    lm, x, ids, mask = _skewed_lm_setup()
    spec = LabelSpec(signal="topk", k=8, dtype="fp16", shard_size=5, batch_size=4)
    store = label(ModuleTeacher(lm), x, ids, tmp_path / "lm", spec, mask=mask, progress=False)
    assert store.manifest["fingerprint"]["tail_prior"] is True  # on by default for tokens
    assert not list((store.path / "shards").glob("tailsum-*"))  # folded into the prior
    prior = store.tail_log_prior
    with torch.no_grad():
        p = F.softmax(lm(x), -1)[mask]  # (positions, V)
    _, top = p.topk(8, -1)
    want = p.scatter(-1, top, 0.0).sum(0)
    want = want / want.sum()
    assert torch.allclose(prior.exp(), want.float(), rtol=5e-3, atol=1e-6)  # fp16 logs
    sig = store.get(ids)
    assert sig.tail_log_prior is prior
    kl = {}
    for name, lp in (("uniform", None), ("prior", prior)):
        q = reconstruct(sig.topk_ids, sig.topk_logprobs, sig.tail_mass, 300, lp)[mask]
        kl[name] = (p * (p.log() - q)).sum(-1).mean().item()
    assert kl["prior"] < 0.5 * kl["uniform"]
    # classification stores keep no prior unless asked
    teacher, cx, cids = clf_setup()
    clf = label(teacher, cx, cids, tmp_path / "clf", LabelSpec(k=3), progress=False)
    assert clf.tail_log_prior is None and "tail_prior" not in clf.manifest["fingerprint"]


def test_tail_prior_store_resumes_byte_identical(tmp_path):
    lm, x, ids, mask = _skewed_lm_setup()
    spec = LabelSpec(signal="topk", k=8, shard_size=5, batch_size=4)
    ref = label(ModuleTeacher(lm), x, ids, tmp_path / "ref", spec, mask=mask, progress=False)
    out = tmp_path / "s"
    label(ModuleTeacher(lm), x, ids, out, spec, mask=mask, progress=False)
    # a run killed after shard 0 and its tail sum, during shard 1 (its tail sum written)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m | {"complete": False, "shards": []}))
    (out / "prior.safetensors").unlink()
    for p in (out / "shards").iterdir():
        if p.name != "shard-00000.safetensors":
            p.unlink()
    from darkknowledge.store.format import write_shard

    write_shard(out / "shards" / "tailsum-00001.safetensors", {"tail_sum": torch.ones(300)})
    # shard 0's tail sum is gone too: shard 0 must be recomputed, not trusted without it
    store = label(ModuleTeacher(lm), x, ids, out, spec, mask=mask, progress=False)
    for f in ("manifest.json", "prior.safetensors"):
        assert (out / f).read_bytes() == (ref.path / f).read_bytes()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (ref.path / "shards").iterdir()
    )
    assert torch.equal(store.tail_log_prior, ref.tail_log_prior)


class HeadLM(TinyLM):
    """TinyLM whose logits are exactly its output layer's (no scaling after it)."""

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


def test_head_store_recomputes_the_exact_logits_and_skips_the_head(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm = HeadLM()
    x = torch.randint(0, 300, (12, 9))
    mask = torch.ones(12, 9, dtype=torch.bool)
    mask[::3, 5:] = False
    ids = torch.arange(12)
    teacher = ModuleTeacher(lm)
    with torch.no_grad():
        want = lm(x)
    # the output layer's vocabulary-sized product runs for the checks only, not per batch
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda i, w, b=None: calls.append(w.shape) or real(i, w, b))
    spec = LabelSpec(signal="head", dtype="fp32", shard_size=5, batch_size=4)
    store = label(teacher, x, ids, tmp_path / "h", spec, mask=mask, progress=False)
    monkeypatch.setattr(F, "linear", real)
    assert sum(s[0] == 300 for s in calls) == 2  # the probe, and the head check's redo of it
    assert store.manifest["head"]["layer"] == "out" and store.fingerprint["head_layer"] == "out"
    sig = store.get(ids[[4, 1]])
    assert torch.allclose(sig.logits, want[[4, 1]], atol=1e-5)
    assert torch.equal(sig.mask, mask[[4, 1]])
    assert torch.equal(lm(x), want)  # the module's own forward is back
    # fp16: 2·H bytes per token, whatever the vocabulary; KL to the teacher ~ 0
    half = label(teacher, x, ids, tmp_path / "h16", LabelSpec(signal="head"), mask=mask,
                 progress=False)  # fmt: skip
    p = F.log_softmax(want, -1)
    q = F.log_softmax(half.get(ids).logits, -1)
    assert float((p.exp() * (p - q)).sum(-1)[mask].mean()) < 1e-5
    shard = (tmp_path / "h16" / "shards" / "shard-00000.safetensors").stat().st_size
    assert shard < 12 * 9 * (2 * 16 + 1) + 12 * 8 + 1024  # hidden fp16 + mask + ids + header
    info = half.info()
    assert info["head"]["shape"] == [300, 16] and info["bytes"] == half.nbytes
    from darkknowledge.store.info import format_info

    assert "output layer 'out'" in format_info(info)


def test_head_store_resumes_byte_identical_and_refuses_what_it_cannot_hold(tmp_path):
    torch.manual_seed(0)
    lm = HeadLM()
    x, ids = torch.randint(0, 300, (12, 9)), torch.arange(12)
    mask = torch.ones(12, 9, dtype=torch.bool)
    spec = LabelSpec(signal="head", shard_size=5, batch_size=4)
    ref = label(ModuleTeacher(lm), x, ids, tmp_path / "ref", spec, mask=mask, progress=False)
    out = tmp_path / "s"
    label(ModuleTeacher(lm), x, ids, out, spec, mask=mask, progress=False)
    m = json.loads((out / "manifest.json").read_text())  # killed after shard 0
    (out / "manifest.json").write_text(json.dumps(m | {"complete": False, "shards": []}))
    (out / "head.safetensors").unlink()
    for p in (out / "shards").iterdir():
        if p.name != "shard-00000.safetensors":
            p.unlink()
    label(ModuleTeacher(lm), x, ids, out, spec, mask=mask, progress=False)
    for f in ("manifest.json", "head.safetensors", "shards/shard-00002.safetensors"):
        assert (out / f).read_bytes() == (ref.path / f).read_bytes()
    # logits scaled after the output layer: not a head store
    with pytest.raises(DKError, match="not its layer 'out' applied"):
        label(ModuleTeacher(TinyLM()), x, ids, tmp_path / "x", spec, mask=mask, progress=False)
    with pytest.raises(DKError, match="temperature applies to top-k"):
        LabelSpec(signal="head", temperature=2.0).validate()
    with pytest.raises(DKError, match="no layer 'nope'"):
        label(ModuleTeacher(lm), x, ids, tmp_path / "y",
              LabelSpec(signal="head", head_layer="nope"), mask=mask, progress=False)  # fmt: skip
    from darkknowledge.teachers import Ensemble

    with pytest.raises(DKError, match="one teacher network"):
        label(Ensemble([lm, HeadLM()]), x, ids, tmp_path / "z", spec, mask=mask, progress=False)
    # a classifier's last Linear is found by itself
    teacher, cx, cids = clf_setup()
    clf = label(teacher, cx, cids, tmp_path / "clf", LabelSpec(signal="head", dtype="fp32"),
                progress=False)  # fmt: skip
    want = teacher.signals(Batch(cx, None, cids)).logits
    assert clf.manifest["head"]["layer"] == "3"
    assert torch.allclose(clf.get(cids).logits, want, atol=1e-5)


def test_auto_signal_picks_the_exact_format_when_it_is_no_larger(tmp_path):
    torch.manual_seed(0)
    x, ids = torch.randint(0, 300, (6, 9)), torch.arange(6)
    mask = torch.ones(6, 9, dtype=torch.bool)
    # output layer input 16 wide: 32 bytes a token in fp16; top-10 in q8 with uint16 ids:
    # 10·3 + 4 = 34
    st = label(ModuleTeacher(HeadLM()), x, ids, tmp_path / "a", LabelSpec(k=10), mask=mask,
               progress=False)  # fmt: skip
    assert st.signal == "head" and st.dtype == "fp16"
    # top-4 is smaller (4·3 + 4 = 16 bytes): top-k; logits scaled after the layer: top-k
    st = label(ModuleTeacher(HeadLM()), x, ids, tmp_path / "b", LabelSpec(k=4), mask=mask,
               progress=False)  # fmt: skip
    assert (st.signal, st.dtype, st.k) == ("topk", "q8", 4) and st.tail_log_prior is not None
    st = label(ModuleTeacher(TinyLM()), x, ids, tmp_path / "c", LabelSpec(k=8), mask=mask,
               progress=False)  # fmt: skip
    assert st.signal == "topk"
    # ten classes: dense
    teacher, cx, cids = clf_setup()
    assert label(teacher, cx, cids, tmp_path / "d", progress=False).signal == "dense"
