"""The embedded black-box recipe, end to end on CPU in minutes:

1. synthetic arithmetic word problems with worked solutions (:mod:`.synthetic`);
2. a small char-level teacher trained by this tool on the worked solutions, stopped once
   it is right on 30–80% of dev problems (so that verification matters);
3. the teacher served over real HTTP by ``dk serve-teacher`` (a subprocess);
4. ``dk generate``: n samples per prompt, verified by the ``gsm8k`` verifier;
5. smaller students fine-tuned on (a) the verified traces, (b) as many unverified traces,
   (c) all unverified traces, (d) final answers only; pass@1 and maj@k of the teacher and
   every student on held-out problems, over several seeds.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from ..errors import DKError
from .generate import read_results, run_generate
from .recipe import GenerateRecipe
from .serve import start_server
from .sft import evaluate, train_sft
from .synthetic import problems, prompt_of
from .verifiers import build_verifier, final_answer

VARIANTS = {
    "a_verified": "verified traces (rejection sampling)",
    "b_unverified_same_n": "unverified traces, as many as (a)",
    "c_unverified_all": "all unverified traces",
    "d_final_answer_only": "final answers only (no reasoning)",
}

# Sized for a shared 2-core CPU (about 0.2 s per teacher step there).
DEFAULTS = dict(
    n_train=4000,
    n_dev=100,
    n_distill=400,
    n_test=150,
    samples=4,
    temperature=0.6,
    teacher=dict(n_embd=64, n_layer=2, n_head=4),
    student=dict(n_embd=32, n_layer=2, n_head=4),
    teacher_max_steps=3000,
    teacher_target=(0.4, 0.8),  # stop training once dev pass@1 reaches 0.4
    student_steps=700,
    eval_k=4,
    batch_size=32,
    max_new_tokens=40,
)


def _special(tok) -> dict:
    """Vocabulary size and special ids of a model built for ``tok``."""
    e = tok.eos_token_id
    return dict(vocab_size=len(tok), bos_token_id=e, eos_token_id=e, pad_token_id=e)


def _jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _log(out: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def train_teacher(out: Path, cfg: dict, train, dev, verify):
    from ..hf.io import build_tiny, char_tokenizer, save_pretrained

    tdir = out / "teacher"
    if (tdir / "config.json").exists():
        return tdir
    text = "".join(prompt_of(r["question"]) + " " + r["answer"] for r in train) + "0123456789"
    tok = char_tokenizer(text)
    model = build_tiny(
        "tiny-gpt2", "AutoModelForCausalLM", seed=0, **_special(tok), **cfg["teacher"]
    )
    pairs = [(prompt_of(r["question"]), " " + r["answer"]) for r in train]
    dev_rows = [{"prompt": prompt_of(r["question"]), "reference": r["answer"]} for r in dev]
    lo, hi = cfg["teacher_target"]
    hist = []

    def check(step: int) -> bool:
        m = evaluate(
            model,
            tok,
            dev_rows,
            verify,
            k=2,
            temperature=cfg["temperature"],
            max_new_tokens=cfg["max_new_tokens"],
        )
        hist.append({"step": step, **m})
        _log(out, f"teacher step {step}: dev pass@1 {m['pass@1']:.3f}")
        return m["pass@1"] >= lo

    train_sft(
        model,
        tok,
        pairs,
        steps=cfg["teacher_max_steps"],
        batch_size=cfg["batch_size"],
        lr=3e-3,
        seed=0,
        check=check,
        check_every=250,
    )
    if not hist or not (0.3 <= hist[-1]["pass@1"] <= hi):
        _log(
            out,
            f"note: teacher dev pass@1 {hist[-1]['pass@1'] if hist else 'n/a'} outside the 30–80% band",
        )
    save_pretrained(model, tdir, tok)
    (out / "teacher_training.json").write_text(json.dumps(hist, indent=1))
    return tdir


def serve(tdir: Path, out: Path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (out / "serve-teacher.log").unlink(missing_ok=True)  # this run's server only
    return start_server(tdir, out / "serve-teacher.log", name="arith-teacher", env=env)


def variant_pairs(results: list[dict], variant: str, seed: int) -> list[tuple[str, str]]:
    every = [(r["prompt"], s) for r in results for s in r["samples"]]
    good = [(p, s) for p, s in every if s["verdict"]["correct"]]
    if variant == "a_verified":
        chosen = good
    elif variant == "b_unverified_same_n":
        chosen = random.Random(1000 + seed).sample(every, len(good))
    elif variant == "c_unverified_all":
        chosen = every
    elif variant == "d_final_answer_only":
        return [(p, f" #### {final_answer(s['text'])}") for p, s in good]
    else:
        raise DKError(f"unknown variant {variant!r}")
    return [(p, s["text"]) for p, s in chosen]


def run_experiment(out: Path, seeds: int = 3, **over) -> dict:
    from ..hf.io import build_tiny, load_model, load_tokenizer

    torch.set_num_threads(1)
    cfg = {**DEFAULTS, **over}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verify = build_verifier("gsm8k")
    allp = problems(cfg["n_train"] + cfg["n_dev"] + cfg["n_distill"] + cfg["n_test"], seed=12345)
    i = 0
    parts = {}
    for name in ("train", "dev", "distill", "test"):
        parts[name] = allp[i : i + cfg[f"n_{name}"]]
        i += cfg[f"n_{name}"]
    t0 = time.time()
    tdir = train_teacher(out, cfg, parts["train"], parts["dev"], verify)
    _log(out, f"teacher ready ({time.time() - t0:.0f}s)")
    prompts = _jsonl(out / "distill_prompts.jsonl", parts["distill"])
    rec = GenerateRecipe.model_validate(
        {
            "prompts": {"path": str(prompts), "template": "Q: {question}\nA:"},
            "teacher": {"model": "arith-teacher", "api": "completions"},
            "sampling": {
                "n": cfg["samples"],
                "temperature": cfg["temperature"],
                "max_tokens": cfg["max_new_tokens"],
                "seed": 0,
            },
            "verifier": {"name": "gsm8k"},
            "select": {"keep": "correct"},
            "client": {"concurrency": 4, "timeout_s": 120},
        }
    )
    gen_out = out / "generate"
    proc, url = serve(tdir, out)
    try:
        rec.teacher.base_url = url
        t1 = time.time()
        _log(out, run_generate(rec, gen_out).replace("\n", " | "))
        gen_s = time.time() - t1
    finally:
        proc.terminate()
        proc.wait(10)
    results = list(read_results(gen_out / "results.jsonl").values())
    samples = sum(len(r["samples"]) for r in results)
    correct = sum(s["verdict"]["correct"] for r in results for s in r["samples"])
    tok = load_tokenizer(tdir)
    teacher = load_model(tdir, "AutoModelForCausalLM")
    test_rows = [
        {"prompt": prompt_of(r["question"]), "reference": r["answer"]} for r in parts["test"]
    ]
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if "teacher" not in summary:
        summary["teacher"] = evaluate(
            teacher,
            tok,
            test_rows,
            verify,
            k=cfg["eval_k"],
            temperature=cfg["temperature"],
            max_new_tokens=cfg["max_new_tokens"],
        )
        _log(out, f"teacher test: {summary['teacher']}")
    summary.update(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        generation={
            "prompts": len(results),
            "samples": samples,
            "correct": correct,
            "rejection_rate": 1 - correct / samples,
            "seconds": round(gen_s, 1),
        },
    )
    summary.setdefault("students", {})
    for v in VARIANTS:
        for seed in range(seeds):
            key = f"{v}/seed{seed}"
            if key in summary["students"]:
                continue
            pairs = variant_pairs(results, v, seed)
            student = build_tiny(
                "tiny-gpt2",
                "AutoModelForCausalLM",
                seed=seed,
                **_special(tok),
                **cfg["student"],
            )
            ts = time.time()
            losses = train_sft(
                student,
                tok,
                pairs,
                steps=cfg["student_steps"],
                batch_size=cfg["batch_size"],
                lr=3e-3,
                seed=seed,
            )
            m = evaluate(
                student,
                tok,
                test_rows,
                verify,
                k=cfg["eval_k"],
                temperature=cfg["temperature"],
                max_new_tokens=cfg["max_new_tokens"],
                seed=seed,
            )
            summary["students"][key] = {
                **m,
                "rows": len(pairs),
                "final_loss": losses[-1],
                "seconds": round(time.time() - ts, 1),
            }
            summary["student_params"] = sum(p.numel() for p in student.parameters())
            _log(out, f"{key}: rows {len(pairs)} pass@1 {m['pass@1']:.3f} maj@k {m['maj@k']:.3f}")
            summary_path.write_text(json.dumps(summary, indent=1))
    summary["comparison"] = compare(summary, seeds)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def _ms(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def compare(summary: dict, seeds: int) -> dict:
    agg = {}
    for v in VARIANTS:
        xs = [summary["students"][f"{v}/seed{s}"]["pass@1"] for s in range(seeds)]
        ys = [summary["students"][f"{v}/seed{s}"]["maj@k"] for s in range(seeds)]
        agg[v] = {
            "pass@1": _ms(xs),
            "maj@k": _ms(ys),
            "rows": summary["students"][f"{v}/seed0"]["rows"],
        }
    (ma, sa), (mb, sb) = agg["a_verified"]["pass@1"], agg["b_unverified_same_n"]["pass@1"]
    pooled = math.sqrt((sa**2 + sb**2) / 2)
    return {
        "per_variant": agg,
        "verified_minus_unverified_same_n": ma - mb,
        "pooled_sd": pooled,
        "beats_by_2_pooled_sd": (ma - mb) > 2 * pooled,
    }
