"""Sampled stores (label.signal=sampled): seeded draws written deterministically (a
resume gives the same bytes), the manifest schema's refusals, and `dk label` + `dk run`
on the digits recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.cli import main
from darkknowledge.errors import DKError
from darkknowledge.store import LabelSpec, SignalStore, label
from darkknowledge.store.manifest import parse_manifest
from darkknowledge.teachers import ModuleTeacher


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted([root / "manifest.json", *(root / "shards").iterdir()])}  # fmt: skip


def test_sampled_store_is_seeded_resumable_and_schema_checked(tmp_path: Path):
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 300)  # 300 outputs: 16 draws leave many outputs unseen
    x, ids = torch.randn(40, 5), torch.arange(100, 140)
    spec = LabelSpec(signal="sampled", k=16, temperature=2.0, shard_size=16, batch_size=8)
    a = label(ModuleTeacher(net), x, ids, tmp_path / "a", spec, progress=False)
    sig = a.get(ids)
    assert sig.sampled_weights.shape == (40, 16)
    assert torch.allclose(sig.sampled_weights.sum(-1), torch.ones(40))
    assert a.info()["bytes_per_example"] > 0 and a._maps[0]["sample_counts"].dtype.name == "uint8"
    # a kill after shard 0: the rerun draws shards 1-2 again, to the same bytes
    label(ModuleTeacher(net), x, ids, tmp_path / "b", spec, progress=False)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (tmp_path / "b" / "shards" / "shard-00001.safetensors").unlink()
    (tmp_path / "b" / "shards" / "shard-00002.safetensors").unlink()
    unfinished = {k: v for k, v in m.items() if k not in ("num_positions", "hidden", "spec")}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(unfinished | {"complete": False, "shards": []}))  # fmt: skip
    label(ModuleTeacher(net), x, ids, tmp_path / "b", spec, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # another seed: other draws
    c = label(ModuleTeacher(net), x, ids, tmp_path / "c", LabelSpec(**{**spec.__dict__, "seed": 1}), progress=False)  # fmt: skip
    assert not torch.equal(c.get(ids).sampled_ids, sig.sampled_ids)
    # the schema refuses contradictions, one line naming the key
    bad = [
        ({"k": None}, "needs k"),
        (
            {"tail_prior": {"file": "prior.safetensors", "bytes": 9, "sha256": "0" * 64}},
            "tail_prior: set on a sampled store",
        ),
        ({"dtype": "q8"}, "q8"),
        ({"fingerprint": m["fingerprint"] | {"seed": None}}, "fingerprint.seed"),
        ({"spec": m["spec"] | {"seed": 5}}, "spec.seed"),
    ]
    for change, msg in bad:
        with pytest.raises(DKError, match=msg) as e:
            parse_manifest(m | change, "m.json")
        assert "\n" not in str(e.value)
    with pytest.raises(DKError, match=r"label\.k \(draws"):
        LabelSpec(signal="sampled", k=70000).validate()


def test_dk_label_sampled_on_digits_then_run(tmp_path: Path, capsys):
    base = {
        "data": {"name": "digits"},
        "student": {"model": {"name": "mlp", "hidden": [24]}},
        "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}},
        "train": {"epochs": 3, "batch_size": 32},
        "eval": {"latency": False},
    }
    teacher = {"kind": "module", "model": {"name": "mlp", "hidden": [32]},
               "train": {"epochs": 3, "batch_size": 64}}  # fmt: skip
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump(base | {"teacher": teacher, "label": {"signal": "sampled", "temperature": 2.0}}))  # fmt: skip
    store = tmp_path / "store"
    assert main(["label", str(lab), "--out", str(store)]) == 0
    assert "16 draws (distinct ids + counts) at temperature 2" in capsys.readouterr().out
    st = SignalStore(store)
    assert st.signal == "sampled" and st.k == 16  # the default number of draws
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(base | {"teacher": {"kind": "store", "path": str(store)}}))
    assert main(["run", str(run), "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["rows"]["student"]["accuracy"] > 0.5
    capsys.readouterr()
    cases = [
        (["loss={reverse_kl: {temperature: 2.0}}"], "reverse_kl cannot be estimated without bias"),
        (["loss={jsd: {temperature: 2.0}}"], "jsd cannot be estimated without bias"),
        (["loss.hinton_kd.temperature=4"], "field 'temperature' differs"),
    ]
    for over, msg in cases:
        assert main(["run", str(run), "-q", "--out", str(tmp_path / "r2"), "--force", *over]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (over, err)
