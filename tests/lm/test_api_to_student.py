"""From an API teacher to a student, through the commands a user runs: `dk serve-teacher`
serves a causal LM, `dk generate` samples it with its top log-probs, `dk store from-api`
turns them into a top-k + tail store keyed by prompt id and sample, and `dk run` trains
a `causal_lm` student on the `sft.jsonl` rows joined to that store by key.

The KD student must be closer to the teacher (KL on held-out prompts) than a CE-only
student trained on the same rows, seed and steps: the store's top-5 + tail carry more of
the teacher's distribution than the one sampled token per position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.blackbox.synthetic import problems, prompt_of
from darkknowledge.cli import main
from darkknowledge.hf.io import build_tiny, char_tokenizer, load_model, save_pretrained
from darkknowledge.lm.data import render


def _serving():
    """tests/blackbox/conftest.py's ``serving`` (dk serve-teacher's app on loopback)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "blackbox" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_blackbox_servers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.serving


serving = _serving()

STEPS = 60


def _teacher(d: Path) -> Path:
    """A peaked, context-dependent char-level teacher: a random one-layer GPT-2 whose
    (tied) embeddings are scaled up, so its next-token distributions are far from flat."""
    rows = problems(50, 0)
    tok = char_tokenizer(
        "".join(prompt_of(r["question"]) + r["answer"] for r in rows) + "0123456789"
    )
    model = build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=3, vocab_size=len(tok),
                       n_embd=32, n_positions=256, n_layer=1, n_head=2)  # fmt: skip
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8.0)
    save_pretrained(model, d, tok)
    return d


def _generate(url: str, rows: list[dict], out: Path) -> None:
    prompts = out.parent / f"{out.name}-prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = {
        "prompts": {"path": str(prompts), "template": "Q: {question}\nA:"},
        "teacher": {"base_url": url, "model": "tiny", "api": "completions",
                    "max_top_logprobs": 5},
        "sampling": {"n": 2, "max_tokens": 24, "temperature": 1.0, "seed": 0,
                     "top_logprobs": 5},
        "select": {"keep": "all"},
    }  # fmt: skip
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(rec))
    assert main(["generate", str(out.parent / f"{out.name}.yaml"), "--out", str(out)]) == 0


def _recipe(tmp: Path, teacher_dir: Path, store: Path | None) -> Path:
    rec = {
        "family": "causal_lm",
        "name": "api_kd" if store else "api_ce",
        "seed": 0,
        "data": {"kind": "chat", "train": str(tmp / "gen" / "sft.jsonl"), "max_length": 96},
        "tokenizer": {"kind": "path", "path": str(teacher_dir)},
        "student": {"model": {"tiny": "tiny-gpt2",
                              "config": {"n_layer": 1, "n_head": 2, "n_embd": 32,
                                         "n_positions": 256}}},
        "train": {"steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup": 5,
                  "eval_every": STEPS, "checkpoint_every": STEPS, "log_every": 1},
        "distill": {"mode": "none"},
    }  # fmt: skip
    if store is not None:
        rec["teacher"] = {"kind": "store", "path": str(store)}
        rec["distill"] = {"mode": "token", "loss": {"kind": "forward_kl", "kd_weight": 1.0}}
    path = tmp / f"{rec['name']}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


@torch.no_grad()
def _kl_to_teacher(teacher, student, tok, rows: list[dict]) -> float:
    """Mean KL(teacher ‖ student) per response token over held-out prompt/response rows."""
    total = n = 0.0
    for r in rows:
        ids, n_prompt = render(tok, r["prompt"], r["response"], 10_000)
        x = torch.tensor([ids[:-1]])
        t = torch.log_softmax(teacher(x).logits[0, n_prompt - 1 :].float(), -1)
        s = torch.log_softmax(student(x).logits[0, n_prompt - 1 :].float(), -1)
        total += float((t.exp() * (t - s)).sum())
        n += t.shape[0]
    return total / n


def test_api_teacher_store_trains_a_student_closer_to_the_teacher(tmp_path, capsys):
    teacher_dir = _teacher(tmp_path / "teacher")
    with serving(teacher_dir) as (url, _):
        _generate(url, problems(48, 0), tmp_path / "gen")
        _generate(url, problems(8, 1), tmp_path / "held")
    store = tmp_path / "store"
    assert main(["store", "from-api", str(tmp_path / "gen" / "results.jsonl"),
                 "--tokenizer", str(teacher_dir), "--out", str(store), "--dtype", "fp16"]) == 0  # fmt: skip
    manifest = json.loads((store / "manifest.json").read_text())
    assert len(manifest["keys"]) == 96 and manifest["inputs"]["sha256"]

    runs = {}
    for kind, st in (("kd", store), ("ce", None)):
        out = tmp_path / kind
        assert main(["run", str(_recipe(tmp_path, teacher_dir, st)), "--out", str(out)]) == 0
        runs[kind] = out
    capsys.readouterr()
    rep = json.loads((runs["kd"] / "report.json").read_text())
    # the responses the student renders are the sampled tokens (+ EOS, CE-free here)
    assert rep["teacher"]["signal"] == "topk" and rep["teacher"]["coverage"] > 0.9
    metrics = [json.loads(x) for x in (runs["kd"] / "student" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    kd = [m["loss/kd"] for m in metrics if "loss/kd" in m]
    assert len(kd) == STEPS and min(kd) > 0.01, kd[:5]  # the KD term, every step

    held = [json.loads(x) for x in (tmp_path / "held" / "sft.jsonl").read_text().splitlines()]
    teacher = load_model(teacher_dir, "AutoModelForCausalLM").eval()
    from darkknowledge.hf.io import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    kl = {}
    for k, o in runs.items():
        student = load_model(o / "student" / "model", "AutoModelForCausalLM").eval()
        kl[k] = _kl_to_teacher(teacher, student, tok, held)
    print(f"held-out KL(teacher ‖ student) per token: KD {kl['kd']:.4f}, CE-only {kl['ce']:.4f}")
    assert kl["kd"] < kl["ce"], kl


def test_store_join_refusals(tmp_path, capsys):
    """A chat row whose key the store lacks, and a `dk label` store (no keys) on chat
    data, are each refused with one line."""
    teacher_dir = _teacher(tmp_path / "teacher")
    with serving(teacher_dir) as (url, _):
        _generate(url, problems(4, 0), tmp_path / "gen")
    store = tmp_path / "store"
    assert main(["store", "from-api", str(tmp_path / "gen" / "results.jsonl"),
                 "--tokenizer", str(teacher_dir), "--out", str(store)]) == 0  # fmt: skip
    sft = tmp_path / "gen" / "sft.jsonl"
    recipe = _recipe(tmp_path, teacher_dir, store)
    # the signal doctor joins the rows as dk run does: nothing to refuse here
    capsys.readouterr()
    assert main(["store", "check", str(store), "--against", str(recipe)]) == 0
    assert "refuse:" not in capsys.readouterr().out
    rows = [json.loads(x) for x in sft.read_text().splitlines()]
    rows[0]["id"] = "not-there"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "(id 'not-there', sample 0) is not in the store" in err and "\n" not in err
    assert main(["store", "check", str(store), "--against", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert "refuse: alignment:" in out and "(id 'not-there', sample 0) is not in the store" in out


@pytest.fixture(autouse=True)
def _quiet_hf(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
