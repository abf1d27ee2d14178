"""On-policy distillation (GKD) side by side: darkknowledge vs TRL's GKDTrainer.

Same teacher (the char-level TinyShakespeare teacher trained by bench/lm_seeds.py), same
student architecture and initial weights (2 layers × 64, saved once and loaded by both),
same data (64-character windows of the training text: a 16-character prompt and a
48-character response), λ = 0.5, β = 0.5 (JSD), 48 sampled tokens, batch 12, AdamW
(lr 1e-3 constant, β2 0.99, weight decay 0.1), grad-norm clip 1, the same number of
steps, fp32 on CPU, one thread. Each side runs in its own fresh process; TRL in its own
virtual environment (bench/.venv-peers-trl: torch 2.13.0 + trl). Both students are then
scored by the same function on the same validation blocks.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lm_trl_peer.py --steps 300

Differences that remain (stated in the results): on off-policy steps TRL's loss covers
the 48 response positions of each window, ours every position of a 64-token block of the
same text; TRL draws the on-policy coin with Python's random, we with a seeded generator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_PY = ROOT / "bench/.venv-peers-trl/bin/python"
CACHE = ROOT / "bench/.cache/trl_peer"
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
PROMPT, GEN, BATCH, LR = 16, 48, 12, 1e-3


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the process that started it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(teacher: Path, n_examples: int) -> dict:
    """Student init folder, JSONL of prompt/response windows, the recipe for our side."""
    import torch

    from darkknowledge.families import validate_family
    from darkknowledge.hf import io as hfio
    from darkknowledge.lm import pipeline as P
    from darkknowledge.recipe_io import read_recipe

    CACHE.mkdir(parents=True, exist_ok=True)
    raw = read_recipe(ROOT / "recipes/lm/shakespeare_char_gkd.yaml")  # extends: resolved
    _, rec = validate_family(raw, base_dir=ROOT / "recipes/lm")
    s_tok, _, text = P.load_tokenizers(rec)
    tok = hfio.load_tokenizer(teacher)
    tok.chat_template = TEMPLATE
    student = P.build_model(rec.student.model, s_tok, seed=0)
    hfio.save_pretrained(student, CACHE / "student_init", tok)
    hfio.save_pretrained(hfio.load_model(teacher, "AutoModelForCausalLM"), CACHE / "teacher", tok)
    data = P.Data(rec, s_tok, None, text)
    g = torch.Generator().manual_seed(0)
    offs = data.text.offsets(g, n_examples)
    with open(CACHE / "train.jsonl", "w") as f:
        for o in offs.tolist():
            ids = data.text.train_ids[o : o + PROMPT + GEN].tolist()
            p, r = s_tok.decode(ids[:PROMPT]), s_tok.decode(ids[PROMPT:])
            f.write(json.dumps({"messages": [
                {"role": "user", "content": p}, {"role": "assistant", "content": r},
            ]}) + "\n")  # fmt: skip
    return {"teacher": str(CACHE / "teacher"), "student": str(CACHE / "student_init")}


def run_ours(steps: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from darkknowledge.families import validate_family
    from darkknowledge.lm.pipeline import run_lm_recipe
    from darkknowledge.recipe_io import read_recipe

    raw = read_recipe(ROOT / "recipes/lm/shakespeare_char_gkd.yaml")  # extends: resolved
    raw["teacher"] = {"model": {"path": str(CACHE / "teacher")}}
    raw["student"] = {"model": {"path": str(CACHE / "student_init")}}
    raw["tokenizer"] = None
    raw["train"] = {
        "steps": steps, "batch_size": BATCH, "lr": LR, "min_lr": LR, "warmup": 0,
        "weight_decay": 0.1, "beta2": 0.99, "grad_clip": 1.0, "eval_every": 10**6,
        "checkpoint_every": 10**6,
    }  # fmt: skip
    raw["distill"].update(prompt_tokens=PROMPT, gen_tokens=GEN, lmbda=0.5)
    raw["distill"]["loss"] = {"kind": "jsd", "beta": 0.5}
    _, rec = validate_family(raw, base_dir=ROOT / "recipes/lm")
    t0 = time.perf_counter()
    run_lm_recipe(rec, out, force=True)
    wall = time.perf_counter() - t0
    res = json.loads((out / "student" / "result.json").read_text())
    return {
        "side": "darkknowledge",
        "steps": steps,
        "train_wall_s": res["wall_s"],
        "step_s": res["wall_s"] / steps,
        "process_wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "model": res["model"],
    }


def run_trl(steps: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(CACHE / "teacher")
    student = AutoModelForCausalLM.from_pretrained(CACHE / "student_init")
    teacher = AutoModelForCausalLM.from_pretrained(CACHE / "teacher")
    ds = load_dataset("json", data_files=str(CACHE / "train.jsonl"), split="train")
    args = GKDConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1,
        adam_beta2=0.99, max_grad_norm=1.0, lmbda=0.5, beta=0.5, temperature=1.0,
        max_new_tokens=GEN, max_length=PROMPT + GEN, logging_steps=50, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, bf16=False, fp16=False,
    )  # fmt: skip

    class Clock(TrainerCallback):
        t0 = None

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.perf_counter()

    clock = Clock()
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ds,
        processing_class=tok, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    wall = time.perf_counter() - clock.t0
    trainer.model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return {
        "side": "trl",
        "steps": steps,
        "train_wall_s": wall,
        "step_s": wall / steps,
        "peak_rss_mb": peak_rss_mb(),
        "model": str(out / "model"),
    }


def evaluate(model: str) -> float:
    import torch

    torch.set_num_threads(1)
    from darkknowledge.families import validate_family
    from darkknowledge.hf import io as hfio
    from darkknowledge.lm import pipeline as P
    from darkknowledge.recipe_io import read_recipe

    raw = read_recipe(ROOT / "recipes/lm/shakespeare_char_gkd.yaml")  # extends: resolved
    _, rec = validate_family(raw, base_dir=ROOT / "recipes/lm")
    s_tok, _, text = P.load_tokenizers(rec)
    data = P.Data(rec, s_tok, None, text)
    return P.val_loss(hfio.load_model(model, "AutoModelForCausalLM"), data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "trl", "eval"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--teacher", default=str(ROOT / "runs/lm_seeds/plain_s0/teacher/model"))
    ap.add_argument("--model")
    ap.add_argument("--json", default=str(ROOT / "docs/results/llm_trl.json"))
    args = ap.parse_args()
    if args.side == "ours":
        print(json.dumps(run_ours(args.steps, CACHE / "ours")))
        return 0
    if args.side == "trl":
        print(json.dumps(run_trl(args.steps, CACHE / "trl")))
        return 0
    if args.side == "eval":
        print(json.dumps({"val_loss": evaluate(args.model)}))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prep = prepare(Path(args.teacher), n_examples=args.steps * BATCH)
    rows = {}
    for side, py in (("ours", sys.executable), ("trl", str(TRL_PY))):
        cmd = [py, __file__, "--side", side, "--steps", str(args.steps)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr[-4000:])
            raise SystemExit(f"{side} failed")
        rows[side] = json.loads(r.stdout.strip().splitlines()[-1])
        e = subprocess.run(
            [sys.executable, __file__, "--side", "eval", "--model", rows[side]["model"]],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows[side]["val_loss"] = json.loads(e.stdout.strip().splitlines()[-1])["val_loss"]
        print(json.dumps(rows[side]), flush=True)
    init = subprocess.run(
        [sys.executable, __file__, "--side", "eval", "--model", prep["student"]],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = {
        "steps": args.steps,
        "initial_val_loss": json.loads(init.stdout.strip().splitlines()[-1])["val_loss"],
        "teacher": prep["teacher"],
        "rows": rows,
        "step_time_ratio_ours_over_trl": rows["ours"]["step_s"] / rows["trl"]["step_s"],
        "peak_rss_ratio_ours_over_trl": rows["ours"]["peak_rss_mb"] / rows["trl"]["peak_rss_mb"],
    }
    Path(args.json).write_text(json.dumps(summary, indent=2))
    for side, r in rows.items():
        print(
            f"{side:>5}: {r['step_s']:.3f} s/step  peak RSS {r['peak_rss_mb']:.0f} MB  "
            f"val loss {r['val_loss']:.4f} after {r['steps']} steps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
