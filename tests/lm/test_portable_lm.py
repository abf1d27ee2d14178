"""Causal-LM students as plain transformers sees them: a fresh interpreter that imports
only transformers loads a char-level and a BPE student saved by a run, with their
tokenizers as PreTrainedTokenizerFast / GPT-2 (not transformers 5's TokenizersBackend,
which transformers 4 does not know), model_max_length = the model's positions, and
generates."""

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
    jobs = [(str(char), "First Citizen:", 30, 0), (str(rope), "ROMEO:", 100, 100)]
    bpe = None
    if GPT2_TOK.exists():
        btok = hfio.load_tokenizer(GPT2_TOK)
        bpe = root / "bpe"
        P.save_model(P.build_model(TinyModel(**GPT2), btok, 0), btok, bpe)
        jobs.append((str(bpe), "To be, or not to be", 20, 0))
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
    assert r["prompt_len"] < r["out_len"] <= r["prompt_len"] + 30
    card = (model_dir / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "char-portable" in card
    assert "validation loss" in card and str(saved["text"]) in card
    assert "64 token positions" in card and "IndexError" in card


@pytest.mark.skipif(not GPT2_TOK.exists(), reason="shared GPT-2 tokenizer not present")
def test_bpe_student_loads_with_its_gpt2_tokenizer(saved):
    _, r = saved["bpe"]
    assert r["fast"] and r["saved_class"] == "GPT2Tokenizer"
    assert r["max_len"] == 64 and r["round_trip"] and r["prompt_len"] == 7
    assert r["out_len"] > 7


def test_rope_student_generates_past_its_positions(saved):
    """A LLaMA-style (rotary) char student generates 100 tokens past its 64 positions in
    plain transformers; learned-position (GPT-2) students cannot (docs/export.md)."""
    _, r = saved["rope"]
    assert r["max_len"] == 64 and r["saved_class"] == "PreTrainedTokenizerFast"
    assert r["out_len"] == len("ROMEO:") + 100 > 64
