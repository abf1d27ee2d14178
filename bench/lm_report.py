"""Tables for docs/results/llm.md from the JSON the LM benchmarks wrote.

.venv/bin/python bench/lm_report.py   # prints the markdown tables
"""

from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parents[1] / "docs/results"


def seeds_table() -> str:
    p = RES / "llm_seeds.json"
    if not p.exists():
        return "(llm_seeds.json not written yet)"
    s = json.loads(p.read_text())
    names = {
        "plain": "plain student (CE)",
        "fkl": "forward KL",
        "rkl": "reverse KL",
        "gkd": "on-policy GKD (λ 0.5, JSD β 0.5)",
    }
    rows = [
        "| model | val loss (mean ± sd) | per seed | train s / run |",
        "|---|---|---|---|",
        f"| teacher 4 × 128 ({s['teacher_steps']} steps) | {s['teacher_val_loss']:.4f} | one run | "
        f"{s['teacher_train_wall_s']:.0f} |",
    ]
    for v, r in s["variants"].items():
        per = ", ".join(f"{x:.4f}" for x in r["val_loss"])
        rows.append(
            f"| {names.get(v, v)} 2 × 64 | {r['mean']:.4f} ± {r['sd']:.4f} | {per} | "
            f"{r['wall_s_mean']:.0f} |"
        )
    out = "\n".join(rows)
    if "fkl_vs_plain" in s:
        f = s["fkl_vs_plain"]
        out += (
            f"\n\nForward KL vs plain: gap {f['gap']:.4f} nats = "
            f"{f['gap_in_pooled_sd']:.1f} pooled sd (pooled sd {f['pooled_sd']:.4f})."
        )
    return out


def memory_table(name: str = "llm_memory.json") -> str:
    p = RES / name
    if not p.exists():
        return f"({name} not written yet)"
    s = json.loads(p.read_text())
    key = "peak_cuda_mb" if s["setup"]["device"] == "cuda" else "peak_rss_mb"
    mr, tr = s.get("memory_ratio_vs_plain_hf", {}), s.get("time_ratio_vs_plain_hf", {})
    label = {
        "plain_hf": "plain CE, full logits (the baseline)",
        "plain_chunked": "plain CE, chunked head",
        "kd_chunked": "forward KL vs live teacher, chunked",
        "kd_unchunked": "forward KL vs live teacher, unchunked",
        "kd_topk_store": "forward KL from stored top-64, chunked",
        "kd_topk_unchunked": "forward KL from stored top-64, unchunked",
    }
    # runs since the interleaved rounds also give ratios to the chunked plain step
    mc = s.get("memory_ratio_vs_plain_chunked")
    tc = s.get("time_ratio_vs_plain_chunked", {})
    nan = float("nan")
    head = "| step | peak RSS MB | ÷ plain | step s (median) | ÷ plain |"
    rule = "|---|---|---|---|---|"
    if mc is not None:
        head += " peak ÷ chunked plain | step ÷ chunked plain |"
        rule += "---|---|"
    rows = [head, rule]
    for m, r in s["rows"].items():
        row = (
            f"| {label.get(m, m)} | {r[key]:.0f} | {mr.get(m, nan):.2f} | "
            f"{r['step_s_median']:.1f} | {tr.get(m, nan):.2f} |"
        )
        if mc is not None:
            row += f" {mc.get(m, nan):.3f} | {tc.get(m, nan):.2f} |"
        rows.append(row)
    return "\n".join(rows)


def trl_table() -> str:
    p = RES / "llm_trl.json"
    if not p.exists():
        return "(llm_trl.json not written yet)"
    s = json.loads(p.read_text())
    rows = [
        "| | s / step | peak RSS MB | val loss after "
        f"{s['steps']} steps (start {s['initial_val_loss']:.3f}) |",
        "|---|---|---|---|",
    ]
    for side, r in s["rows"].items():
        name = "darkknowledge" if side == "ours" else "TRL GKDTrainer 1.16"
        rows.append(
            f"| {name} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['val_loss']:.4f} |"
        )
    rows.append(
        f"\nRatios (ours ÷ TRL): step time {s['step_time_ratio_ours_over_trl']:.2f}, "
        f"peak RSS {s['peak_rss_ratio_ours_over_trl']:.2f}."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print("## Seeds\n\n" + seeds_table())
    print("\n## Memory and speed\n\n" + memory_table())
    print("\n## Memory and speed (run 3)\n\n" + memory_table("llm_memory_run3.json"))
    print("\n## TRL\n\n" + trl_table())
