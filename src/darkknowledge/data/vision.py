"""Image classification data: IDX files (MNIST, Fashion-MNIST), sklearn digits, splits,
transfer sets and augmentation (random-translation jitter, left-right flips). Everything
lives in memory as tensors."""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DKError
from ..losses import IGNORE_INDEX


@dataclass
class ArrayDataset:
    """Images ``x (N, C, H, W)`` float32 in [0, 1], labels ``y (N,)`` int64 (or None for
    an unlabelled set; ``IGNORE_INDEX`` marks single missing labels), and stable example
    ``ids (N,)`` that name each example across subsets (for caches and stores)."""

    x: Tensor
    y: Tensor | None
    num_classes: int
    ids: Tensor | None = None

    def __post_init__(self):
        if self.ids is None:
            self.ids = torch.arange(len(self.x))
        if self.y is not None and len(self.y) != len(self.x):
            raise DKError(f"data: {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: Tensor) -> ArrayDataset:
        y = None if self.y is None else self.y[idx]
        return ArrayDataset(self.x[idx], y, self.num_classes, self.ids[idx])  # type: ignore[index]

    def without_labels(self) -> ArrayDataset:
        return ArrayDataset(self.x, None, self.num_classes, self.ids)


@dataclass
class DataSplits:
    train: ArrayDataset  # labelled training set (teachers and plain students)
    val: ArrayDataset
    test: ArrayDataset
    transfer: ArrayDataset  # what the student is distilled on (= train unless set)
    description: str = ""


# ---------------------------------------------------------------- readers

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


IDX_MAX_BYTES = 4 << 30  # an IDX file larger than this is refused (4 GiB)


def _gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress in pieces, stopping past IDX_MAX_BYTES (a gzip bomb is one line, not
    all of the memory)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out, n, view = [], 0, memoryview(raw)
    for i in range(0, len(raw), 1 << 20):
        piece = d.decompress(view[i : i + (1 << 20)], IDX_MAX_BYTES + 1 - n)
        while True:
            out.append(piece)
            n += len(piece)
            if n > IDX_MAX_BYTES:
                raise DKError(f"{path}: decompresses to more than {IDX_MAX_BYTES / 2**30:g} GiB")
            if not d.unconsumed_tail:
                break
            piece = d.decompress(d.unconsumed_tail, IDX_MAX_BYTES + 1 - n)
        if d.eof:
            break
    if not d.eof:
        raise DKError(f"{path}: corrupt gzip data (truncated)")
    return b"".join(out)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its stored shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _gunzip(raw, path)
    except OSError as e:
        raise DKError(f"{path}: cannot read IDX file ({e.strerror or e})") from None
    except (EOFError, gzip.BadGzipFile) as e:
        raise DKError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DKError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DKError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = math.prod(shape) * dtype.itemsize  # exact: no int64 overflow on forged sizes
    if len(raw) - header != need:
        raise DKError(
            f"{path}: IDX header says {shape} ({need} bytes) but the file holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DKError(f"data.path: {folder} has no {stem}[.gz] (expected the MNIST IDX layout)")


def load_idx_folder(folder: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from a folder in the MNIST layout, images scaled to [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DKError(f"data.path: {folder} is not a folder")
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DKError(
                f"data.path: {folder}: {split} images {images.shape} do not match "
                f"labels {labels.shape}"
            )
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N,1,H,W)
        y = torch.from_numpy(labels.astype(np.int64))
        out.append((x, y))
    num_classes = int(max(out[0][1].max(), out[1][1].max())) + 1
    return ArrayDataset(*out[0], num_classes), ArrayDataset(*out[1], num_classes)


def load_digits_split(test_fraction: float = 0.3, seed: int = 0):
    """(train, test) from scikit-learn's 8×8 digits, a seeded stratified-free split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797,1,8,8)
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = round(test_fraction * len(x))
    full = ArrayDataset(x, y, 10)
    return full.subset(perm[n_test:].sort().values), full.subset(perm[:n_test].sort().values)


# ---------------------------------------------------------------- splits


def split_train_val(ds: ArrayDataset, val_fraction: float, seed: int):
    """Seeded split of a labelled set into (train, val)."""
    if val_fraction == 0:
        return ds, ds.subset(torch.arange(0))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=g)
    n_val = max(1, round(val_fraction * len(ds)))
    return ds.subset(perm[n_val:].sort().values), ds.subset(perm[:n_val].sort().values)


def make_transfer_set(
    train: ArrayDataset,
    fraction: float = 1.0,
    omit_classes: list[int] | tuple[int, ...] = (),
    labels: bool = True,
    seed: int = 0,
) -> ArrayDataset:
    """The set the student learns from: a seeded subset of ``train``, with classes left
    out (Hinton et al. 2015 §3 omitted all 3s) and, optionally, no labels at all."""
    keep = torch.ones(len(train), dtype=torch.bool)
    if omit_classes:
        if train.y is None:
            raise DKError("data.transfer.omit_classes needs a labelled training set")
        for c in omit_classes:
            if not 0 <= c < train.num_classes:
                raise DKError(
                    f"data.transfer.omit_classes: class {c} is not in 0..{train.num_classes - 1}"
                )
            keep &= train.y != c
    idx = keep.nonzero().squeeze(1)
    if fraction < 1.0:
        g = torch.Generator().manual_seed(20_000 + seed)
        n = max(1, round(fraction * len(idx)))
        idx = idx[torch.randperm(len(idx), generator=g)[:n]].sort().values
    out = train.subset(idx)
    return out if labels else out.without_labels()


def jitter(x: Tensor, px: int, generator: torch.Generator) -> Tensor:
    """Random translation by up to ±px pixels per image, zero fill. (B, C, H, W)."""
    b, _c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (px, px, px, px))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * px + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * px + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (B, 1, W)
    bidx = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()


def hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability 1/2. (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: Tensor, kind: str, jitter_px: int, generator: torch.Generator) -> Tensor:
    """``train.augment`` applied to a batch ``(B, C, H, W)``: ``jitter`` (random
    translation by up to ``jitter_px``), ``hflip`` (random left-right mirror) or
    ``jitter_hflip`` (both, jitter first). ``jitter`` alone draws exactly what
    :func:`jitter` draws, so runs from before ``hflip`` existed repeat bit for bit."""
    if kind in ("jitter", "jitter_hflip"):
        x = jitter(x, jitter_px, generator)
    if kind in ("hflip", "jitter_hflip"):
        x = hflip(x, generator)
    return x


def ignore_labels_like(n: int) -> Tensor:
    return torch.full((n,), IGNORE_INDEX, dtype=torch.int64)


def with_augmented_copies(
    ds: ArrayDataset, kind: str, copies: int, jitter_px: int, seed: int, id_stride: int
) -> ArrayDataset:
    """``ds`` followed by ``copies`` augmented copies of it, drawn once from ``seed`` (the
    same set every call). Copy k of the example with id i gets id ``i + k · id_stride``
    (``id_stride`` > every id in ``ds``), so caches and stores tell the copies apart."""
    if copies == 0:
        return ds
    if len(ds) and int(ds.ids.max()) >= id_stride:
        raise ValueError(f"id_stride {id_stride} must exceed every example id")
    g = torch.Generator().manual_seed(30_000 + seed)
    xs, ids = [ds.x], [ds.ids]
    for k in range(1, copies + 1):
        xs.append(torch.cat([augment(c, kind, jitter_px, g) for c in ds.x.split(8192)]))
        ids.append(ds.ids + k * id_stride)
    y = None if ds.y is None else ds.y.repeat(copies + 1)
    return ArrayDataset(torch.cat(xs), y, ds.num_classes, torch.cat(ids))
