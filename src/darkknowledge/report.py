"""``report.json`` plus a readable ``report.md`` with plots (accuracy vs size, a
reliability diagram)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DKError


def table(report: dict) -> str:
    """A fixed-width table of the report's rows."""
    head = (
        f"{'model':<10} {'acc %':>7} {'errors':>7} {'NLL':>6} {'ECE':>6} {'agree':>6} "
        f"{'params':>9} {'KB':>8} {'ms@b1':>7} {'ex/s@256':>9} {'speed-up':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in report["rows"].items():
        agree = f"{100 * r['teacher_agreement']:.1f}" if "teacher_agreement" in r else "-"
        lat = f"{r['latency_ms_b1']:.3f}" if "latency_ms_b1" in r else "-"
        tp = f"{r['throughput_b256']:.0f}" if "throughput_b256" in r else "-"
        sp = f"{r['speedup_vs_teacher']:.1f}x" if "speedup_vs_teacher" in r else "-"
        lines.append(
            f"{name:<10} {100 * r['accuracy']:>7.2f} {r['errors']:>7d} {r['nll']:>6.3f} "
            f"{r['ece']:>6.3f} {agree:>6} {r['params']:>9,d} {r['bytes'] / 1024:>8.1f} "
            f"{lat:>7} {tp:>9} {sp:>8}"
        )
    return "\n".join(lines)


def seeds_table(summary: dict) -> str:
    """Mean ± sd over seeds per row (from ``run_seeds``)."""
    head = f"{'model':<14} {'acc % (mean ± sd)':>18} {'errors (mean ± sd)':>19} {'params':>10} {'speed-up':>8}"
    lines = [f"seeds: {summary['seeds']}", head, "-" * len(head)]
    for name, r in summary["rows"].items():
        sp = f"{r['speedup_vs_teacher']:.1f}x" if "speedup_vs_teacher" in r else "-"
        lines.append(
            f"{name:<14} {r['acc_mean']:>10.2f} ± {r['acc_sd']:<5.2f} {r['errors_mean']:>11.1f} ± "
            f"{r['errors_sd']:<5.1f} {r['params']:>10,d} {sp:>8}"
        )
    if "gain_points" in summary:
        lines.append(
            f"distillation gain {summary['gain_points']:+.2f} points = "
            f"{summary['gain_over_pooled_sd']:.1f} pooled sd"
        )
    if summary.get("gap_closed") is not None:
        lines.append(
            f"gap closed (plain − distilled) / (plain − teacher): {100 * summary['gap_closed']:.0f}%"
        )
    return "\n".join(lines)


def write_report(report: dict, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, run_dir / "report.json")
    plots = _plots(report, run_dir)
    md = [
        f"# Report: {report['recipe']}",
        "",
        f"Data: {report['data']}; sizes {report['sizes']}.",
        f"Loss: `{json.dumps(report['loss'])}`.",
        "",
        "Test set:",
        "",
        "```",
        table(report),
        "```",
        "",
    ]
    series = {n: run_dir / n / "metrics.jsonl" for n in ("student", "plain")}
    curves = training_curves(run_dir, series)
    plots += [curves] if curves is not None else []
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    return run_dir / "report.md"


def _plots(report: dict, run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    out = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in rows.items():
        ax.scatter(r["params"], 100 * r["accuracy"], s=60, label=name)
        ax.annotate(
            name, (r["params"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5)
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "accuracy_vs_size.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for name, r in rows.items():
        bins = r.get("reliability", [])
        if bins:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                "o-",
                label=f"{name} (ECE {r['ece']:.3f})",
            )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(run_dir / "reliability.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    return out


def run_family(run_dir: str | Path) -> str:
    """The family a run folder was written by (its run.json; older classify runs: none)."""
    marker = Path(run_dir) / "run.json"
    if marker.exists():
        try:
            fam = json.loads(marker.read_text()).get("family")
        except (json.JSONDecodeError, AttributeError):
            raise DKError(f"{marker}: corrupt run marker") from None
        if fam in ("classify", "text", "causal_lm"):
            return fam
        raise DKError(f"{marker}: unknown family {fam!r}")
    if (Path(run_dir) / "config.json").exists():  # a text run from before run.json
        return "text"
    return "classify"


def load_report(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "report.json"
    if not Path(run_dir).is_dir():
        raise DKError(f"{run_dir}: no such run directory")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DKError(f"{path}: missing; the run has not finished (dk run ... --resume)") from None
    except json.JSONDecodeError as e:
        raise DKError(f"{path}: corrupt report ({e})") from None


def training_curves(run_dir: str | Path, series: dict[str, Path], name: str = "curves.png"):
    """The training loss per step (solid) and the validation loss where it was logged
    (dashed) of each ``metrics.jsonl`` in ``series`` ({label: file}), in one plot; the
    plot's path, or None when no file has a training line."""
    curves = {}
    for label, f in series.items():
        if not Path(f).exists():
            continue
        train, val = [], []
        for line in Path(f).read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rest still plots
            if not isinstance(m, dict) or not isinstance(m.get("step"), int):
                continue
            if "lr" in m and isinstance(m.get("loss"), int | float):
                train.append((m["step"], m["loss"]))
            if isinstance(m.get("val_loss"), int | float):
                val.append((m["step"], m["val_loss"]))
        if train:
            curves[label] = (train, val)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (label, (train, val)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(*zip(*train, strict=True), color=color, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=color, ms=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
