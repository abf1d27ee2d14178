"""Markdown tables for docs/results/distilbert_sst2.md from a text-recipe run directory
and the speed JSON of bench/distilbert_speed.py (so the page's numbers are copied by
code, not by hand).

    python bench/distilbert_tables.py runs/minilm-l6_to_l3_sst2 docs/results/distilbert_speed.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# DistilBERT (Sanh et al. 2019) Table 4: change of the GLUE macro-score, task-agnostic
# pre-training, relative to triple loss + teacher-layer init.
PAPER_DELTA = {"no-soft": -2.96, "no-cosine": -1.46, "random-init": -3.69}


def main() -> None:
    run = Path(sys.argv[1])
    rep = json.loads((run / "report.json").read_text())
    t = 100 * rep["teacher"]["test_accuracy"]
    s = rep["students"]
    print(
        "| model | init | loss terms | seeds | SST-2 test acc % (each seed) | mean ± sd | % of teacher | agreement with teacher % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| teacher (6 layers, fine-tuned) | pretrained | CE | - | {t:.2f} | {t:.2f} | 100.0 | - |"
    )
    for name, r in s.items():
        terms = " + ".join(k for k in ("soft", "hard", "cosine", "attention") if k in r["loss"])
        each = ", ".join(f"{a:.2f}" for a in r["test_acc"])
        print(
            f"| {name} (3 layers) | {r['init']} | {terms} | {r['seeds']} | {each} | "
            f"{r['acc_mean']:.2f} ± {r['acc_sd']:.2f} | {100 * r['acc_mean'] / t:.1f} | "
            f"{r['agreement']:.1f} |"
        )
    print()
    base = s["distilled"]["acc_mean"]
    print(
        "| ablation (DistilBERT Table 4 shape) | Δ SST-2 test acc here (points) | DistilBERT Δ GLUE macro-score (task-agnostic) |"
    )
    print("|---|---|---|")
    labels = {
        "no-soft": "without the soft-target loss",
        "no-cosine": "without the cosine loss",
        "random-init": "random initialisation (same loss)",
    }
    for k, label in labels.items():
        if k in s:
            d = s[k]["acc_mean"] - base
            print(f"| {label} | {d:+.2f} (seeds {s[k]['seeds']}) | {PAPER_DELTA[k]:+.2f} |")
    if "plain" in s:
        d = s["plain"]["acc_mean"] - base
        print(
            f"| no distillation at all (hard labels only) | {d:+.2f} (seeds {s['plain']['seeds']}) | - |"
        )
    if len(sys.argv) > 2:
        sp = json.loads(Path(sys.argv[2]).read_text())
        print()
        print("| batch × length | teacher ms | student ms | speed-up | DistilBERT |")
        print("|---|---|---|---|---|")
        for b, r in sp["batches"].items():
            print(
                f"| {b} × {sp['length']} | {r['teacher_ms']:.2f} | {r['student_ms']:.2f} | "
                f"{r['speedup']:.2f}x | 1.63x (668 s → 410 s, 12 → 6 layers, GLUE STS-B on CPU, batch 1) |"
            )
    sz = rep["size"]
    print()
    print(
        f"Parameters: teacher {sz['teacher']['params']:,}, student {sz['student']['params']:,} "
        f"({100 * (1 - sz['student']['params'] / sz['teacher']['params']):.0f}% fewer); "
        f"safetensors {sz['teacher']['bytes'] / 1e6:.1f} MB → {sz['student']['bytes'] / 1e6:.1f} MB."
    )


if __name__ == "__main__":
    main()
