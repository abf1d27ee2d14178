"""Every family, killed by a real SIGKILL at a seeded list of points and resumed with
``dk run --resume`` until it finishes, ends with weights ``torch.equal`` to an
uninterrupted run's. Points (darkknowledge.faults): mid-way through the teacher's
training, after the teacher's model is saved but before its result record, right after
a student checkpoint, between checkpoints (work lost and redone), and after the
student's model is saved but before its result record."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"
SST2 = SHARED / "sst2"


def _dk(*args) -> list[str]:
    return [sys.executable, "-m", "darkknowledge.cli", *args]


def _run(recipe: Path, out: Path, resume: bool, kill: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "DK_KILL_AT"}
    env["OMP_NUM_THREADS"] = "1"
    if kill:
        env["DK_KILL_AT"] = kill
    args = _dk("run", str(recipe), "--out", str(out), *(["--resume"] if resume else []))
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def _plan(seed: int, teacher_steps: int | None, student_ckpts: int, ckpt_every: int) -> list[str]:
    """The seeded kill points of one family's run, in the order they are met."""
    rng = random.Random(seed)
    plan = []
    if teacher_steps:
        plan += [f"step@{rng.randint(1, teacher_steps - 1)}", "saved@1"]
    plan.append(f"checkpoint@{rng.randint(1, student_ckpts)}")
    plan.append(f"step@{rng.randint(1, ckpt_every - 1)}")  # between two checkpoints
    plan.append("saved@1")
    return plan


def _kill_and_resume(
    recipe: Path, tmp: Path, plan: list[str], weights: str, metrics: str | None = None
) -> None:
    clean, killed = tmp / "clean", tmp / "killed"
    r = _run(recipe, clean, resume=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, point in enumerate(plan):
        r = _run(recipe, killed, resume=i > 0, kill=point)
        # -9: the process reached the point and was killed there (not a finished run)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
    r = _run(recipe, killed, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(clean / weights)), load_file(str(killed / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = killed / (metrics or f"{Path(weights).parts[0]}/metrics.jsonl")
    if metrics.exists():  # the log was cut back at each resume: no step twice
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        steps = [r["step"] for r in recs if "lr" in r]
        assert steps == sorted(set(steps))


def test_classify(tmp_path: Path):
    # dropout and jitter: the result depends on both RNG streams being restored
    recipe = {
        "data": {"name": "digits"},
        "teacher": {
            "kind": "module",
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"epochs": 2, "batch_size": 64, "checkpoint_every": 7},
        },
        "student": {"model": {"name": "mlp", "hidden": [24], "dropout": 0.2}},
        "loss": {"hinton_kd": {"temperature": 3.0, "alpha": 0.7}},
        "train": {
            "epochs": 3,
            "batch_size": 32,
            "augment": "jitter",
            "jitter_px": 1,
            "schedule": "one_cycle",
            "checkpoint_every": 9,
            "seed": 3,
        },
        "eval": {"latency": False},
    }
    f = tmp_path / "classify.yaml"
    f.write_text(yaml.safe_dump(recipe))
    # digits: 1,131 training examples → 18 teacher steps/epoch, 36 student steps/epoch
    plan = _plan(11, teacher_steps=36, student_ckpts=11, ckpt_every=9)
    _kill_and_resume(f, tmp_path, plan, "student/model.safetensors")


@pytest.mark.skipif(not SST2.exists(), reason="SST-2 not present")
def test_text(tmp_path: Path):
    # a tiny BERT teacher fine-tuned in the run, then a layer-copy student with soft,
    # hard and cosine terms (the store is labelled between the two); BERT's dropout
    # makes the result depend on the restored RNG streams
    fast = {"epochs": 2, "batch_size": 16, "lr": 1.0e-3, "checkpoint_every": 3}
    r = {
        "family": "text",
        "data": {"path": str(SST2), "max_length": 16, "train_subset": 64,
                 "dev_subset": 16, "test_subset": 16},
        "teacher": {"source": "tiny:tiny-bert", "finetune": fast,
                    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}},
        "student": {"layers": [0, 2]},
        "loss": {"soft": {"weight": 1.0}, "hard": {"weight": 1.0}, "cosine": {"pool": "mean"}},
        "train": fast,
        "threads": 1,
        "eval": {"latency": False},
    }  # fmt: skip
    f = tmp_path / "text.yaml"
    f.write_text(yaml.safe_dump(r))
    # 64 examples / 16 = 4 steps an epoch, 8 steps; checkpoints at 3 and 6
    plan = _plan(15, teacher_steps=8, student_ckpts=2, ckpt_every=3)
    seed_dir = "students/distilled/seed0"
    _kill_and_resume(f, tmp_path, plan, f"{seed_dir}/model/model.safetensors",
                     f"{seed_dir}/metrics.jsonl")  # fmt: skip


def _lm_recipe(tmp: Path, **over) -> Path:
    text = tmp / "shakes.txt"
    text.write_text(SHAKES.read_text()[:20_000])
    fast = {"steps": 8, "batch_size": 4, "warmup": 2, "eval_every": 4, "checkpoint_every": 3}
    r = {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 4},
        "tokenizer": {"kind": "char"},
        "teacher": {
            "model": {"tiny": "tiny-gpt2", "config": {"n_layer": 2, "n_head": 2, "n_embd": 32}},
            "train": fast,
        },
        # dropout: the student's RNG stream must be restored on resume
        "student": {
            "model": {
                "tiny": "tiny-gpt2",
                "config": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                "dropout": 0.1,
            }
        },
        "train": fast,
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
    } | over
    f = tmp / "lm.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


@pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")
def test_causal_lm_token_kd(tmp_path: Path):
    f = _lm_recipe(tmp_path)
    plan = _plan(12, teacher_steps=8, student_ckpts=2, ckpt_every=3)
    _kill_and_resume(f, tmp_path, plan, "student/model/model.safetensors")


@pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")
def test_causal_lm_gkd_with_sampling(tmp_path: Path):
    # λ = 1: every step samples continuations from the student
    d = {"mode": "gkd", "lmbda": 1.0, "prompt_tokens": 4, "gen_tokens": 8,
         "loss": {"kind": "jsd", "beta": 0.5}}  # fmt: skip
    f = _lm_recipe(tmp_path, distill=d)
    plan = _plan(13, teacher_steps=8, student_ckpts=2, ckpt_every=3)
    _kill_and_resume(f, tmp_path, plan, "student/model/model.safetensors")
    res = json.loads((tmp_path / "killed" / "student" / "result.json").read_text())
    assert res["on_policy_steps"] == 8  # counted across the kills, every step sampled


def _chat_rows(tmp: Path):
    """24 prompt/response rows in a JSONL file and a character tokenizer with a chat
    template for them."""
    from darkknowledge.hf import io as hfio

    rows = [
        {"prompt": f"What is {a}+{b}?", "response": f"{a + b}."} for a in range(6) for b in range(4)
    ]
    f = tmp / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = hfio.char_tokenizer("".join(r["prompt"] + r["response"] for r in rows) + "<>usertan\n")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return f, tok


def test_chat_sft(tmp_path: Path):
    from darkknowledge.hf import io as hfio

    f, tok = _chat_rows(tmp_path)
    m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(tok), n_layer=1,
                        n_embd=16, n_head=2, resid_pdrop=0.1)  # fmt: skip
    hfio.save_pretrained(m, tmp_path / "base", tok)
    r = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(f), "val_fraction": 0.2, "max_length": 48},
        "student": {"model": {"path": str(tmp_path / "base")}},
        "train": {"steps": 8, "batch_size": 4, "warmup": 2, "eval_every": 4, "checkpoint_every": 3},
        "distill": {"mode": "none"},
    }
    rf = tmp_path / "sft.yaml"
    rf.write_text(yaml.safe_dump(r))
    plan = _plan(14, teacher_steps=None, student_ckpts=2, ckpt_every=3)
    _kill_and_resume(rf, tmp_path, plan, "student/model/model.safetensors")


def test_chat_gkd_on_policy(tmp_path: Path):
    """On-policy distillation on chat rows (the reasoning experiment's on-policy stage):
    every step samples the student's answers to the rows' prompts, the teacher scores
    them; killed and resumed, the samples and weights are those of an unbroken run."""
    from darkknowledge.hf import io as hfio

    f, tok = _chat_rows(tmp_path)
    for name, seed in (("student", 0), ("teacher", 1)):
        m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=seed, vocab_size=len(tok),
                            n_layer=1, n_embd=16, n_head=2, resid_pdrop=0.1)  # fmt: skip
        hfio.save_pretrained(m, tmp_path / name, tok)
    r = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(f), "val_fraction": 0.2, "max_length": 48},
        "teacher": {"model": {"path": str(tmp_path / "teacher")}},
        "student": {"model": {"path": str(tmp_path / "student")}},
        "train": {"steps": 8, "batch_size": 4, "warmup": 2, "eval_every": 4, "checkpoint_every": 3},
        "distill": {"mode": "gkd", "lmbda": 1.0, "gen_tokens": 6, "loss": {"kind": "reverse_kl"}},
    }
    rf = tmp_path / "gkd.yaml"
    rf.write_text(yaml.safe_dump(r))
    # killed while writing the first checkpoint, then between two checkpoints
    plan = ["checkpoint@1", "step@2"]
    _kill_and_resume(rf, tmp_path, plan, "student/model/model.safetensors")
    res = json.loads((tmp_path / "killed" / "student" / "result.json").read_text())
    assert res["on_policy_steps"] == 8


def test_chat_gkd_served_teacher(tmp_path: Path, teacher_process):
    """On-policy distillation with the teacher served (`dk serve-teacher` in its own
    process) and every sampled token scored through completions echo: the scores are the
    in-process teacher's top K, the loss its top-K bucket loss; a tokenizer that differs
    is refused; killed and resumed, the weights are those of an unbroken run."""
    from darkknowledge.blackbox.echo import EchoScorer, batch_target
    from darkknowledge.errors import DKError
    from darkknowledge.hf import io as hfio
    from darkknowledge.lm.data import IGNORE, LMBatch
    from darkknowledge.lm.losses import TokenLoss, chunked_head_loss

    f, tok = _chat_rows(tmp_path)
    for name, seed in (("student", 0), ("teacher", 1)):
        m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=seed, vocab_size=len(tok),
                            n_layer=1, n_embd=16, n_head=2, resid_pdrop=0.1)  # fmt: skip
        hfio.save_pretrained(m, tmp_path / name, tok)
    k = 8
    with teacher_process(tmp_path / "teacher", "tiny") as url:
        # 1. the served scores at a right-padded batch's labelled positions
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, len(tok), (3, 12), generator=g)
        am = torch.ones_like(x)
        am[1, 7:] = 0  # a shorter row, padded
        y = torch.cat([x[:, 1:], torch.randint(0, len(tok), (3, 1), generator=g)], 1)
        y[:, :4] = IGNORE  # the prompt
        y[am == 0] = IGNORE
        b = LMBatch(x, am, y)
        ids, lps, tail = batch_target(EchoScorer([url], "tiny", tok, k), x, y, b.valid)
        teacher = hfio.load_model(tmp_path / "teacher", "AutoModelForCausalLM").eval()
        with torch.no_grad():
            t_lp = torch.log_softmax(teacher(input_ids=x, attention_mask=am).logits, -1)
        want_lp, want_ids = t_lp[b.valid].topk(k, -1)
        assert ids.shape == (int(b.valid.sum()), k) == (8 + 3 + 8, k)
        assert torch.equal(ids, want_ids)
        assert torch.allclose(lps, want_lp, atol=1e-5)
        assert torch.allclose(tail, 1 - want_lp.exp().sum(-1), atol=1e-5)
        assert bool((tail > 0).all())
        student = hfio.load_model(tmp_path / "student", "AutoModelForCausalLM")
        h = student.transformer(input_ids=x, attention_mask=am).last_hidden_state[b.valid]
        spec = TokenLoss("reverse_kl", 1.0, kd_weight=1.0, ce_weight=0.0)
        head = (student.lm_head.weight, None)
        served = chunked_head_loss(h, *head, spec, teacher=lambda lo, hi: (
            ids[lo:hi], lps[lo:hi], tail[lo:hi]), normalizer=len(h))  # fmt: skip
        want_tail = 1 - want_lp.exp().sum(-1)
        local = chunked_head_loss(h, *head, spec, teacher=lambda lo, hi: (
            want_ids[lo:hi], want_lp[lo:hi], want_tail[lo:hi]), normalizer=len(h))  # fmt: skip
        served, local = float(served.detach()), float(local.detach())
        assert served > 1e-3 and abs(served - local) < 1e-5
        # a student whose tokenizer is not the served model's: one line, before any step
        other = hfio.char_tokenizer("".join(reversed(sorted(set(tok.decode(range(len(tok))))))))
        # (its ids past the served vocabulary: the server's own 400)
        with pytest.raises(DKError, match=r"not in the vocabulary"):
            EchoScorer([url], "tiny", other, k).probe()
        # as many tokens, other ids: the echoed texts differ (the answers by id cannot tell)
        chars = "".join(tok.decode([i]) for i in range(2, len(tok)))
        same_size = hfio.char_tokenizer(chars.replace("a", "~"))
        assert len(same_size) == len(tok)
        with pytest.raises(DKError, match="must use the student's tokenizer"):
            EchoScorer([url], "tiny", same_size, k).probe()

        # 2. dk run with the served teacher, killed and resumed
        r = {
            "family": "causal_lm",
            "data": {"kind": "chat", "train": str(f), "val_fraction": 0.2, "max_length": 48},
            "teacher": {"kind": "api", "base_url": url, "model": "tiny", "top_logprobs": k},
            "student": {"model": {"path": str(tmp_path / "student")}},
            "train": {"steps": 6, "batch_size": 4, "warmup": 2, "eval_every": 3,
                      "checkpoint_every": 3, "log_every": 1},
            "distill": {"mode": "gkd", "lmbda": 1.0, "gen_tokens": 6,
                        "loss": {"kind": "reverse_kl"}},
        }  # fmt: skip
        rf = tmp_path / "served.yaml"
        rf.write_text(yaml.safe_dump(r))
        # killed at step 5, between the checkpoints of steps 3 and 6
        _kill_and_resume(rf, tmp_path, ["step@5"], "student/model/model.safetensors")
    clean = tmp_path / "clean"
    res = json.loads((clean / "student" / "result.json").read_text())
    assert res["on_policy_steps"] == 6 and res["teacher_requests"] == 6 * 4
    report = json.loads((clean / "report.json").read_text())
    assert report["teacher"] == {"api": [url], "model": "tiny", "top_logprobs": k}
    kd = [json.loads(x).get("loss/kd") for x in (clean / "student" / "metrics.jsonl").open()]
    kd = [v for v in kd if v is not None]
    assert len(kd) == 6 and all(v > 1e-4 for v in kd)  # two different models
