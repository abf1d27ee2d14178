"""An ensemble of causal LMs as one teacher (`teacher: {kind: ensemble, members: [...]}`):
distributions averaged over the shared vocabulary, refused in one line when the
members' vocabularies differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.cli import main
from darkknowledge.lm.models import LMEnsemble

SHAKES = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
pytestmark = pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")

TINY = {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}


def _losses(run: Path) -> list[float]:
    lines = (run / "student" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss/kd"] for x in lines if '"lr"' in x]


def test_combine_is_the_mean_distribution():
    z = torch.randn(2, 5, 7)
    ens = LMEnsemble([torch.nn.Identity(), torch.nn.Identity()], [1.0, 3.0], "prob_mean")
    want = (0.25 * z[0].softmax(-1) + 0.75 * z[1].softmax(-1)).log()
    assert torch.allclose(ens.combine([z[0], z[1]]), want, atol=1e-6)
    geo = LMEnsemble([torch.nn.Identity()] * 2, None, "logit_mean").combine([z[0], z[1]])
    assert torch.allclose(geo, (z[0] + z[1]) / 2, atol=1e-6)


def test_ensemble_teacher_trains_labels_and_reports(tmp_path: Path, capsys):
    text = tmp_path / "shakes.txt"
    text.write_text(SHAKES.read_text()[:12_000])
    member = {"model": TINY, "train": {"steps": 12, "batch_size": 8, "warmup": 2, "eval_every": 12}}
    recipe = {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 4,
                 "sampling": "blocks"},
        "tokenizer": {"kind": "char"},
        "teacher": {"kind": "ensemble", "members": [
            member, {**member, "train": {**member["train"], "seed": 1}}]},
        "student": {"model": TINY},
        "train": {"steps": 8, "batch_size": 4, "warmup": 2, "eval_every": 8, "log_every": 1},
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
        "label": {"signal": "dense", "dtype": "fp32"},
    }  # fmt: skip
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(r), "--out", str(tmp_path / "ens")]) == 0
    rep = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert len(rep["teacher"]["members"]) == 2 and rep["teacher"]["combine"] == "prob_mean"
    assert rep["teacher"]["val_loss"] > 0
    ens = _losses(tmp_path / "ens")
    assert len(ens) == 8 and min(ens) > 0
    # the same member twice is that member: the per-step losses of the live teacher
    m0 = tmp_path / "ens" / "teacher" / "member_0" / "model"
    same = f"teacher={{kind: ensemble, members: [{{model: {{path: {m0}}}}}, {{model: {{path: {m0}}}}}]}}"
    one = f"teacher={{model: {{path: {m0}}}}}"
    assert main(["run", str(r), "--out", str(tmp_path / "same"), same]) == 0
    assert main(["run", str(r), "--out", str(tmp_path / "one"), one]) == 0
    a, b = _losses(tmp_path / "same"), _losses(tmp_path / "one")
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5
    assert max(abs(x - y) for x, y in zip(ens, b, strict=True)) > 1e-4  # two members differ
    # dk label writes the ensemble's distributions (members reused from the folder's teacher)
    assert main(["label", str(r), "--out", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    st = tmp_path / "from_store"
    assert main(["run", str(r), "--out", str(st), f"teacher={{kind: store, path: {tmp_path / 'store'}}}"]) == 0  # fmt: skip
    assert len(_losses(st)) == 8


def test_ensemble_members_with_other_vocabularies_are_refused(tmp_path: Path, capsys):
    from darkknowledge.hf.io import build_tiny, char_tokenizer, save_pretrained

    dirs = []
    for i, chars in enumerate(("abcdefgh \n", "abcdefghij \n")):
        tok = char_tokenizer(chars)
        model = build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=0, vocab_size=len(tok),
                           n_layer=1, n_head=2, n_embd=16)  # fmt: skip
        dirs.append(save_pretrained(model, tmp_path / f"m{i}", tok))
    text = tmp_path / "t.txt"
    text.write_text("abc defg hij\n" * 200)
    recipe = {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(text), "block_size": 8},
        "teacher": {"kind": "ensemble",
                    "members": [{"model": {"path": str(d)}} for d in dirs]},
        "student": {"model": {"path": str(dirs[0])}},
        "train": {"steps": 2, "batch_size": 2},
        "distill": {"mode": "token"},
    }  # fmt: skip
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["run", str(r), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher.members.1: its vocabulary differs" in err, err
    # seq-KD samples one model's text: an ensemble is refused for it, in one line
    assert main(["validate", str(r), "distill.mode=seqkd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an ensemble" in err, err
