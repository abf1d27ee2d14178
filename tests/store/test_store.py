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
