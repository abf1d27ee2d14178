"""``dk demo``: the shipped digits recipe over several seeds, as one table.

The teacher ensemble is trained once (seed 0's run) and reused by the other seeds, so
every student, plain or distilled, learns from the same teacher with the same budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline import run_seeds
from .report import write_report

RECIPE = "cnn-ensemble_to_mlp256_digits.yaml"


def recipe_path() -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "recipes", here.parent / "recipes"):
        if (base / RECIPE).exists():
            return base / RECIPE
    raise FileNotFoundError(RECIPE)


def run_demo(out: Path, seeds: int = 3) -> str:
    summary = run_seeds(recipe_path(), [], list(range(seeds)), out, force=True)
    reports = [json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in range(seeds)]
    write_report(_mean_report(reports, summary), out)
    return format_summary(summary, out)


def format_summary(summary: dict, out: Path) -> str:
    names = {
        "teacher": "teacher (3 CNNs)",
        "plain": "plain student",
        "student": "distilled student",
    }
    head = f"{'':<20} {'test acc % (mean ± sd)':>24} {'params':>9} {'KB':>7} {'ms @ b1':>8} {'speed-up':>9}"
    lines = [
        f"darkknowledge demo: sklearn digits, {len(summary['seeds'])} seeds",
        "",
        head,
        "-" * len(head),
    ]
    for key, r in summary["rows"].items():
        acc = f"{r['acc_mean']:.2f} ± {r['acc_sd']:.2f}"
        lines.append(
            f"{names.get(key, key):<20} {acc:>24} {r['params']:>9,d} {r['bytes'] / 1024:>7.1f} "
            f"{r['latency_ms_b1']:>8.3f} {r['speedup_vs_teacher']:>8.1f}x"
        )
    z = summary["gain_over_pooled_sd"]
    lines += [
        "",
        f"distillation gain: {summary['gain_points']:+.2f} points = {z:.1f} pooled standard deviations",
        f"report: {out / 'report.md'} (per seed: {out / 'seed_*'})",
    ]
    return "\n".join(lines)


def _mean_report(reports: list[dict], summary: dict) -> dict:
    """Seed 0's report with accuracies and error counts replaced by the means (plots)."""
    rep = json.loads(json.dumps(reports[0]))
    rep["recipe"] = f"demo ({len(summary['seeds'])} seeds; accuracy = mean)"
    for name, row in rep["rows"].items():
        row["accuracy"] = summary["rows"][name]["acc_mean"] / 100
        row["errors"] = round(summary["rows"][name]["errors_mean"])
    return rep
