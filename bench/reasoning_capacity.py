"""The capacity check of the reasoning experiment (docs/results/reasoning.md), through
`dk run` and `dk eval` only: the same small student trained on the gold worked solutions
of the distillation prompts vs on their final answers only, and teacher candidates
trained on the teacher split, each scored on dev and test (pass@1 = mean correctness of
4 samples at temperature 0.6, maj@4, greedy accuracy).

Resumable: each arm's run folder is continued with `dk run --resume`, a finished stage
(report.json, eval_dev.json, eval_test.json) is skipped, and the CPU seconds of every
finished `dk` process are appended to ARM.cpu.jsonl. A rerun only tabulates what is done.

    OMP_NUM_THREADS=1 nice -n 15 python bench/reasoning_capacity.py            # every arm
    python bench/reasoning_capacity.py --only s64x2_gold s64x2_answers         # some arms
    python bench/reasoning_capacity.py --table --json docs/results/reasoning_capacity.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "runs" / "reasoning" / "data"
OUT = ROOT / "bench" / ".cache" / "reasoning"
EVAL = ["--prompt-key", "prompt", "--answer-key", "answer", "--k", "4",
        "--temperature", "0.6", "--max-new-tokens", "96"]  # fmt: skip


def llama(h: int, layers: int) -> list[str]:
    """Overrides for a tiny-llama student of width ``h`` and ``layers`` layers (4 heads,
    MLP 4·h)."""
    c = {"hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 4 * h, "max_position_embeddings": 128}  # fmt: skip
    return [f"student.model.config.{k}={v}" for k, v in c.items()]


def arm(
    role: str, recipe: str, h: int, layers: int, steps: int, seed: int | None = None
) -> tuple[str, str, list[str]]:
    seeded = [] if seed is None else [f"train.seed={seed}"]
    return role, recipe, [*llama(h, layers), f"train.steps={steps}", *seeded]


# name: (role, recipe, overrides); students in pairs (NAME_gold, NAME_answers) of one size
# and step count, teachers on their own
ARMS: dict[str, tuple[str, str, list[str]]] = {
    "s64x2_gold": arm("student", "student_gold.yaml", 64, 2, 4000),
    "s64x2_answers": arm("student", "student_answers.yaml", 64, 2, 4000),
    "s64x2_gold_seed1": arm("student", "student_gold.yaml", 64, 2, 4000, seed=1),
    "s64x2_gold_seed2": arm("student", "student_gold.yaml", 64, 2, 4000, seed=2),
    "s64x2_6k_gold": arm("student", "student_gold.yaml", 64, 2, 6000),
    "s64x2_6k_answers": arm("student", "student_answers.yaml", 64, 2, 6000),
    "s64x2_6k_gold_seed1": arm("student", "student_gold.yaml", 64, 2, 6000, seed=1),
    "s64x2_6k_gold_seed2": arm("student", "student_gold.yaml", 64, 2, 6000, seed=2),
    "s64x2_2k_gold": arm("student", "student_gold.yaml", 64, 2, 2000),
    "s64x2_2k_answers": arm("student", "student_answers.yaml", 64, 2, 2000),
    "s32x2_gold": arm("student", "student_gold.yaml", 32, 2, 4000),
    "s32x2_answers": arm("student", "student_answers.yaml", 32, 2, 4000),
    "t96x4_1k": arm("teacher", "teacher_gold.yaml", 96, 4, 1000),
    "t96x4_1500": arm("teacher", "teacher_gold.yaml", 96, 4, 1500),
    "t96x4_2k": arm("teacher", "teacher_gold.yaml", 96, 4, 2000),
}


def dk(args: list[str], log: Path) -> dict:
    """Run ``dk ARGS`` (one thread), output appended to ``log``; its CPU and wall seconds."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ dk {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "darkknowledge.cli", *args],
                             stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        raise SystemExit(f"dk {args[0]} failed (exit {rc}); see {log}")
    return {"cpu_s": round(cpu, 1), "wall_s": round(time.time() - t0, 1)}


def locked(lock: Path, fn) -> None:
    """Run ``fn`` unless a live process holds ``lock`` (one process per run: several
    bench processes can share a list of runs); a lock left by a killed one is taken."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            print(f"{lock.stem}: running in process {pid}; skipped", flush=True)
            return
        except (ProcessLookupError, ValueError):
            lock.unlink()  # left by a killed process
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        fn()
    finally:
        lock.unlink(missing_ok=True)


def run_arm(name: str, out: Path) -> None:
    _, recipe, overrides = ARMS[name]
    run = out / name
    log, cpu_log = out / f"{name}.log", out / f"{name}.cpu.jsonl"
    locked(out / f"{name}.lock", lambda: _run_stages(name, recipe, overrides, run, log, cpu_log))


def _run_stages(name, recipe, overrides, run: Path, log: Path, cpu_log: Path) -> None:

    def record(stage: str, t: dict) -> None:
        with open(cpu_log, "a") as f:
            f.write(json.dumps({"stage": stage, **t}) + "\n")

    if not (run / "report.json").exists():
        args = ["run", str(ROOT / "recipes" / "reasoning" / recipe), *overrides,
                "--out", str(run), "--resume"]  # fmt: skip
        record("train", dk(args, log))
    for split in ("dev", "test"):
        if not (run / f"eval_{split}.json").exists():
            args = ["eval", str(run), "--data", str(DATA / f"{split}.jsonl"), *EVAL,
                    "--out", str(run / f"eval_{split}.json")]  # fmt: skip
            record(f"eval_{split}", dk(args, log))
    print(f"[{time.strftime('%H:%M:%S')}] {name} done", flush=True)


def command(name: str) -> str:
    _, recipe, overrides = ARMS[name]
    return f"dk run recipes/reasoning/{recipe} {' '.join(overrides)} --out bench/.cache/reasoning/{name}"


def summarize(out: Path) -> dict:
    rows = {}
    for name, (role, recipe, overrides) in ARMS.items():
        run = out / name
        if not (run / "eval_test.json").exists():
            rows[name] = {"role": role, "done": False}
            continue
        rep = json.loads((run / "report.json").read_text())
        (st,) = rep["students"].values()  # one student per arm (its seed is the key)
        cpu = {}
        for line in (out / f"{name}.cpu.jsonl").read_text().splitlines():
            r = json.loads(line)
            cpu[r["stage"]] = cpu.get(r["stage"], 0.0) + r["cpu_s"]
        row = {"role": role, "done": True, "recipe": f"recipes/reasoning/{recipe}",
               "overrides": overrides, "command": command(name), "params": st["params"],
               "steps": st["steps"], "val_loss": st["val_loss"], "train_wall_s": st["wall_s"],
               "cpu_s": {k: round(v, 1) for k, v in cpu.items()}}  # fmt: skip
        for split in ("dev", "test"):
            ev = json.loads((run / f"eval_{split}.json").read_text())
            m = ev["models"]["student"]
            row[split] = {k: m[k] for k in ("pass@1", "maj@k", "greedy", "loss")}
            row[split]["prompts"] = ev["prompts"]
        rows[name] = row
    checks = {}
    for name, r in rows.items():
        if name.endswith("_gold") and r["done"]:
            other = rows.get(name[: -len("_gold")] + "_answers", {})
            if other.get("done"):
                g, a = r["test"]["pass@1"], other["test"]["pass@1"]
                checks[name[: -len("_gold")]] = {
                    "gold_pass@1": g, "answers_pass@1": a,
                    "ratio": g / a if a > 0 else None, "at_least_2x": g >= 2 * a,
                }  # fmt: skip
    seeds = {}  # the same arm over several train.seed values: NAME, NAME_seed1, ...
    for name, r in rows.items():
        if r["done"] and "_seed" not in name:
            xs = [rows[n]["test"]["pass@1"] for n in rows
                  if (n == name or n.startswith(name + "_seed")) and rows[n]["done"]]  # fmt: skip
            if len(xs) > 1:
                seeds[name] = {"test_pass@1": xs, "mean": statistics.fmean(xs),
                               "sd": statistics.stdev(xs)}  # fmt: skip
    return {"data": str(DATA.relative_to(ROOT)), "eval": " ".join(EVAL), "arms": rows,
            "capacity": checks, "seeds": seeds}  # fmt: skip


def table(s: dict) -> str:
    lines = [
        "| arm | role | params | steps | train CPU | eval CPU (dev+test) | dev pass@1 | "
        "test pass@1 | test greedy | test maj@4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s["arms"].items():
        if not r["done"]:
            lines.append(f"| {name} | {r['role']} | (not finished) | | | | | | | |")
            continue
        c = r["cpu_s"]
        ev = c.get("eval_dev", 0) + c.get("eval_test", 0)
        lines.append(
            f"| {name} | {r['role']} | {r['params']:,} | {r['steps']} | "
            f"{c.get('train', 0) / 60:.1f} min | {ev / 60:.1f} min | {r['dev']['pass@1']:.3f} | "
            f"{r['test']['pass@1']:.3f} | {r['test']['greedy']:.3f} | {r['test']['maj@k']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help=f"arms to run (default all): {', '.join(ARMS)}")
    p.add_argument("--table", action="store_true", help="run nothing; tabulate what is done")
    p.add_argument(
        "--json", help="write the summary here (e.g. docs/results/reasoning_capacity.json)"
    )
    p.add_argument("--out", default=str(OUT), help="run folders and logs")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(a.only or []) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; known: {', '.join(ARMS)}")
    if not a.table:
        if not (DATA / "manifest.json").exists():
            from darkknowledge.blackbox.chains import write_splits

            write_splits(DATA)
        for name in a.only or ARMS:
            run_arm(name, out)
    s = summarize(out)
    print(table(s))
    print(json.dumps({"capacity": s["capacity"], "seeds": s["seeds"]}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1) + "\n")


if __name__ == "__main__":
    main()
