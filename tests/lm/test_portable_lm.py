"""Causal-LM students as plain transformers sees them: a fresh interpreter that imports
only transformers loads a char-level and a BPE student saved by a run, with their
tokenizers as PreTrainedTokenizerFast / GPT-2 (not transformers 5's TokenizersBackend,
which transformers 4 does not know), model_max_length = the model's positions, and
generates, past its positions too: GPT-2 students are saved with their learned position
table widened (the trained rows untouched), rotary ones need nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from darkknowledge.families import validate_family
from darkknowledge.hf import io as hfio
from darkknowledge.lm import pipeline as P
from darkknowledge.lm.recipe import TinyModel

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"
GPT2_TOK = SHARED / "tokenizers" / "gpt2"

pytestmark = pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")

FAST = {"steps": 2, "batch_size": 2, "warmup": 1, "eval_every": 2, "checkpoint_every": 2}
GPT2 = {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 64}}
LLAMA = {
    "tiny": "tiny-llama",
    "config": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
               "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 64},
}  # fmt: skip

# Runs with only transformers: for each (folder, prompt, max_new_tokens, min_new_tokens),
# load, tokenizer facts, a round trip, greedy generation.
# The interpreter of the probes: this one, or (DK_PORTABLE_PYTHON) another with an
# older transformers, to check that students saved here load there (docs/export.md).
PROBE_PYTHON = os.environ.get("DK_PORTABLE_PYTHON") or sys.executable

PROBE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers as tf
assert "darkknowledge" not in sys.modules
res = {}
for d, prompt, new, min_new in json.loads(sys.argv[1]):
    tok = tf.AutoTokenizer.from_pretrained(d)
    model = tf.AutoModelForCausalLM.from_pretrained(d).eval()
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=new, min_new_tokens=min_new, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    res[d] = {
        "fast": isinstance(tok, tf.PreTrainedTokenizerFast),
        "saved_class": json.load(open(d + "/tokenizer_config.json"))["tokenizer_class"],
        "max_len": tok.model_max_length,
        "round_trip": tok.decode(enc["input_ids"][0]) == prompt,
        "prompt_len": enc["input_ids"].shape[1],
        "out_len": out.shape[1],
        "n_positions": model.config.to_dict().get("n_positions"),
        "gen_max_length": model.generation_config.max_length,
    }
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A char student saved by a run, a BPE (GPT-2 tokenizer) student and a rotary
    (LLaMA-style) char student, each 64 positions; probed in one fresh interpreter."""
    root = tmp_path_factory.mktemp("portable")
    text = root / "shakes.txt"
    text.write_text(SHAKES.read_text()[:5_000])
    _, rec = validate_family(
        {"family": "causal_lm", "name": "char-portable",
         "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 2},
         "tokenizer": {"kind": "char"}, "student": {"model": GPT2}, "train": FAST,
         "distill": {"mode": "none"}}
    )  # fmt: skip
    P.run_lm_recipe(rec, root / "run")
    char = root / "run" / "student" / "model"
    ctok = hfio.char_tokenizer(text.read_text())
    rope = root / "rope"
    P.save_model(P.build_model(TinyModel(**LLAMA), ctok, 0), ctok, rope)
    jobs = [(str(char), "First Citizen:", 100, 100), (str(rope), "ROMEO:", 100, 100)]
    bpe = None
    if GPT2_TOK.exists():
        btok = hfio.load_tokenizer(GPT2_TOK)
        bpe = root / "bpe"
        P.save_model(P.build_model(TinyModel(**GPT2), btok, 0), btok, bpe)
        jobs.append((str(bpe), "To be, or not to be", 100, 100))
    p = subprocess.run(
        [PROBE_PYTHON, "-c", PROBE, json.dumps(jobs)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return {"char": (char, res[str(char)]), "rope": (rope, res[str(rope)]),
            "bpe": (bpe, res.get(str(bpe))), "text": text}  # fmt: skip


def test_char_student_of_a_run_loads_and_generates_in_plain_transformers(saved):
    model_dir, r = saved["char"]
    assert r["fast"] and r["saved_class"] == "PreTrainedTokenizerFast"
    assert r["max_len"] == 64 and r["round_trip"] and r["prompt_len"] == len("First Citizen:")
    # 100 new tokens after a 14-token prompt: past the 64 trained positions
    assert r["out_len"] == r["prompt_len"] + 100 > 64
    assert r["n_positions"] == hfio.GENERATE_POSITIONS and r["gen_max_length"] == 64
    card = (model_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "char-portable" in card
    assert "validation loss" in card and str(saved["text"]) in card
    assert "64 token positions" in card and "widened to 1024" in card


def test_widened_gpt2_gives_the_trained_outputs_on_the_trained_positions(tmp_path):
    """The saved (widened) GPT-2 gives the in-memory model's logits on all 64 trained
    positions, and differs from a table cut at 64 only past them (where that one fails)."""
    import torch
    import transformers as tf

    tok = hfio.char_tokenizer(SHAKES.read_text()[:2_000])
    model = P.build_model(TinyModel(**GPT2), tok, 0).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_()  # distinct rows, as after training
    P.save_model(model, tok, tmp_path / "m")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.n_positions == 1024 and back.config.trained_positions == 64
    assert model.config.n_positions == 64  # the model in memory is not changed
    ids = torch.randint(0, len(tok), (2, 64))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
        w = back.transformer.wpe.weight
        assert torch.equal(w[:64], model.transformer.wpe.weight)
        assert torch.equal(w[64:], w[63].expand(1024 - 64, -1))
        longer = back(torch.randint(0, len(tok), (1, 100))).logits
    assert torch.isfinite(longer).all()
    # loaded by this tool, it is the model as trained (weights, config, fingerprint)
    inside = hfio.load_model(tmp_path / "m", "AutoModelForCausalLM")
    assert inside.config.n_positions == 64 and not hasattr(inside.config, "trained_positions")
    sd, ref = inside.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    # saved again (e.g. after training on from it), it keeps its trained count
    P.save_model(back, tok, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 64


@pytest.mark.skipif(not GPT2_TOK.exists(), reason="shared GPT-2 tokenizer not present")
def test_bpe_student_loads_with_its_gpt2_tokenizer(saved):
    _, r = saved["bpe"]
    assert r["fast"] and r["saved_class"] == "GPT2Tokenizer"
    assert r["max_len"] == 64 and r["round_trip"] and r["prompt_len"] == 7
    assert r["out_len"] == 107 > 64 and r["n_positions"] == hfio.GENERATE_POSITIONS


def test_rope_student_generates_past_its_positions(saved):
    """A LLaMA-style (rotary) char student generates 100 tokens past its 64 positions in
    plain transformers, saved as it is (nothing widened)."""
    _, r = saved["rope"]
    assert r["max_len"] == 64 and r["saved_class"] == "PreTrainedTokenizerFast"
    assert r["out_len"] == len("ROMEO:") + 100 > 64
    assert r["n_positions"] is None and r["gen_max_length"] == 64
