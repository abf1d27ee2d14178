"""Test-set quality of the teacher behind a signal store, for the rows of a Hinton (2015)
results page: a store holds no test-set outputs, so ``dk run`` from a store reports no
teacher row. This loads the teacher that ``dk label`` trained into ``STORE/teacher`` (or a
``dk run`` folder's ``teacher/``) and prints its test accuracy, errors and errors by class
as JSON; for a store, also how often the stored signals agree with the transfer set's
labels (what the student is taught).

    .venv/bin/python bench/hinton_teacher_eval.py RECIPE STORE_OR_RUN_DIR [OVERRIDES] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from darkknowledge.data import load_data
from darkknowledge.evaluate import param_count, predict_logits, quality
from darkknowledge.pipeline import build_teacher
from darkknowledge.recipe_io import load_recipe


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("folder", help="a store (or run) folder holding teacher/ trained by dk")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as given to dk label")
    a = p.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    recipe, _ = load_recipe(a.recipe, a.overrides)
    if recipe.teacher is None or recipe.teacher.kind == "store":
        sys.exit("error: the recipe's teacher must be kind module or ensemble")
    folder = Path(a.folder)
    teacher_dir = folder / "teacher"
    if not teacher_dir.is_dir():
        sys.exit(f"error: {teacher_dir} does not exist: label or run the recipe first")
    data = load_data(recipe.data)
    # resume=True: members already trained are loaded from FOLDER/teacher, never retrained
    # (a member with no model.safetensors there would be trained: refuse that instead).
    need = (
        [teacher_dir / "model.safetensors"]
        if recipe.teacher.kind == "module"
        else [
            teacher_dir / f"member_{i}" / "model.safetensors"
            for i in range(len(recipe.teacher.members))
        ]
    )
    missing = [str(n) for n in need if not n.exists()]
    if missing:
        sys.exit(f"error: no trained teacher at {', '.join(missing)}")
    teacher = build_teacher(recipe, data, folder, resume=True)
    logits = predict_logits(teacher, data.test)
    row = quality(logits, data.test.y, None, recipe.eval.ece_bins)
    row["params"] = param_count(teacher.modules())
    out = {"recipe": recipe.name, "folder": str(folder), "teacher": row}
    if (folder / "manifest.json").exists() and data.transfer.y is not None:
        # What the student is taught: the stored signals against the transfer set's labels.
        from darkknowledge.store import SignalStore

        lg = SignalStore(folder).get(data.transfer.ids).logits.float()  # (N, V)
        y = data.transfer.y
        out["store_on_transfer_set"] = {
            "accuracy": float((lg.argmax(-1) == y).float().mean()),
            "errors": int((lg.argmax(-1) != y).sum()),
            "n": len(y),
            "mean_prob_true_class": float(lg.softmax(-1)[torch.arange(len(y)), y].mean()),
        }
    text = json.dumps(out, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
