"""A sampled token store (label.signal=sampled) on a causal_lm recipe: `dk label` writes
it with the token ids per position, a relabel gives the same bytes, `dk run` trains from
it (KD term > 0 every step), a reverse-KL run is refused, and `dk store info` reports its
bytes per token against a top-k store of the same k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main
from darkknowledge.store import SignalStore

SHAKES = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
pytestmark = pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")


def _files(root: Path) -> dict[str, bytes]:
    paths = [root / "manifest.json", root / "inputs.safetensors", *(root / "shards").iterdir()]
    return {p.name: p.read_bytes() for p in sorted(paths)}


def test_sampled_token_store(tmp_path: Path, capsys):
    text = tmp_path / "shakes.txt"
    text.write_text(SHAKES.read_text()[:8_000])
    recipe = {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 2,
                 "sampling": "blocks"},
        "tokenizer": {"kind": "char"},
        "teacher": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
                    "train": {"steps": 6, "batch_size": 8, "warmup": 1}},
        "student": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}},
        "train": {"steps": 6, "batch_size": 4, "warmup": 1, "eval_every": 6, "log_every": 1},
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
        "label": {"signal": "sampled", "k": 16},
    }  # fmt: skip
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sampled"
    assert main(["label", str(r), "--out", str(out)]) == 0
    first = _files(out)
    st = SignalStore(out)
    assert st.signal == "sampled" and st.inputs is not None  # the token ids, once
    assert (
        st.nbytes == sum(s["bytes"] for s in st.manifest["shards"]) + st.manifest["inputs"]["bytes"]
    )
    assert main(["label", str(r), "--out", str(out), "--force"]) == 0  # relabelled: same bytes
    assert _files(out) == first
    teacher = f"teacher={{model: {{path: {out / 'teacher' / 'model'}}}}}"
    topk = tmp_path / "topk"
    assert main(["label", str(r), "--out", str(topk), teacher, "label.signal=topk", "label.tail_prior=false"]) == 0  # fmt: skip
    capsys.readouterr()
    per = {}
    for name, store in (("sampled", out), ("topk", topk)):
        assert main(["store", "info", str(store), "--json"]) == 0
        per[name] = json.loads(capsys.readouterr().out)["bytes_per_token"]
    with capsys.disabled():
        print(f"bytes per token, k=16: sampled {per['sampled']:.2f}, top-k {per['topk']:.2f}")
    # per token: 16 ids (uint16) + 16 counts (uint8) vs 16 ids + 16 q8 log-probs + fp32 tail
    assert 0 < per["sampled"] < per["topk"]

    store_teacher = f"teacher={{kind: store, path: {out}}}"
    assert main(["run", str(r), "--out", str(tmp_path / "run"), store_teacher]) == 0
    lines = (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()
    kd = [json.loads(x)["loss/kd"] for x in lines if '"lr"' in x]
    assert len(kd) == 6 and all(v > 0 for v in kd), kd
    capsys.readouterr()
    bad = ["run", str(r), "-q", "--out", str(tmp_path / "bad"), store_teacher]
    assert main([*bad, "distill.loss.kind=reverse_kl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reverse_kl cannot be estimated without bias" in err, err
    # the signal doctor reads a sampled store too: counts summing to k, the recipe's
    # temperature against the store's
    capsys.readouterr()
    assert main(["store", "check", str(out), "--against", str(r)]) == 0
    assert "refuse:" not in capsys.readouterr().out
    assert (
        main(["store", "check", str(out), "--against", str(r), "distill.loss.temperature=2"]) == 2
    )
    assert "temperature" in capsys.readouterr().out
