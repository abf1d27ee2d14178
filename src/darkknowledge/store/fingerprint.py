"""Fingerprints: SHA-256 digests of what stored signals depend on.

A store's manifest holds one entry per field below; training from a store compares the
fields it can compute for the run and refuses on the first that differs, by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import DKError

# The fields, in the order a mismatch is reported.
FIELDS = (
    "teacher",  # weights of every teacher network (+ how they are combined)
    "data",  # the labelled inputs, as the teacher saw them
    "example_ids",  # the stable ids of those inputs, in order
    "preprocessing",  # how raw data became those inputs
    "tokenizer",  # tokenizer files (None for images)
    "signal",  # dense | topk
    "temperature",  # the temperature the stored probabilities were computed at
    "k",  # top-k size (None for dense)
    "dtype",  # storage dtype of the float signals
    "hidden",  # names of stored hidden layers
)


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy())  # the tensor's memory as it is: no copy to bytes first
    return h.hexdigest()


def modules_digest(modules: list[nn.Module], extra: dict | None = None) -> str:
    """SHA-256 of the weights (and buffers) of ``modules``, in order, plus ``extra``.

    A tensor listed under several names (tied weights, e.g. an output layer sharing the
    token embedding) is hashed once; its digest enters under each name as before."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    done: dict[tuple, str] = {}
    for i, m in enumerate(modules):
        for name, v in sorted(m.state_dict().items()):
            key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride())
            if key not in done or v.numel() == 0:
                done[key] = tensor_digest(v)
            h.update(f"{i}.{name}".encode())
            h.update(done[key].encode())
    return h.hexdigest()


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def files_digest(paths: list[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def first_difference(stored: dict, expected: dict) -> str | None:
    """The first fingerprint field present in ``expected`` whose value differs."""
    for f in (*FIELDS, *sorted(set(expected) - set(FIELDS))):
        if f in expected and stored.get(f) != expected[f]:
            return f
    return None


def _short(v) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 and isinstance(v, str) else s


def check(stored: dict, expected: dict, where: str) -> None:
    """Raise a one-line :class:`DKError` naming the first field that differs."""
    f = first_difference(stored, expected)
    if f is not None:
        raise DKError(
            f"{where}: fingerprint field '{f}' differs: the store has {_short(stored.get(f))}, "
            f"this run needs {_short(expected[f])}; relabel with `dk label` for this run "
            "(or point teacher.path at the store made for it)"
        )
