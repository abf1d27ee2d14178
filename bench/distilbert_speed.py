"""CPU inference speed of a distilled student against its teacher (DistilBERT Table 3's
"inference time" figure), at batch 1 and batch 32 and a fixed sequence length.

Each measurement runs in a fresh Python process (nothing cached or warmed by another
model); teacher and student processes alternate, ``--repeats`` rounds, and the median
of the per-process medians is reported, so a change in the machine's load hits both.

    python bench/distilbert_speed.py \
        --teacher runs/minilm-l6_to_l3_sst2/teacher/model \
        --student runs/minilm-l6_to_l3_sst2/students/distilled/seed0/model \
        --out docs/results/distilbert_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(model_dir: str, batch: int, length: int, runs: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from darkknowledge.hf.io import load_model
    from darkknowledge.hf.text_pipeline import time_forward

    t0 = time.perf_counter()
    model = load_model(model_dir, "AutoModelForSequenceClassification")
    load_s = time.perf_counter() - t0
    ms = time_forward(model, batch, length, runs)
    return {
        "ms": ms,
        "load_s": load_s,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.batch, a.length, a.runs, a.threads)))
        return

    results: dict = {
        "length": a.length,
        "threads": a.threads,
        "runs_per_process": a.runs,
        "repeats": a.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "command": " ".join(["python", *sys.argv]),
        "teacher": a.teacher,
        "student": a.student,
        "batches": {},
    }
    for b in [int(x) for x in a.batches.split(",")]:
        per: dict[str, list[dict]] = {"teacher": [], "student": []}
        for _ in range(a.repeats):
            for name, path in (("teacher", a.teacher), ("student", a.student)):
                cmd = [sys.executable, __file__, "--one", "--model", path, "--batch", str(b)]
                cmd += [
                    "--length",
                    str(a.length),
                    "--runs",
                    str(a.runs),
                    "--threads",
                    str(a.threads),
                ]
                cmd += ["--teacher", a.teacher, "--student", a.student]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                per[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        t = statistics.median(r["ms"] for r in per["teacher"])
        s = statistics.median(r["ms"] for r in per["student"])
        results["batches"][str(b)] = {
            "teacher_ms": t,
            "student_ms": s,
            "speedup": t / s,
            "teacher_runs_ms": [r["ms"] for r in per["teacher"]],
            "student_runs_ms": [r["ms"] for r in per["student"]],
        }
        results["teacher_params"] = per["teacher"][0]["params"]
        results["student_params"] = per["student"][0]["params"]
        results["teacher_layers"] = per["teacher"][0]["layers"]
        results["student_layers"] = per["student"][0]["layers"]
        print(
            f"batch {b}: teacher {t:.2f} ms, student {s:.2f} ms, speed-up {t / s:.2f}x", flush=True
        )
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
