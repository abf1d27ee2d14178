"""dk serve-teacher over real HTTP (uvicorn on loopback), and dk generate against it.
The served tiny model comes from conftest.py (``served``); test_serve_openai.py drives
the same server with the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx as _httpx
import pytest
import yaml

from darkknowledge.blackbox.serve import Generator
from darkknowledge.blackbox.synthetic import problems
from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[2]


class httpx:  # a patient client: the CPU is shared
    get = staticmethod(lambda *a, **k: _httpx.get(*a, timeout=60, **k))
    post = staticmethod(lambda *a, **k: _httpx.post(*a, timeout=60, **k))


def test_endpoints(served):
    url, _ = served
    assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
    body = {
        "model": "tiny",
        "prompt": "Q: Ann has 3 eggs.",
        "max_tokens": 6,
        "n": 3,
        "temperature": 1.0,
        "seed": 7,
        "logprobs": 3,
    }
    a = httpx.post(url + "/completions", json=body).json()
    b = httpx.post(url + "/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded
    assert len(a["choices"]) == 3 and a["usage"]["prompt_tokens"] == len("Q: Ann has 3 eggs.")
    lp = a["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == a["choices"][0]["text"]
    for tok_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert tok_lp <= 0 and len(top) == 3
        assert list(top.values()) == sorted(top.values(), reverse=True)
    # greedy: the chosen token is the most probable one
    g = httpx.post(
        url + "/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Q: Ben"}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    for t in g["choices"][0]["logprobs"]["content"]:
        assert t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"], abs=1e-5)
    # above the cap, a wrong model, a bad field: 400/404 with an OpenAI-style error
    r = httpx.post(url + "/completions", json=body | {"logprobs": 6})
    assert r.status_code == 400 and "cap of 5" in r.json()["error"]["message"]
    assert httpx.post(url + "/completions", json=body | {"model": "x"}).status_code == 404
    r = httpx.post(url + "/completions", json={"prompt": "x", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("n:")


def test_stop_and_length(served):
    url, gen = served
    assert isinstance(gen, Generator)
    r = httpx.post(
        url + "/completions",
        json={"prompt": "Q:", "max_tokens": 16, "temperature": 1.0, "seed": 1, "n": 4},
    ).json()
    assert r["usage"]["completion_tokens"] <= 4 * 16
    assert all(c["finish_reason"] in ("stop", "length") for c in r["choices"])
    s = httpx.post(
        url + "/completions",
        json={
            "prompt": "Q:",
            "max_tokens": 16,
            "temperature": 1.0,
            "seed": 1,
            "n": 4,
            "stop": ["e"],
        },
    ).json()
    for c, full in zip(s["choices"], r["choices"], strict=True):
        assert "e" not in c["text"] and full["text"].startswith(c["text"])


def _generate(url, tmp_path, rows, api: str, *, n: int, max_tokens: int, top: int) -> None:
    """`dk generate` of ``rows`` against the served tiny model into ``tmp_path/o``, keeping
    every sample (``select.keep: all``) with ``top`` log-probabilities asked for."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {
        "prompts": {"path": str(prompts), "template": "Q: {question}\nA:"},
        "teacher": {"base_url": url, "model": "tiny", "api": api, "max_top_logprobs": 5},
        "sampling": {"n": n, "max_tokens": max_tokens, "temperature": 1.0, "seed": 0,
                     "top_logprobs": top},
        "select": {"keep": "all"},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    assert main(["generate", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 0


def test_generate_against_served_teacher(served, teacher_dir, tmp_path):
    # top_logprobs above the server's cap of 5: clamped to it instead of failing every request
    _generate(served[0], tmp_path, problems(6, 1), "completions", n=3, max_tokens=20, top=8)
    sft = (tmp_path / "o" / "sft.jsonl").read_text().splitlines()
    assert len(sft) == 18  # keep: all
    assert json.loads(sft[0])["verdict"]["verifier"] == "gsm8k"
    row = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    lp = row["samples"][0]["logprobs"]  # captured with the answer
    assert "".join(lp["tokens"]) == row["samples"][0]["text"]
    assert all(len(t) == 5 for t in lp["top_logprobs"])

    # the SFT file is chat data for the causal_lm family: `dk run` fine-tunes a student
    # on it (loss on the responses only), resumable like every training run
    sft_recipe = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(tmp_path / "o" / "sft.jsonl"), "max_length": 96},
        "student": {"model": {"path": str(teacher_dir)}},
        "train": {"steps": 4, "batch_size": 4, "warmup": 1, "eval_every": 2,
                  "checkpoint_every": 2},
        "distill": {"mode": "none"},
    }  # fmt: skip
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_recipe))
    assert main(["run", str(tmp_path / "sft.yaml"), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "student" / "model" / "config.json").exists()


def test_missing_model_dir(tmp_path, capsys):
    assert main(["serve-teacher", str(tmp_path / "nope")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_gsm8k_recipe_runs_with_a_tiny_model(served, tmp_path):
    """The shipped GSM8K recipe, pointed at a tiny served model: it runs end to end on the
    real data (the tiny model is never right, so every sample is rejected)."""
    url, _ = served
    recipe = ROOT / "recipes" / "blackbox" / "gsm8k_generate.yaml"
    over = [
        f"teacher.base_url={url}",
        "teacher.model=tiny",
        "prompts.limit=3",
        "sampling.max_tokens=8",
    ]
    out = tmp_path / "g"
    assert main(["run", str(recipe), "--out", str(out), *over]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["done"] == 3 and s["samples"] == 12 and s["rejection_rate"] == 1.0
    # results.jsonl is append-only in completion order (requests run concurrently): look
    # rows up by id, not by position.
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["0", "1", "2"]
    assert rows["0"]["prompt"].startswith("Natalia sold clips")  # GSM8K train row 0
    assert rows["0"]["samples"][0]["verdict"]["expected"] == "72"


def test_api_logprobs_become_a_topk_store(served, teacher_dir, tmp_path):
    """dk generate's captured top_logprobs → a top-k + tail store that matches the
    served model's own log-probabilities, and that the sparse loss reads."""
    import torch

    from darkknowledge.blackbox.logprob_store import logprobs_to_store
    from darkknowledge.errors import DKError
    from darkknowledge.hf.io import load_model, load_tokenizer
    from darkknowledge.losses import sparse_forward_kl
    from darkknowledge.store import open_store

    _generate(served[0], tmp_path, problems(3, 2), "chat", n=2, max_tokens=12, top=5)
    tok = load_tokenizer(teacher_dir)
    store = logprobs_to_store(tmp_path / "o" / "results.jsonl", tmp_path / "s", tok, dtype="fp16")
    assert store.k == 5 and len(store) == 6 and store.tail_log_prior is None
    sig = store.get(torch.arange(6))
    # the stored top-5 are the served model's top-5 at each sampled position
    model = load_model(teacher_dir, "AutoModelForCausalLM").eval()
    first = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    sample = first["samples"][0]
    text = served[1].chat_prompt([{"role": "user", "content": first["prompt"]}])
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    resp = [tok.encode(t["token"], add_special_tokens=False)[0]
            for t in sample["logprobs"]["content"]]  # fmt: skip
    with torch.no_grad():
        full = torch.tensor([list(prompt_ids) + resp])
        lp = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1 : -1].float(), -1)
    want_lp, want_ids = lp.topk(5, -1)
    n = len(resp)
    assert torch.equal(sig.topk_ids[0, :n], want_ids)
    assert torch.allclose(sig.topk_logprobs[0, :n], want_lp, atol=2e-3)
    assert torch.allclose(sig.tail_mass[0, :n], 1 - want_lp.exp().sum(-1), atol=2e-3)
    assert sig.mask[0, :n].all() and not sig.mask[0, n:].any()
    loss = sparse_forward_kl(torch.zeros(6, sig.topk_ids.shape[1], len(tok)),
                             sig.topk_ids, sig.topk_logprobs, sig.tail_mass, mask=sig.mask)  # fmt: skip
    assert torch.isfinite(loss) and loss > 0
    # the same from the command line (q8, correct samples only may be none: all here)
    assert main(["store", "from-api", str(tmp_path / "o" / "results.jsonl"), "--tokenizer",
                 str(teacher_dir), "--out", str(tmp_path / "s3")]) == 0  # fmt: skip
    assert open_store(tmp_path / "s3").k == 5
    # a tokenizer that splits the teacher's tokens is refused with one line
    with pytest.raises(DKError, match="not one"):
        logprobs_to_store(tmp_path / "o" / "results.jsonl", tmp_path / "s2", _SplitTok(tok))


class _SplitTok:
    """A tokenizer that encodes every string as two tokens."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, s, add_special_tokens=False):
        return [0, 0]

    def __len__(self):
        return len(self.tok)
