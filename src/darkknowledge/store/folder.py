"""Store folders: what ``dk label`` and ``dk store from-api`` may write into, and what
``--force`` may delete.

A store folder holds only what this tool writes there: ``manifest.json`` (written before
any shard, so it marks the folder from the start), ``shards/`` (``shard-NNNNN`` and
``tailsum-NNNNN`` safetensors), ``prior``/``head``/``inputs.safetensors``, the ``.tmp``
names of those being written, and ``teacher/`` when ``dk label`` trained the teacher (its
``teacher/recipe.json`` is written before it trains). A folder holding anything else is
refused with one line naming it, and nothing in it is touched.

A store this tool made is recognised by its marker: a ``manifest.json`` whose ``format``
is ``darkknowledge.store/…``, a ``teacher/recipe.json`` (a ``dk label`` folder killed
while its teacher trained), or, for a store whose manifest is lost or damaged, the
layout itself (``shards/`` holding shard files). ``--force`` replaces only such a folder,
and not at once: the old store's files (and its teacher, when it is not reused) are
moved aside into ``.<name>.replaced`` beside it and deleted only once the new store has
its first shard (:func:`commit_replaced`); if the new labelling fails before that (missing
data, a bad teacher, a bad label setting, an interrupted teacher training) the old store
is put back (:func:`restore_replaced`; ``dk`` calls it, a Python caller of
``label(..., force=True)`` may). A ``.<name>.replaced`` left by a killed replacement is
never deleted silently: the next ``--force`` is refused until it is removed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import DKError
from .format import HEAD, INPUTS, MANIFEST, PRIOR, SHARDS

TEACHER = "teacher"
TEACHER_RECIPE = "recipe.json"  # in STORE/teacher/: the recipe its networks are trained for
STORE_FILES = (MANIFEST, SHARDS, PRIOR, HEAD, INPUTS)  # the store proper, without teacher/
_OWN = {*STORE_FILES, TEACHER} | {f"{n}.tmp" for n in (MANIFEST, PRIOR, HEAD, INPUTS)}
_SHARD = re.compile(r"(shard|tailsum)-\d{5}\.safetensors(\.tmp)?")
_replaced: dict[Path, tuple[Path, list[str]]] = {}  # store -> (aside folder, entries moved)


def foreign_entries(out: Path) -> list[str]:
    """What in ``out`` this tool does not write into a store (paths relative to ``out``)."""
    bad = []
    for p in sorted(out.iterdir()):
        if p.name not in _OWN:
            bad.append(p.name)
        elif (p.name in (SHARDS, TEACHER)) != (p.is_dir() and not p.is_symlink()):
            bad.append(p.name)  # a file where a folder belongs, or the other way round
        elif p.name == SHARDS:
            bad += [
                f"{SHARDS}/{q.name}" for q in sorted(p.iterdir()) if not _SHARD.fullmatch(q.name)
            ]
    return bad


def has_marker(out: Path) -> bool:
    """``out`` is recognisably a store (or ``dk label`` folder) this tool made."""
    try:
        m = json.loads((out / MANIFEST).read_bytes())
        if isinstance(m, dict) and str(m.get("format", "")).startswith("darkknowledge.store/"):
            return True
    except (OSError, ValueError, RecursionError):
        pass
    if (out / TEACHER / TEACHER_RECIPE).is_file():
        return True
    shards = out / SHARDS
    return shards.is_dir() and any(_SHARD.fullmatch(q.name) for q in shards.iterdir())


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_store_folder(out: Path, force: bool) -> None:
    """Refuse ``out`` (one line, nothing touched) unless a store may be written there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DKError(f"{out}: exists and is not a folder; choose another --out")
    foreign = foreign_entries(out)
    if foreign:
        raise DKError(
            f"{out}: holds {_listing(foreign)}, which a store does not; a store needs a "
            "folder of its own"
            + (
                " (--force replaces only a store this tool made; nothing was deleted)"
                if force
                else ""
            )
            + ": choose another --out"
        )


def replace_store(out: Path, keep_teacher: bool = True) -> None:
    """``--force``: move the store in ``out`` (and its ``teacher/`` unless ``keep_teacher``)
    aside, after :func:`check_store_folder`; refused when ``out`` has no marker."""
    check_store_folder(out, force=True)
    if not out.is_dir():
        return
    names = [n for n in (*STORE_FILES, TEACHER) if (out / n).exists()]
    names += [p.name for p in out.glob("*.tmp")]
    if keep_teacher and TEACHER in names:
        names.remove(TEACHER)
    if not names:
        return
    key = out.resolve()
    if key in _replaced:  # already moved aside in this process: these files are new
        for n in names:
            _remove(out / n)
        return
    if not has_marker(out):
        raise DKError(
            f"{out}: not a darkknowledge store (no manifest.json with its format, no "
            f"{TEACHER}/{TEACHER_RECIPE}); --force replaces only a store this tool made, and "
            "nothing was deleted: choose another --out"
        )
    aside = key.with_name(f".{key.name}.replaced")  # resolved: `--out .` has a name too
    if aside.exists():
        raise DKError(
            f"{aside}: an earlier --force of {out} did not finish and kept the store it "
            "replaced there; delete it (or move it back) first, nothing was deleted"
        )
    aside.mkdir()
    for n in names:
        (out / n).rename(aside / n)
    _replaced[key] = (aside, names)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def commit_replaced(path: Path | None = None) -> None:
    """The new store at ``path`` (None: every store) has a shard: delete the old store it
    replaced."""
    for key in list(_replaced):
        if path is None or key == path.resolve():
            aside, _ = _replaced.pop(key)
            shutil.rmtree(aside, ignore_errors=True)


def restore_replaced() -> None:
    """The new labellings failed before their first shard: put the old stores back (the
    new store's files go, and its teacher when the old one was moved aside)."""
    for key, (aside, moved) in list(_replaced.items()):
        if aside.exists():
            key.mkdir(parents=True, exist_ok=True)
            for n in [*STORE_FILES, *(p.name for p in key.glob("*.tmp")), *moved]:
                _remove(key / n)
            for p in aside.iterdir():
                p.rename(key / p.name)
            aside.rmdir()
        _replaced.pop(key)
