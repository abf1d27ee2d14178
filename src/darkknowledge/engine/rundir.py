"""Run folders: the rules every family's ``dk run`` follows.

A run folder holds ``config.yaml`` (the resolved recipe) and ``run.json`` (which tool,
family and engine version wrote it). An existing run is continued (``--resume``, only
with the same recipe) or replaced (``--force``); one written before the one engine is
refused on ``--resume`` with one line (its checkpoints cannot be resumed exactly).

``--force`` deletes only a folder this tool made: one with ``run.json``, or (made before
the marker existed) one whose every entry is a name a run writes. It does not delete at
once: the old run is moved aside (``.<name>.replaced``), and deleted only when the new
run has written its first checkpoint or finished (:func:`commit_replaced`); if the new
run fails before that (a bad data file, a corrupt teacher checkpoint), the old run is
put back (:func:`restore_replaced`). Nothing the user has is lost to a typo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..errors import DKError
from ..recipe_io import first_difference
from .checkpoint import FORMAT_VERSION

MARKER = "run.json"
# what the families write into a run folder (runs made before run.json existed)
RUN_ENTRIES = {
    "config.yaml", "config.json", "report.json", "report.md", "summary.json",
    "preflight.json", "accuracy_vs_size.png", "reliability.png", "teacher", "student",
    "plain", "students", "signals", "seqkd",
}  # fmt: skip
_replaced: dict[Path, Path] = {}  # new run folder -> the old run moved aside


def made_by_this_tool(folder: Path) -> bool:
    """A run folder this tool wrote: its marker, or only entries a run writes."""
    if (folder / MARKER).is_file():
        return True
    names = {p.name for p in folder.iterdir()}
    own = {n for n in names if n in RUN_ENTRIES or n.startswith("seed_")}
    return bool(names) and names == own and ("config.yaml" in names or "config.json" in names)


def prepare_run_dir(run_dir: Path, resolved: str, family: str, resume: bool, force: bool):
    """Make ``run_dir`` ready for a run of the recipe dumped as ``resolved`` (YAML)."""
    cfg_file, marker = run_dir / "config.yaml", run_dir / MARKER
    if run_dir.exists() and not run_dir.is_dir():
        raise DKError(f"{run_dir}: exists and is not a folder; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            if not made_by_this_tool(run_dir):
                raise DKError(
                    f"{run_dir}: not a darkknowledge run folder (no {MARKER}, and it holds "
                    "files a run does not write); --force replaces only runs this tool "
                    "made: choose another --out"
                )
            here = Path.cwd().resolve()
            if here == run_dir.resolve() or run_dir.resolve() in here.parents:
                raise DKError(
                    f"{run_dir}: --force would move aside the folder you are working in; "
                    "run from outside it (cd ..) or choose another --out"
                )
            aside = run_dir.resolve().with_name(f".{run_dir.resolve().name}.replaced")
            if aside.exists():  # a replacement that never finished: the older run stays
                shutil.rmtree(run_dir)
            else:
                run_dir.rename(aside)
            _replaced[run_dir.resolve()] = aside
        elif not resume:
            raise DKError(
                f"{run_dir}: run directory already exists; add --resume to continue it, "
                "--force to start over, or --out for a new one"
            )
        elif not marker.exists():
            raise DKError(
                f"{run_dir}: written by an older darkknowledge (before the one engine; no "
                f"{MARKER}); its checkpoints cannot be resumed exactly: rerun with --force "
                "or use --out"
            )
        elif cfg_file.exists() and cfg_file.read_text() != resolved:
            old = yaml.safe_load(cfg_file.read_text())
            new = yaml.safe_load(resolved)
            key = first_difference(old, new)
            raise DKError(
                f"{run_dir}: cannot resume, the recipe differs from the run's config.yaml "
                f"at {key}; resume with the same recipe and overrides, or use --out"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(resolved)
    marker.write_text(
        json.dumps({"tool": "darkknowledge", "family": family, "engine": FORMAT_VERSION})
    )


def commit_replaced(path: Path | None = None) -> None:
    """The new run has a checkpoint (or finished) under ``path`` (None: every run):
    delete the old runs it replaced."""
    for new in list(_replaced):
        if path is None or new == path.resolve() or new in path.resolve().parents:
            aside = _replaced.pop(new)
            shutil.rmtree(aside, ignore_errors=True)


def restore_replaced() -> None:
    """The new runs failed before any checkpoint: put the old runs back."""
    for new, aside in list(_replaced.items()):
        if aside.exists():
            shutil.rmtree(new, ignore_errors=True)
            aside.rename(new)
        _replaced.pop(new)
