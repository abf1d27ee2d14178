"""The on-disk format of a signal store: a folder with ``manifest.json`` and shards.

::

    STORE/
      manifest.json                 what the signals are and what they depend on
      shards/shard-00000.safetensors rows [0, S) of the labelled examples, in order
      shards/shard-00001.safetensors rows [S, 2S) ...

Each shard is a plain safetensors file (no pickle; readable by any safetensors tool)
holding ``ids (n,)`` int64 and the signal tensors for its ``n`` rows:

- dense: ``logits (n, [T,] V)``
- top-k: ``topk_ids (n, [T,] K)`` (uint16 when V ≤ 65,536, else int32),
  ``topk_logprobs (n, [T,] K)`` and ``tail_mass (n, [T])`` fp32
- sampled: ``sample_ids (n, [T,] K)`` (as top-k ids) and ``sample_counts (n, [T,] K)``
  (uint8 when K ≤ 255, else uint16): the distinct ids of K draws from the teacher at
  the store temperature and how often each was drawn (padding: id 0, count 0)
- head: ``head_hidden (n, [T,] H)``, the input of the teacher's output layer, whose
  weight and bias are stored once in ``head.safetensors`` beside the manifest
- sequences also ``mask (n, T)`` uint8; optional ``hidden.<layer> (n, [T,] H)``.

Shards are read by memory-mapping the file at the offsets in its header (zero copy).
A shard is written to a temporary name, fsynced, then renamed: after a crash a shard
either exists whole or not at all, so rerunning the labeller only computes what is
missing. ``manifest.json`` lists the shards and their SHA-256 once all are written;
readers check it against one schema (:mod:`.manifest`), keep every file inside the store
folder, and check each shard's SHA-256 before its signals are first used (once per
process, :func:`verify_file`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DKError

FORMAT = "darkknowledge.store/v1"
MANIFEST = "manifest.json"
SHARDS = "shards"
PRIOR = "prior.safetensors"  # top-k stores: the tail prior, (V,) log-probabilities
HEAD = "head.safetensors"  # head stores: the teacher's output layer (weight (V, H), bias)
INPUTS = "inputs.safetensors"  # stores of sampled responses: token ids (N, T), example ids

# Storage dtypes of the float signals. "q8": log-probabilities quantised to 8 bits
# (uint8 code c ↦ −c·Q8_STEP nats; 0 … −25.5 nats), top-k only.
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Q8_STEP = 0.1

_ST_TO_NP = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.int16,  # raw bits; viewed as bfloat16 in torch
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "U16": np.uint16,
    "U8": np.uint8,
    "I8": np.int8,
    "BOOL": np.bool_,
}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed through one reused buffer (about 1 GB/s on one core)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# Files whose SHA-256 this process has checked: (path, device, inode, size, mtime) → digest.
# A file is hashed once per process however often a store is opened; a file replaced or
# rewritten since (another inode, size or mtime) is hashed again.
_VERIFIED: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remember_verified(path: Path, digest: str) -> None:
    """Record that ``path`` (just written and hashed by this process) has ``digest``."""
    _VERIFIED[_file_key(path)] = digest


def verify_file(path: Path, sha256: str, what: str) -> None:
    """Refuse (one line naming the file) unless ``path`` has the SHA-256 ``sha256``;
    hashed at most once per process (see ``_VERIFIED``)."""
    key = _file_key(path)
    if _VERIFIED.get(key) == sha256:
        return
    digest = sha256_file(path)
    if digest != sha256:
        raise DKError(
            f"{path}: {what} is damaged or was altered: its SHA-256 is {digest[:16]}…, "
            f"the manifest says {sha256[:16]}…; relabel the store (`dk label --force`)"
        )
    _VERIFIED[key] = digest


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow it
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    """Atomically write one shard (tmp file, fsync, rename, fsync the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT}
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the byte offset where its data begins.

    Every tensor entry is checked (known dtype, a shape of counts, offsets that hold
    exactly that many bytes and lie inside the file): a damaged or hand-made header
    gets one line naming the file and the tensor, never a traceback."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DKError(f"{path}: truncated shard (no safetensors header)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise DKError(f"{path}: not a safetensors shard (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise DKError(f"{path}: not a safetensors shard (unreadable header)") from None
    if not isinstance(header, dict):
        raise DKError(f"{path}: not a safetensors shard (the header is not an object)")
    start = 8 + n
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, size - start)
    return header, start


def _check_entry(path: Path, name: str, info, room: int) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise DKError(f"{path}: tensor {name!r} has a malformed header entry")
    dt = _ST_TO_NP.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dt is None:
        raise DKError(f"{path}: tensor {name!r} has no dtype this reader knows")
    shape, offs = info["shape"], info["data_offsets"]
    if not (
        isinstance(shape, list)
        and all(type(d) is int and d >= 0 for d in shape)
        and isinstance(offs, list)
        and len(offs) == 2
        and all(type(o) is int for o in offs)
        and 0 <= offs[0] <= offs[1]
    ):
        raise DKError(f"{path}: tensor {name!r} has a malformed shape or offsets")
    if offs[1] - offs[0] != math.prod(shape) * np.dtype(dt).itemsize:
        raise DKError(f"{path}: tensor {name!r}: its offsets do not hold its shape {shape}")
    if offs[1] > room:
        raise DKError(f"{path}: truncated shard (tensor {name!r} runs past the end)")


def map_shard(path: Path, header: tuple[dict, int] | None = None) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a shard (read-only, zero copy); ``header``: the
    result of :func:`read_header` when the caller already has it."""
    header, start = header or read_header(path)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_TO_NP[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype=dt)
        else:
            out[name] = np.memmap(path, dtype=dt, mode="r", offset=start + begin, shape=shape)
        if info["dtype"] == "BF16":
            out[name] = _BF16(out[name])  # type: ignore[assignment]
    return out


class _BF16:
    """A bf16 array kept as its int16 bits; ``to_torch`` reinterprets them."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.shape = bits.shape

    def __getitem__(self, idx) -> _BF16:
        return _BF16(self.bits[idx])


def to_torch(a) -> Tensor:
    """A (possibly memory-mapped) array as a torch tensor of its stored dtype."""
    if isinstance(a, _BF16):
        return torch.from_numpy(np.ascontiguousarray(a.bits)).view(torch.bfloat16)
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # a read-only memmap: callers copy (cat, gather) at once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def quantize_q8(logprobs: Tensor) -> Tensor:
    """Log-probabilities (≤ 0) → uint8 codes, rounding to the nearest Q8_STEP nats."""
    return (-logprobs.float() / Q8_STEP).round().clamp(0, 255).to(torch.uint8)


def dequantize_q8(codes: Tensor) -> Tensor:
    return codes.float() * -Q8_STEP
