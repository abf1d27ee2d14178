"""The reasoning chain on the shipped GSM8K recipe, as a user runs it: `dk serve-teacher`
(a tiny local teacher over GPT-2's tokenizer, in its own process) → `dk generate`
(`recipes/blackbox/gsm8k_generate.yaml`, top log-probs, every sample kept: the tiny
teacher is never right) → `dk store from-api` → `dk run` (a causal_lm student on
`sft.jsonl` joined to the store by key) → `dk eval` on GSM8K's test problems.

Each stage that writes is SIGKILLed once at a named point (``DK_KILL_AT``) and run again:
it ends with the bytes of an uninterrupted run. Plumbing only: the numbers mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
GPT2_TOK = SHARED / "tokenizers" / "gpt2"
RECIPE = ROOT / "recipes" / "blackbox" / "gsm8k_generate.yaml"
DK = [sys.executable, "-m", "darkknowledge"]

pytestmark = pytest.mark.skipif(
    not (GPT2_TOK.exists() and (SHARED / "gsm8k" / "test.jsonl").exists()),
    reason="shared GSM8K / GPT-2 tokenizer not present",
)


def _teacher(d: Path) -> Path:
    from darkknowledge.hf.io import build_tiny, load_tokenizer, save_pretrained

    tok = load_tokenizer(GPT2_TOK)
    model = build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=0, vocab_size=len(tok),
                       n_embd=16, n_layer=1, n_head=2, n_positions=512)  # fmt: skip
    return save_pretrained(model, d, tok)


def _killed(args: list[str], at: str, cwd: Path) -> None:
    """Run a dk command in its own process that SIGKILLs itself at ``at``."""
    env = dict(os.environ, DK_KILL_AT=at)
    p = subprocess.run([*DK, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])


def _bytes(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def _results(folder: Path) -> list[dict]:
    """results.jsonl rows by prompt id, without the per-run fields (cache hits)."""
    rows = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("cached", None)
    return sorted(rows, key=lambda r: r["id"])


def test_gsm8k_chain_end_to_end_and_every_stage_resumes_after_sigkill(
    tmp_path, capsys, teacher_process
):
    teacher = _teacher(tmp_path / "teacher")
    with teacher_process(teacher, "tiny") as url:
        # 1. generate: the shipped recipe, pointed at the local teacher
        over = [f"teacher.base_url={url}", "teacher.model=tiny", "prompts.limit=4",
                "sampling.n=2", "sampling.max_tokens=12", "sampling.top_logprobs=5",
                "select.keep=all", "client.concurrency=1"]  # fmt: skip
        gen = ["generate", str(RECIPE), *over, "-q"]
        assert main([*gen, "--out", str(tmp_path / "gen")]) == 0
        _killed([*gen, "--out", str(tmp_path / "gen_k")], "answer@2", tmp_path)
        assert len(_results(tmp_path / "gen_k")) == 2  # killed after its second prompt
        assert main([*gen, "--out", str(tmp_path / "gen_k")]) == 0
        assert _results(tmp_path / "gen_k") == _results(tmp_path / "gen")
        sft = (tmp_path / "gen" / "sft.jsonl").read_text()
        assert (tmp_path / "gen_k" / "sft.jsonl").read_text() == sft
        assert len(sft.splitlines()) == 8  # 4 problems × 2 samples, all kept

    # 2. the teacher's top-5 log-probs on its samples → a store keyed by prompt and sample
    api = ["store", "from-api", str(tmp_path / "gen" / "results.jsonl"),
           "--tokenizer", str(teacher), "--dtype", "fp16"]  # fmt: skip
    assert main([*api, "--out", str(tmp_path / "store")]) == 0
    _killed([*api, "--out", str(tmp_path / "store_k")], "shard@1", tmp_path)
    assert not json.loads((tmp_path / "store_k" / "manifest.json").read_text()).get("complete")
    assert main([*api, "--out", str(tmp_path / "store_k")]) == 0
    files = ["manifest.json", "inputs.safetensors", "shards/shard-00000.safetensors"]
    assert _bytes(tmp_path / "store_k", files) == _bytes(tmp_path / "store", files)

    # 3. a student on sft.jsonl joined to the store (KD where the tokens agree)
    rec = {
        "family": "causal_lm", "name": "gsm8k-chain", "seed": 0,
        "data": {"kind": "chat", "train": str(tmp_path / "gen" / "sft.jsonl"),
                 "max_length": 192},
        "tokenizer": {"kind": "path", "path": str(teacher)},
        "teacher": {"kind": "store", "path": str(tmp_path / "store")},
        "student": {"model": {"tiny": "tiny-gpt2",
                              "config": {"n_layer": 1, "n_head": 2, "n_embd": 16,
                                         "n_positions": 256}}},
        "train": {"steps": 6, "batch_size": 4, "warmup": 1, "eval_every": 6,
                  "checkpoint_every": 2, "log_every": 1},
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
    }  # fmt: skip
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(rec))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "-q"]) == 0
    _killed(["run", str(path), "--out", str(tmp_path / "run_k"), "-q"], "step@3", tmp_path)
    assert main(["run", str(path), "--out", str(tmp_path / "run_k"), "--resume", "-q"]) == 0
    weights = ["student/model/model.safetensors"]
    assert _bytes(tmp_path / "run_k", weights) == _bytes(tmp_path / "run", weights)
    metrics = [json.loads(x) for x in
               (tmp_path / "run" / "student" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    kd = [m["loss/kd"] for m in metrics if "loss/kd" in m]
    assert len(kd) == 6 and min(kd) > 0  # the store's signal reached every step

    # 4. dk eval on GSM8K's test problems (the verifier reads '#### <number>')
    capsys.readouterr()
    ev = ["eval", str(tmp_path / "run" / "student" / "model"),
          "--data", str(SHARED / "gsm8k" / "test.jsonl"), "--limit", "3", "--k", "2",
          "--max-new-tokens", "8", "--template", "{prompt}\nSolve it step by step."]  # fmt: skip
    assert main(ev) == 0
    first = capsys.readouterr().out
    assert main(ev) == 0
    assert capsys.readouterr().out == first and "pass@1" in first
    # killed after scoring, before writing: no result file; the rerun writes the bytes of
    # an uninterrupted run
    out_k = tmp_path / "eval_k.json"
    _killed([*ev, "--out", str(out_k)], "eval_model@1", tmp_path)
    assert not out_k.exists()
    assert main([*ev, "--out", str(out_k)]) == 0
    assert out_k.read_bytes() == (tmp_path / "run" / "student" / "model" / "eval.json").read_bytes()
