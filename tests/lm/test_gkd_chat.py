"""On-policy distillation (GKD) on chat rows: the student answers the rows' prompts, the
teacher scores every sampled token. Prompts of different lengths are sampled together,
left-padded; the response ends at the first end-of-sequence token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from darkknowledge.blackbox.chains import write_splits
from darkknowledge.errors import DKError
from darkknowledge.families import validate_family
from darkknowledge.hf.io import build_tiny, load_tokenizer
from darkknowledge.lm import pipeline as P
from darkknowledge.lm.data import IGNORE

LLAMA = {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 128}  # fmt: skip
GPT2 = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 128}


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chains")
    write_splits(d, sizes={"teacher_train": 40, "distill": 40, "dev": 8, "test": 8})
    return d


@pytest.mark.parametrize("kind, cfg", [("tiny-llama", LLAMA), ("tiny-gpt2", GPT2)])
def test_left_padded_sampling_is_each_prompt_alone(chains, kind, cfg):
    tok = load_tokenizer(chains / "tokenizer")
    model = build_tiny(kind, "AutoModelForCausalLM", seed=0, vocab_size=len(tok), **cfg)
    prompts = [tok.encode(t) for t in ("Q: 12 +3\nA:", "Q: 417 -25 *3 +11\nA:", "Q: 9\nA:")]
    assert len({len(p) for p in prompts}) == 3
    stops = P.stop_ids(model, tok)
    # near-greedy: the same tokens whether a prompt is alone or beside longer ones
    together = P.sample_responses(model, prompts, 20, 1e-6, 0, stops)
    alone = [P.sample_responses(model, [p], 20, 1e-6, 0, stops)[0] for p in prompts]
    assert together == alone
    assert all(0 < len(r) <= 20 for r in together)
    assert all(i not in stops for r in together for i in r[:-1])  # cut at the first stop
    # sampled at temperature 1 with one seed: reproducible, and not the greedy answers
    a = P.sample_responses(model, prompts, 20, 1.0, 3, stops)
    assert a == P.sample_responses(model, prompts, 20, 1.0, 3, stops) and a != together
    # within the model's 128 positions: a long prompt's response is cut there, a prompt
    # that fills them is refused with one line
    long = prompts[0] * 10
    assert 108 < len(long) < 128
    assert len(P.sample_responses(model, [long], 20, 1.0, 0, [-1])[0]) == 128 - len(long)
    with pytest.raises(DKError, match="no room"):
        P.sample_responses(model, [long * 2], 20, 1.0, 0, stops)


def test_gkd_on_chat_rows_trains_on_the_students_answers(chains, tmp_path, monkeypatch):
    tok = chains / "tokenizer"
    recipe = {
        "family": "causal_lm",
        "name": "gkd_chat",
        "data": {"kind": "chat", "train": str(chains / "distill.jsonl"),
                 "val": str(chains / "dev.jsonl"), "max_length": 128},
        "tokenizer": {"kind": "path", "path": str(tok)},
        "teacher": {"model": {"tiny": "tiny-llama", "config": LLAMA},
                    "train": {"steps": 40, "batch_size": 8, "warmup": 1, "lr": 1.0e-2}},
        "student": {"model": {"tiny": "tiny-llama", "config": LLAMA}},
        "train": {"steps": 4, "batch_size": 4, "warmup": 1, "eval_every": 4,
                  "checkpoint_every": 2, "log_every": 1},
        "distill": {"mode": "gkd", "lmbda": 1.0, "gen_tokens": 24,
                    "loss": {"kind": "reverse_kl"}},
    }  # fmt: skip
    seen = []
    real = P.LMTask._step_batches

    def spy(self, step):
        data, _ = self.data.batches(self.cfg.seed, step, self.cfg.batch_size, self.cfg.grad_accum)
        out, on = real(self, step)
        if self.teacher is not None:  # the student's steps (the teacher trains first)
            seen.append((data, out, on))
        return out, on

    monkeypatch.setattr(P.LMTask, "_step_batches", spy)
    _, rec = validate_family(recipe)
    P.run_lm_recipe(rec, tmp_path / "g")
    assert len(seen) == 4 and all(on for _, _, on in seen)  # λ = 1: every step on-policy
    eos = load_tokenizer(tok).eos_token_id
    for data, out, _ in seen:
        for (d, _), (s, t) in zip(data, out, strict=True):
            # the teacher reads its own rendering of the prompt + the same sampled tokens
            assert torch.equal(t.labels[t.valid], s.labels[s.valid])
            for i in range(d.input_ids.shape[0]):
                p = int(d.valid[i].long().argmax()) + 1  # the row's prompt tokens
                assert torch.equal(s.input_ids[i, :p], d.input_ids[i, :p])
                n = int(s.valid[i].sum())  # the sampled response: labelled, nothing else
                resp = s.labels[i, p - 1 : p - 1 + n]
                assert bool((resp != IGNORE).all()) and bool((s.labels[i, : p - 1] == IGNORE).all())
                assert torch.equal(s.input_ids[i, p : p + n - 1], resp[:-1])
                assert eos not in resp[:-1].tolist()
    # the responses are the student's, not the data's
    assert any(
        not torch.equal(s.labels[s.valid], d.labels[d.valid])
        for data, out, _ in seen for (d, _), (s, _) in zip(data, out, strict=True)
    )  # fmt: skip
    res = json.loads((tmp_path / "g" / "student" / "result.json").read_text())
    assert res["on_policy_steps"] == 4
    logged = [json.loads(x) for x in (tmp_path / "g" / "student" / "metrics.jsonl").open()]
    kd = [r["loss/kd"] for r in logged if "loss/kd" in r]
    assert len(kd) == 4 and all(v > 1e-3 for v in kd)  # reverse KL of two different models


def test_served_teacher_recipe_is_checked_before_training(chains, tmp_path, capsys):
    """teacher kind api: the modes it can serve, its temperature, and an endpoint that
    does not answer, each one line and exit status 2 before any step."""
    from darkknowledge.cli import main

    base = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(chains / "distill.jsonl"),
                 "val": str(chains / "dev.jsonl"), "max_length": 128},
        "tokenizer": {"kind": "path", "path": str(chains / "tokenizer")},
        "teacher": {"kind": "api", "base_url": "http://127.0.0.1:9/v1", "model": "t",
                    "client": {"max_attempts": 1, "timeout_s": 2}},
        "student": {"model": {"tiny": "tiny-llama", "config": LLAMA}},
        "train": {"steps": 2, "batch_size": 2},
        "distill": {"mode": "gkd", "loss": {"kind": "reverse_kl"}},
    }  # fmt: skip
    for over, msg in (
        ({"mode": "seqkd"}, "distill.mode token or gkd, not 'seqkd'"),
        ({"loss": {"kind": "reverse_kl", "temperature": 2.0}}, "at temperature 1"),
    ):
        with pytest.raises(DKError, match=msg):
            validate_family({**base, "distill": {**base["distill"], **over}})
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps(base))
    assert main(["run", str(rf), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher unreachable" in err[0], err
    assert not (tmp_path / "o" / "student").exists()
