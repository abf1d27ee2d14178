"""Run folders: the rules every family's ``dk run`` follows.

A run folder holds ``config.yaml`` (the resolved recipe) and ``run.json`` (which tool
and engine version wrote it). An existing run is continued (``--resume``, only with the
same recipe) or replaced (``--force``); one written before the one engine is refused
with one line (its checkpoints cannot be resumed exactly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..errors import DKError
from .checkpoint import FORMAT_VERSION

MARKER = "run.json"


def first_difference(a, b, prefix: str = "") -> str:
    """The dotted key of the first difference between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "(top level)"


def prepare_run_dir(run_dir: Path, resolved: str, family: str, resume: bool, force: bool):
    """Make ``run_dir`` ready for a run of the recipe dumped as ``resolved`` (YAML)."""
    cfg_file, marker = run_dir / "config.yaml", run_dir / MARKER
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
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
