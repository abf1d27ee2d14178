"""Val loss of the TinyShakespeare char-level teacher, the plain student and each KD
variant over several seeds: every (variant, seed) is its own `dk run` process.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/lm_seeds.py --seeds 3 --steps 1500

The teacher is trained once (in the plain seed-0 run, or given with --teacher: a model
folder saved by an earlier run, e.g. runs/lm_teacher/model) and reused by path.
Finished runs (a report.json) are skipped, so an interrupted sweep is continued by
running the same command. Writes docs/results/llm_seeds.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["plain", "fkl", "rkl", "gkd"]


def run(variant: str, seed: int, out: Path, steps: int, teacher: Path | None) -> dict:
    run_dir = out / f"{variant}_s{seed}"
    if (run_dir / "report.json").exists():
        return json.loads((run_dir / "report.json").read_text())
    cmd = [
        str(ROOT / ".venv/bin/dk"),
        "run",
        str(ROOT / f"recipes/lm/shakespeare_char_{variant}.yaml"),
        "--out",
        str(run_dir),
        "--force",
        f"seed={seed}",
        f"train.steps={steps}",
    ]
    if teacher is not None:
        cmd += [f"teacher.model={{path: {teacher}}}", "teacher.train=null"]
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"  {variant} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return json.loads((run_dir / "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000, help="student steps")
    ap.add_argument("--out", default=str(ROOT / "runs/lm_seeds"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=str(ROOT / "docs/results/llm_seeds.json"))
    ap.add_argument("--teacher", default=None, help="a trained teacher's model folder")
    args = ap.parse_args()
    out = Path(args.out)
    variants = args.variants.split(",")
    if args.teacher:
        teacher = Path(args.teacher).resolve()
        first = run("plain", 0, out, args.steps, teacher)
        t_train = json.loads((teacher.parent / "result.json").read_text())
    else:
        first = run("plain", 0, out, args.steps, None)  # also trains the teacher
        teacher = out / "plain_s0" / "teacher" / "model"
        t_train = first["teacher"]
    results: dict[str, list[dict]] = {"plain": [first]}
    order = [(v, s) for s in range(args.seeds) for v in ("plain", "fkl") if (v, s) != ("plain", 0)]
    order += [(v, s) for v in variants if v not in ("plain", "fkl") for s in range(args.seeds)]
    for v, s in order:
        if v in variants:
            results.setdefault(v, []).append(run(v, s, out, args.steps, teacher))
    summary = {
        "teacher_val_loss": first["teacher"]["val_loss"],
        "teacher_steps": t_train["steps"],
        "teacher_train_wall_s": t_train["wall_s"],
        "teacher": str(teacher),
        "student_steps": args.steps,
        "seeds": args.seeds,
        "variants": {},
    }
    for v, reps in results.items():
        vals = [r["students"][next(iter(r["students"]))]["val_loss"] for r in reps]
        walls = [r["students"][next(iter(r["students"]))]["wall_s"] for r in reps]
        summary["variants"][v] = {
            "val_loss": vals,
            "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "wall_s_mean": statistics.fmean(walls),
        }
    p, f = summary["variants"].get("plain"), summary["variants"].get("fkl")
    if p and f and len(p["val_loss"]) > 1 and len(f["val_loss"]) > 1:
        pooled = math.sqrt((p["sd"] ** 2 + f["sd"] ** 2) / 2)
        summary["fkl_vs_plain"] = {
            "gap": p["mean"] - f["mean"],
            "pooled_sd": pooled,
            "gap_in_pooled_sd": (p["mean"] - f["mean"]) / pooled if pooled else math.inf,
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"teacher val loss {summary['teacher_val_loss']:.4f}")
    for v, r in summary["variants"].items():
        print(f"{v:>6}: {r['mean']:.4f} ± {r['sd']:.4f}  {[round(x, 4) for x in r['val_loss']]}")
    if "fkl_vs_plain" in summary:
        print("fkl vs plain:", summary["fkl_vs_plain"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
