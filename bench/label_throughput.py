"""Labelling throughput ÷ raw teacher inference throughput (inference_mode, same batch).

Each measurement is a fresh process; rounds interleave ``raw`` and ``label`` so machine
load hits both alike; medians are compared. ``label`` is the real labeller writing a
store (atomic shards, fsync, manifest with SHA-256 of every shard) to local disk.

    .venv/bin/python bench/label_throughput.py run --rounds 3

Teachers: the Fashion-MNIST ensemble of 3 small CNNs from bench/kd_overhead.py
(dense store, the first 4,096 of its 54,000 transfer images, batch 512) and the small GPT of bench/lm_teacher.py
(the default top-k store: k = 64, q8, tail prior; 128 windows × 64 tokens, batch 16).
``lm8x512*``: an 8 × 512 GPT with the GPT-2 vocabulary (seeded random weights), 64 windows:
its top-k store (``lm8x512``), head store (``_head``) and sampled store (``_sampled``: 16
draws per position, distinct ids + counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["fashion", "lm", "lm_head", "lm8x512", "lm8x512_head", "lm8x512_sampled"]
CACHE = ROOT / "bench" / ".cache"


def _setup(task: str, windows: int = 64):
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    if task == "fashion":
        from darkknowledge.data import load_data
        from darkknowledge.pipeline import build_teacher
        from darkknowledge.recipe_io import validate_recipe
        from darkknowledge.store import LabelSpec
        from kd_overhead import CACHE as KD
        from kd_overhead import RECIPE

        recipe = validate_recipe(RECIPE)
        data = load_data(recipe.data)
        teacher = build_teacher(recipe, data, KD / "store", resume=True)
        # the first 4,096 transfer images: the 3-CNN teacher runs at ~100 images/s here
        x, ids = data.transfer.x[:4096], data.transfer.ids[:4096]
        return (
            teacher,
            x,
            ids,
            None,
            LabelSpec(signal="dense", k=None, dtype="fp16", batch_size=512),
        )
    import lm
    from darkknowledge.store import LabelSpec
    from darkknowledge.store.label import default_k
    from darkknowledge.teachers import ModuleTeacher
    from store_fidelity import load_teacher

    (x, _y), _ = lm.splits(64)
    x = x[: max(128, windows)]
    mask = torch.ones_like(x, dtype=torch.bool)
    head = task.endswith("_head")
    sampled = task.endswith("_sampled")
    task = task.removesuffix("_head").removesuffix("_sampled")
    if task == "lm8x512":
        # a deeper teacher of the shape of bench/lm_memory.py's pinned setup (8 layers ×
        # 512, GPT-2 vocabulary), seeded random weights: what is timed does not depend on
        # them; its layers weigh as much as its output head, unlike the 2 × 96 teacher
        torch.manual_seed(0)
        x, mask = x[:windows], mask[:windows]
        signal = "head" if head else "sampled" if sampled else "topk"
        # sampled: the default 16 draws per position at temperature 1
        spec = LabelSpec(signal=signal, k=default_k(signal), batch_size=16, shard_size=64)
        teacher = lm.GPT(d=512, layers=8, heads=8, ctx=64).eval()
        return ModuleTeacher(teacher), x, torch.arange(len(x)), mask, spec
    # lm: the top-k store (k = 64, 8-bit log-probs, tail prior). lm_head: the default
    # (signal auto), which for this teacher is the head store: its output layer's input is
    # 96 wide, 192 bytes a token in fp16, no more than top-64's 196
    spec = LabelSpec(signal="auto" if head else "topk", batch_size=16, shard_size=64)
    return ModuleTeacher(load_teacher()), x, torch.arange(len(x)), mask, spec


def measure(task: str, mode: str, threads: int = 1, windows: int = 64) -> dict:
    import torch

    torch.set_num_threads(threads)  # see bench/kd_overhead.py --threads

    from darkknowledge.store import label
    from darkknowledge.teachers import Batch

    teacher, x, ids, mask, spec = _setup(task, windows)
    bs = spec.batch_size
    c0 = time.process_time()
    if mode == "raw":
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                teacher.signals(Batch(x[i : i + bs], None, ids[i : i + bs]))
        wall = time.perf_counter() - t0
    else:
        out = CACHE / "throughput" / task
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        label(teacher, x, ids, out, spec, mask=mask, progress=False)
        wall = time.perf_counter() - t0
    cpu = time.process_time() - c0  # this process's CPU time: less sensitive to load
    shutil.rmtree(CACHE / "throughput" / task, ignore_errors=True)
    return {"task": task, "mode": mode, "examples": len(x), "wall_s": wall, "cpu_s": cpu}


def run(rounds: int, tasks: list[str], out: Path, windows: int = 64) -> None:
    res: dict = {"rounds": rounds, "torch_threads": 1, "tasks": {}}
    if out.exists():  # tasks not rerun keep their earlier measurements and commands
        res = json.loads(out.read_text())
        res["commands"] = res.get("commands") or [res.pop("command")]
    cmd = f"bench/label_throughput.py run --rounds {rounds} --tasks {' '.join(tasks)}"
    if windows != 64:
        cmd += f" --windows {windows}"
    for task in tasks:
        times: dict[str, list[float]] = {"raw": [], "label": []}
        cpu: dict[str, list[float]] = {"raw": [], "label": []}
        for r in range(rounds):
            for mode in ("raw", "label"):
                p = subprocess.run([sys.executable, __file__, "measure", task, mode,
                                    "--windows", str(windows)],
                                   capture_output=True, text=True, check=True)  # fmt: skip
                rec = json.loads(p.stdout.strip().splitlines()[-1])
                times[mode].append(rec["wall_s"])
                cpu[mode].append(rec["cpu_s"])
                print(f"{task} round {r} {mode}: {rec['wall_s']:.2f} s (CPU {rec['cpu_s']:.2f} s)",
                      flush=True)  # fmt: skip
        key = task if windows == 64 else f"{task}@{windows}windows"
        if key in res["tasks"]:  # a rerun: the earlier measurement moves to "previous"
            res.setdefault("previous", {}).setdefault(key, []).append(res["tasks"][key])
        med = {m: statistics.median(v) for m, v in times.items()}
        med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
        res["tasks"][key] = {
            "rounds": rounds,
            "examples": rec["examples"],
            "wall_s": times,
            "median_s": med,
            "label_over_raw_throughput": med["raw"] / med["label"],
            "cpu_s": cpu,
            "label_over_raw_cpu": med_cpu["raw"] / med_cpu["label"],
            "load_average": os.getloadavg(),  # after the task's rounds (2 cores shared)
            "command": cmd,
        }
    res["commands"] = [*res.get("commands", []), cmd]
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({t: v["label_over_raw_throughput"] for t, v in res["tasks"].items()}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("task", choices=TASKS)
    m.add_argument("mode", choices=["raw", "label"])
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--windows", type=int, default=64)
    r = sub.add_parser("run")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--tasks", nargs="+", default=["fashion", "lm"])
    r.add_argument(
        "--windows",
        type=int,
        default=64,
        help="lm8x512 tasks: windows of 64 tokens labelled (64: the pinned set-up)",
    )
    r.add_argument("--out", default=str(ROOT / "docs" / "results" / "label_throughput.json"))
    a = ap.parse_args()
    if a.cmd == "measure":
        print(json.dumps(measure(a.task, a.mode, a.threads, a.windows)))
    else:
        run(a.rounds, a.tasks, Path(a.out), a.windows)


if __name__ == "__main__":
    main()
