"""Temperature × width sweep of Hinton, Vinyals & Dean (2015) §3 from a signal store.

Every cell is ``dk run --seeds N`` of RECIPE with the student's two hidden layers set to
WIDTH units, ``loss.hinton_kd.temperature`` set to T and the teacher replaced by the
store (``dk label`` wrote it once), so a cell costs only student training. The first T of
each width also trains the plain baseline (same student, hard labels, same steps).
Finished cells are reused (each run is resumable), so an interrupted sweep continues.
Writes JSON (per cell: errors per seed, mean ± sd) and prints a markdown table.

    .venv/bin/python bench/hinton_sweep.py recipes/hinton2015/sweep_mnist.yaml STORE \\
        --temps 1 2 4 8 20 --widths 30 300 800 --seeds 3 --out runs/sweep \\
        --json docs/results/hinton2015/sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path

import torch

from darkknowledge.pipeline import run_seeds


def _stats(errs: list[int]) -> dict:
    return {
        "errors": errs,
        "errors_mean": st.mean(errs),
        "errors_sd": st.stdev(errs) if len(errs) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("store", help="store folder written by dk label for RECIPE")
    p.add_argument("--temps", type=float, nargs="+", default=[1, 2, 4, 8, 20])
    p.add_argument("--widths", type=int, nargs="+", default=[30, 300, 800])
    p.add_argument("--alpha", type=float, default=None, help="override loss.hinton_kd.alpha")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-plain", action="store_true", help="skip the plain baselines")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--json", help="write the results here")
    p.add_argument("overrides", nargs="*", help="extra key.sub=value overrides")
    a = p.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    store = Path(a.store).resolve()
    out = Path(a.out).resolve()
    seeds = list(range(a.seeds))
    cells, plain = [], {}
    for w in a.widths:
        for i, t in enumerate(a.temps):
            ov = [
                *a.overrides,
                f"student.model.hidden=[{w}, {w}]",
                f"loss.hinton_kd.temperature={t:g}",
                f"teacher={{kind: store, path: '{store}'}}",
                f"eval.plain_baseline={'true' if i == 0 and not a.no_plain else 'false'}",
            ]
            if a.alpha is not None:
                ov.append(f"loss.hinton_kd.alpha={a.alpha:g}")
            name = f"w{w}_T{t:g}" + ("" if a.alpha is None else f"_a{a.alpha:g}")
            t0 = time.perf_counter()
            summary = run_seeds(a.recipe, ov, seeds, out / name, resume=True)
            wall = time.perf_counter() - t0
            rows = summary["rows"]
            if "plain" in rows:
                plain[w] = _stats(rows["plain"]["errors"])
            cell = {"width": w, "T": t, **_stats(rows["student"]["errors"]), "wall_s": wall}
            cells.append(cell)
            print(
                f"width {w} T {t:g}: {cell['errors_mean']:.1f} ± {cell['errors_sd']:.1f} "
                f"errors ({wall:.0f} s)",
                flush=True,
            )
    result = {
        "recipe": a.recipe,
        "store": str(store),
        "seeds": seeds,
        "alpha": a.alpha,
        "overrides": a.overrides,
        "cells": cells,
        "plain": {str(k): v for k, v in plain.items()},
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def table(result: dict) -> str:
    """Markdown: one row per width, test errors mean ± sd per temperature, plain last."""
    temps = sorted({c["T"] for c in result["cells"]})
    widths = sorted({c["width"] for c in result["cells"]})
    head = "| width | " + " | ".join(f"T = {t:g}" for t in temps) + " | plain |"
    lines = [head, "|---" * (len(temps) + 2) + "|"]
    for w in widths:
        by_t = {c["T"]: c for c in result["cells"] if c["width"] == w}
        best = min(by_t.values(), key=lambda c: c["errors_mean"])["T"]
        cells = []
        for t in temps:
            c = by_t.get(t)
            s = "" if c is None else f"{c['errors_mean']:.1f} ± {c['errors_sd']:.1f}"
            cells.append(f"**{s}**" if c is not None and t == best else s)
        pl = result["plain"].get(str(w))
        ptxt = "" if pl is None else f"{pl['errors_mean']:.1f} ± {pl['errors_sd']:.1f}"
        lines.append(f"| 2×{w} | " + " | ".join(cells) + f" | {ptxt} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
