"""The reasoning experiment's students (docs/results/reasoning.md, point 3), through `dk`
commands only, on the output of the generation stage (`dk serve-teacher` + `dk generate
recipes/reasoning/generate.yaml --out runs/reasoning/generate`):

- ``data``: the rows of the arms that are not a `dk` output as such: ``unverified.jsonl``
  (as many traces as were verified, drawn from all samples without their verdict, seeded)
  and ``verified_answers.jsonl`` (the verified rows' final answers only), in
  runs/reasoning/arms/;
- ``store``: `dk store from-api` on the generation's results (top-5 log-probs + tail);
- students, each `dk run RECIPE train.seed=S --out runs/reasoning/students/ARM_sS --resume`
  then `dk eval` on the held-out test split: ``verified``, ``unverified``, ``answers``,
  ``logprobs``; then from each seed's verified student ``onpolicy`` (GKD, λ = 1, the
  teacher in-process) and ``continued`` (SFT on the verified traces for the on-policy
  run's measured CPU time);
- the summary: per arm the mean test pass@1 and greedy accuracy with a 95 % interval over
  seeds (t distribution), paired bootstraps of the pairs that share seeds, and the cost
  table of the generation stage.

Resumable: finished stages are skipped, `dk run --resume` continues a killed run, and
several processes can share the work (one lock per run).

    OMP_NUM_THREADS=1 nice -n 15 python bench/reasoning_grid.py            # everything
    python bench/reasoning_grid.py --arms verified unverified --seeds 0 1  # some runs
    python bench/reasoning_grid.py --table --json docs/results/reasoning_grid.json \
        --recipes docs/results/reasoning_recipes
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from darkknowledge.store.format import atomic_write_bytes
from reasoning_capacity import EVAL, dk, locked

ROOT = Path(__file__).resolve().parents[1]
R = ROOT / "runs" / "reasoning"
DATA, GEN, ARMS_DIR, STORE, STUDENTS = (
    R / "data",
    R / "generate",
    R / "arms",
    R / "store",
    R / "students",
)
RECIPES = ROOT / "recipes" / "reasoning"
SEEDS = [0, 1, 2, 3, 4]
# arm: recipe (the first four train from scratch; the last two start from `verified`)
ARMS = {
    "verified": "student_verified.yaml",
    "unverified": "student_unverified.yaml",
    "answers": "student_verified_answers.yaml",
    "logprobs": "student_verified_logprobs.yaml",
    "onpolicy": "student_onpolicy.yaml",
    "continued": "student_sft_continued.yaml",
}
PAIRS = [("verified", "unverified"), ("logprobs", "verified"), ("onpolicy", "continued"),
         ("verified", "answers")]  # fmt: skip
PRICE_PER_M = 0.60  # $ per million generated tokens: a stated price for the cost column


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def phase_data() -> dict:
    """unverified.jsonl and verified_answers.jsonl from the generation's files."""
    ARMS_DIR.mkdir(parents=True, exist_ok=True)
    verified = _rows(GEN / "sft.jsonl")
    every = []
    for r in _rows(GEN / "results.jsonl"):
        for s in r.get("samples", []):
            every.append({"id": r["id"], "sample": s["index"], "prompt": r["prompt"],
                          "response": s["text"], "correct": s["verdict"]["correct"]})  # fmt: skip
    every.sort(key=lambda r: (r["id"], r["sample"]))
    drawn = random.Random(0).sample(every, len(verified))
    drawn.sort(key=lambda r: (r["id"], r["sample"]))
    _write(ARMS_DIR / "unverified.jsonl", [{k: r[k] for k in ("id", "sample", "prompt",
                                            "response")} for r in drawn])  # fmt: skip
    answers = [{**r, "response": " " + r["response"].strip().splitlines()[-1]} for r in verified]
    _write(ARMS_DIR / "verified_answers.jsonl", answers)
    info = {"samples": len(every), "verified": len(verified), "unverified": len(drawn),
            "unverified_correct": sum(r["correct"] for r in drawn),
            "verified_prompts": len({r["id"] for r in verified})}  # fmt: skip
    (ARMS_DIR / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _record(name: str, stage: str, t: dict) -> None:
    with open(STUDENTS / f"{name}.cpu.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, **t}) + "\n")


def _cpu(name: str, stage: str) -> float:
    f = STUDENTS / f"{name}.cpu.jsonl"
    if not f.exists():
        return 0.0
    return sum(r["cpu_s"] for r in map(json.loads, f.read_text().splitlines())
               if r["stage"] == stage)  # fmt: skip


def overrides(arm: str, seed: int) -> list[str]:
    out = [f"train.seed={seed}"]
    if arm in ("onpolicy", "continued"):
        out.append(f"student.model.path={STUDENTS / f'verified_s{seed}' / 'student' / 'model'}")
    if arm == "continued":
        out.append(f"train.steps={continued_steps(seed)}")
    return out


def continued_steps(seed: int) -> int:
    """SFT steps taking the on-policy run's training CPU time, at the verified run's CPU
    per step (the same rows, batch and model)."""
    on = _cpu(f"onpolicy_s{seed}", "train")
    report = STUDENTS / f"verified_s{seed}" / "report.json"
    if on <= 0 or not report.exists():
        raise SystemExit(f"seed {seed}: the on-policy and verified runs must finish first")
    (st,) = json.loads(report.read_text())["students"].values()  # its steps, as trained
    per_step = _cpu(f"verified_s{seed}", "train") / st["steps"]
    return max(1, round(on / per_step))


def run_student(arm: str, seed: int) -> None:
    name = f"{arm}_s{seed}"
    run, log = STUDENTS / name, STUDENTS / f"{name}.log"

    def stages():
        if not (run / "report.json").exists():
            args = ["run", str(RECIPES / ARMS[arm]), *overrides(arm, seed),
                    "--out", str(run), "--resume"]  # fmt: skip
            _record(name, "train", dk(args, log))
        if not (run / "eval_test.json").exists():
            args = ["eval", str(run), "--data", str(DATA / "test.jsonl"), *EVAL,
                    "--out", str(run / "eval_test.json")]  # fmt: skip
            _record(name, "eval_test", dk(args, log))
        print(f"[{time.strftime('%H:%M:%S')}] {name} done", flush=True)

    locked(STUDENTS / f"{name}.lock", stages)


def phase_store() -> None:
    if not (STORE / "manifest.json").exists():
        args = ["store", "from-api", str(GEN / "results.jsonl"), "--tokenizer",
                str(DATA / "tokenizer"), "--out", str(STORE)]  # fmt: skip
        STUDENTS.mkdir(parents=True, exist_ok=True)
        _record("store", "from_api", dk(args, STUDENTS / "store.log"))


# ---------------------------------------------------------------- summary


def _t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
             8: 2.306, 9: 2.262, 10: 2.228}  # fmt: skip
    return table.get(df, 1.96)


def interval(xs: list[float]) -> dict:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "n": len(xs)}
    half = _t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    # a share of problems: the interval clipped to [0, 1]
    return {"mean": m, "sd": statistics.stdev(xs), "lo": max(0.0, m - half),
            "hi": min(1.0, m + half), "n": len(xs)}  # fmt: skip


def paired_bootstrap(a: list[float], b: list[float], reps: int = 10_000) -> dict:
    """Mean difference a − b over shared seeds; its 95 % bootstrap interval (seeds
    resampled) and the one-sided p of a ≤ b (share of resamples with difference ≤ 0)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(d, k=len(d))) for _ in range(reps))
    return {"diff": statistics.fmean(d), "lo": means[int(0.025 * reps)],
            "hi": means[int(0.975 * reps) - 1], "p_a_le_b": sum(m <= 0 for m in means) / reps,
            "per_seed": d}  # fmt: skip


def summarize() -> dict:
    arms = {}
    for arm in ARMS:
        per = {}
        for s in SEEDS:
            f = STUDENTS / f"{arm}_s{s}" / "eval_test.json"
            if f.exists():
                m = json.loads(f.read_text())["models"]["student"]
                per[s] = {"pass@1": m["pass@1"], "greedy": m["greedy"],
                          "train_cpu_s": round(_cpu(f"{arm}_s{s}", "train"), 1),
                          "eval_cpu_s": round(_cpu(f"{arm}_s{s}", "eval_test"), 1)}  # fmt: skip
        if per:
            arms[arm] = {
                "recipe": f"recipes/reasoning/{ARMS[arm]}",
                "seeds": per,
                "pass@1": interval([p["pass@1"] for p in per.values()]),
                "greedy": interval([p["greedy"] for p in per.values()]),
            }
    pairs = {}
    for a, b in PAIRS:
        if a in arms and b in arms:
            shared = sorted(set(arms[a]["seeds"]) & set(arms[b]["seeds"]))
            if len(shared) >= 2:
                pairs[f"{a} - {b}"] = paired_bootstrap(
                    [arms[a]["seeds"][s]["pass@1"] for s in shared],
                    [arms[b]["seeds"][s]["pass@1"] for s in shared],
                ) | {"seeds": shared}
    out = {"arms": arms, "pairs": pairs, "eval": " ".join(EVAL)}
    if (GEN / "summary.json").exists():
        g = json.loads((GEN / "summary.json").read_text())
        tokens = g["this_run"]["usage"]["completion_tokens"]
        out["generation"] = {**{k: g[k] for k in ("prompts", "samples", "correct",
                             "rejection_rate", "prompts_with_a_correct_sample", "sft_rows")},
                             "completion_tokens": tokens,
                             "cost_usd_at_price": round(tokens / 1e6 * PRICE_PER_M, 4),
                             "price_per_million_tokens": PRICE_PER_M}  # fmt: skip
    if (ARMS_DIR / "info.json").exists():
        out["arms_data"] = json.loads((ARMS_DIR / "info.json").read_text())
    return out


def table(s: dict) -> str:
    lines = ["| arm | seeds | test pass@1 (95 % CI) | test greedy (95 % CI) | train CPU / run |",
             "|---|---|---|---|---|"]  # fmt: skip

    def ci(d):
        if "lo" not in d:
            return f"{d['mean']:.3f}"
        return f"{d['mean']:.3f} ({d['lo']:.3f}–{d['hi']:.3f})"

    for arm, r in s["arms"].items():
        cpu = statistics.fmean(p["train_cpu_s"] for p in r["seeds"].values()) / 60
        lines.append(f"| {arm} | {len(r['seeds'])} | {ci(r['pass@1'])} | {ci(r['greedy'])} | "
                     f"{cpu:.1f} min |")  # fmt: skip
    for k, p in s["pairs"].items():
        lines.append(f"\n{k}: {p['diff']:+.3f} (bootstrap 95 % {p['lo']:+.3f} to {p['hi']:+.3f}, "
                     f"p(≤ 0) = {p['p_a_le_b']:.4f}, seeds {p['seeds']})")  # fmt: skip
    return "\n".join(lines)


def write_recipes(folder: Path) -> list[str]:
    """Each arm's resolved recipe (its seed-0 run's ``config.yaml``), paths relative to
    the repository, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    for arm in ARMS:
        f = STUDENTS / f"{arm}_s0" / "config.yaml"
        if f.exists():
            # absolute paths (of whichever checkout ran it) → relative to the repository
            text = re.sub(r"/[^\s:]*?/recipes/reasoning/\.\./\.\./", "", f.read_text())
            text = re.sub(r"/[^\s:]*?/(runs/reasoning/)", r"\1", text)
            (folder / f"{arm}.yaml").write_text(text)
            done.append(arm)
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="*", default=list(ARMS), help=", ".join(ARMS))
    p.add_argument("--seeds", nargs="*", type=int, default=SEEDS)
    p.add_argument("--table", action="store_true", help="run nothing; tabulate what is done")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--recipes", help="write each arm's resolved recipe into this folder")
    a = p.parse_args()
    if not a.table:
        STUDENTS.mkdir(parents=True, exist_ok=True)
        if not (ARMS_DIR / "info.json").exists():
            print(json.dumps(phase_data()), flush=True)
        if "logprobs" in a.arms:
            phase_store()
        for arm in a.arms:  # an arm at every seed before the next arm
            for seed in a.seeds:
                if (
                    arm in ("onpolicy", "continued")
                    and not (STUDENTS / f"verified_s{seed}" / "report.json").exists()
                ):
                    print(f"{arm}_s{seed}: waits for verified_s{seed}", flush=True)
                    continue
                if (
                    arm == "continued"
                    and not (STUDENTS / f"onpolicy_s{seed}" / "report.json").exists()
                ):
                    print(f"continued_s{seed}: waits for onpolicy_s{seed}", flush=True)
                    continue
                run_student(arm, seed)
    s = summarize()
    print(table(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1) + "\n")
    if a.recipes:
        print("resolved recipes:", ", ".join(write_recipes(Path(a.recipes))))


if __name__ == "__main__":
    main()
