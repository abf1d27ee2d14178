"""Errors of students distilled without one class, as the class's logit bias is raised.

Hinton, Vinyals & Dean (2015) §3 left every 3 out of MNIST's transfer set and then raised
the student's class-3 bias by 3.5. The right amount depends on how the student's logits
are scaled, so this prints test errors (total and on the class) for a range of shifts,
mean over the seed runs of a ``dk run --seeds`` folder, from the saved students.

    .venv/bin/python bench/hinton_bias_shift.py RECIPE RUN_DIR [--cls 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

import torch

import darkknowledge as dk
from darkknowledge.data import load_data
from darkknowledge.evaluate import predict_logits
from darkknowledge.recipe_io import load_recipe


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("run_dir", help="a dk run --seeds folder (seed_*/student)")
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--shifts", type=float, nargs="+", default=[0, 1, 2, 3, 3.5, 4, 5, 6, 8])
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe, _ = load_recipe(a.recipe, [])
    test = load_data(recipe.data).test
    runs = sorted(Path(a.run_dir).glob("seed_*/student"))
    if not runs:
        raise SystemExit(f"error: no seed_*/student folders in {a.run_dir}")
    logits = [predict_logits(dk.load_model(r), test) for r in runs]
    is_c = test.y == a.cls
    rows = []
    for s in a.shifts:
        tot, onc = [], []
        for lg in logits:
            lg = lg.clone()
            lg[:, a.cls] += s
            wrong = lg.argmax(-1) != test.y
            tot.append(int(wrong.sum()))
            onc.append(int((wrong & is_c).sum()))
        rows.append({"shift": s, "errors": tot, "errors_on_class": onc})
        print(
            f"shift {s:4g}: errors {st.mean(tot):6.1f} {tot}  on class {a.cls} "
            f"({int(is_c.sum())} images): {st.mean(onc):6.1f} {onc}"
        )
    out = {
        "run_dir": a.run_dir,
        "class": a.cls,
        "seeds": [r.parent.name for r in runs],
        "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
