"""A `dk label` folder is reused only for the recipe it was made from (any family)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DKError
from ..recipe_io import first_difference
from .folder import TEACHER_RECIPE, check_store_folder, replace_store
from .format import MANIFEST, write_json
from .reader import read_manifest


def prepare_label_folder(out: Path, record: dict, force: bool, trains_teacher: bool) -> None:
    """Refuse to reuse ``out`` (its store or its trained teacher) for another recipe.

    The recipe a store was labelled from is the manifest's ``recipe``; the one the
    teacher in ``out/teacher`` was trained for is ``out/teacher/recipe.json`` (written
    before it trains, so a kill during its training is covered too). A folder holding
    files a store does not is refused first (:func:`.folder.check_store_folder`). With
    ``force`` the old store, and its teacher when it was trained for another recipe (or
    for one not recorded), are moved aside, to be deleted once the new store has its first
    shard (:func:`.folder.replace_store`)."""
    check_store_folder(out, force)
    teacher_dir, mine = out / "teacher", out / "teacher" / TEACHER_RECIPE
    store_old = teacher_old = None  # None: nothing there; a str: there, no usable record
    if (out / MANIFEST).exists() and not force:
        store_old = read_manifest(out).get("recipe", "none")
    if mine.exists():
        try:
            teacher_old = json.loads(mine.read_text())
        except (OSError, ValueError):
            teacher_old = "unreadable"
    elif teacher_dir.exists():
        teacher_old = "none"
    if not force:
        for old, source in ((store_old, "the store"), (teacher_old, "its trained teacher")):
            if old is None or old == record:
                continue
            if not isinstance(old, dict):
                raise DKError(
                    f"{out}: {source} has no recipe record to compare with (made by an older "
                    "darkknowledge, or not by `dk label`); use --force to relabel it or "
                    "--out for a new store"
                )
            raise DKError(
                f"{out}: {source} was made from a different recipe: "
                f"{first_difference(old, record)} differs; use --force to relabel it "
                "(retraining the teacher) or --out for a new store"
            )
    else:  # a teacher trained for another recipe is trained again
        replace_store(out, keep_teacher=teacher_old is None or teacher_old == record)
    if trains_teacher:  # a network trains in teacher/: record what it is trained for
        teacher_dir.mkdir(parents=True, exist_ok=True)
        write_json(mine, record)
