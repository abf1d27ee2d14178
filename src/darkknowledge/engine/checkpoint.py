"""The one checkpoint format, for every family's training run.

``checkpoint.pt`` (written atomically: a temporary file, then a rename) holds::

    format        "darkknowledge.checkpoint", version  FORMAT_VERSION
    step          optimizer steps done
    model         the trained module's full state (unsharded, on the CPU)
    optimizer     its optimizer state; scheduler: one_cycle's state (else {})
    rng           every process's CPU generator state, and its CUDA one (or None)
    task          the family's own state: data position, augmentation generator,
                  best-so-far weights, ... (tensors, numbers, strings, lists, dicts)
    metrics_bytes metrics.jsonl's length at the checkpoint (cut back to it on resume)
    wall_s, processes, fsdp

It is loaded with ``torch.load(weights_only=True)``: no pickled code runs. A checkpoint
of another format (written before the one engine) is refused with one line, never
misread.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DKError

NAME = "checkpoint.pt"
FORMAT = "darkknowledge.checkpoint"
FORMAT_VERSION = 2


def save(path: Path, state: dict) -> None:
    """Write ``state`` (plus the format marker) atomically to ``path``."""
    state = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save`; anything else is a one-line DKError."""
    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # pickles of older formats, truncated files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DKError(
            f"{path}: not a checkpoint this version can resume ({first}); it was written by "
            "an older darkknowledge or is damaged: rerun with --force or use a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DKError(
            f"{path}: checkpoint written before the one engine (no format marker); "
            "it cannot be resumed exactly: rerun with --force or use a new --out"
        )
    if state.get("version") != FORMAT_VERSION:
        raise DKError(
            f"{path}: checkpoint format version {state.get('version')} but this "
            f"darkknowledge reads {FORMAT_VERSION}: rerun with --force or use a new --out"
        )
    return state
