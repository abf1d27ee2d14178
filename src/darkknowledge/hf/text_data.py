"""Labelled text for classification: data files (TSV, CSV, JSONL, JSON, Parquet, a
``datasets`` save_to_disk folder) or ``datasets`` objects from Python, tokenised once
into fixed-length id tensors.

A file names a text column (``sentence`` or ``text``, or ``data.text_key``) and a
``label`` column (as in GLUE's SST-2 TSV): a header row, JSON keys or the dataset's
columns. Labels are integers ``0 … C−1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DKError

TEXT_KEYS = ("sentence", "text")


@dataclass
class TextSplit:
    """Texts with integer labels (``labels`` is None for unlabelled text)."""

    texts: list[str]
    labels: list[int] | None
    source: str = ""
    label_names: list[str] | None = None  # class i's name, where the source knows it

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int = 0) -> TextSplit:
        """A seeded random subset of ``n`` examples (in their original order)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(self), generator=g)[:n].tolist())
        labels = None if self.labels is None else [self.labels[i] for i in keep]
        return TextSplit(
            [self.texts[i] for i in keep],
            labels,
            f"{self.source}[{n} of {len(self)}]",
            self.label_names,
        )


def _label(v, where: str) -> int:
    try:
        i = int(str(v).strip())
    except ValueError:
        raise DKError(f"{where}: label {v!r} is not an integer class id") from None
    if i < 0:
        raise DKError(f"{where}: label {i} is negative; labels are class ids 0 … C−1")
    return i


def _text_key(keys, where: str, text_key: str | None) -> str:
    if text_key is not None:
        if text_key not in keys:
            raise DKError(f"{where}: no column {text_key!r} (columns: {', '.join(keys)})")
        return text_key
    for k in TEXT_KEYS:
        if k in keys:
            return k
    raise DKError(
        f"{where}: no text column (expected one of {', '.join(TEXT_KEYS)}; found {', '.join(keys)})"
    )


def read_split(
    path: str | Path, text_key: str | None = None, label_key: str | None = "label"
) -> TextSplit:
    """Read labelled sentences from a data file of any format :mod:`darkknowledge.rows`
    reads: ``.tsv`` (GLUE's SST-2) or ``.csv`` with a header row, ``.jsonl`` / ``.json``,
    ``.parquet``, or a folder written by ``datasets``' ``save_to_disk``. Errors name the
    file and its line (or row)."""
    from ..rows import iter_rows, label_names

    path = Path(path)
    keys: dict[str, str | None] = {}

    def select(columns: list[str], where: str) -> list[str]:
        keys["text"] = _text_key(columns, where, text_key)
        if label_key is not None and label_key not in columns:
            raise DKError(f"{where}: no column {label_key!r} (columns: {', '.join(columns)})")
        return [keys["text"], *([label_key] if label_key is not None else [])]

    texts: list[str] = []
    labels: list[int] = []
    for where, row in iter_rows(path, select):
        tk = keys.get("text") or _text_key(list(row), where, text_key)
        value = row[tk]
        if value is None:
            raise DKError(f"{where}: no text in {tk!r}")
        texts.append(str(value).strip())
        if label_key is not None:
            if label_key not in row:
                raise DKError(f"{where}: no key {label_key!r}")
            labels.append(_label(row[label_key], where))
    if not texts:
        raise DKError(f"{path}: no examples")
    names = label_names(path, label_key) if label_key is not None else None
    return TextSplit(texts, labels if label_key is not None else None, str(path), names)


def from_datasets(ds, text_key: str | None = None, label_key: str | None = "label") -> TextSplit:
    """A :class:`TextSplit` from a Hugging Face ``datasets.Dataset`` (or anything with
    ``column_names`` and ``ds[column]``), e.g. ``load_dataset(...)['train']``."""
    cols = list(getattr(ds, "column_names", []) or [])
    if not cols:
        raise DKError("from_datasets: expected a datasets.Dataset (it has no column_names)")
    tk = _text_key(cols, "dataset", text_key)
    texts = [str(t).strip() for t in ds[tk]]
    labels = None
    if label_key is not None:
        if label_key not in cols:
            raise DKError(f"dataset: no column {label_key!r} (columns: {', '.join(cols)})")
        labels = [_label(v, "dataset") for v in ds[label_key]]
    names = None
    feature = (getattr(ds, "features", None) or {}).get(label_key)
    if label_key is not None and isinstance(getattr(feature, "names", None), list):
        names = [str(n) for n in feature.names]  # a datasets ClassLabel: SST-2 has them
    return TextSplit(texts, labels, "datasets", names)


@dataclass
class Encoded:
    """Token ids ``x (N, L)`` padded to ``L = max_length``, ``mask (N, L)`` of real
    tokens, labels ``y (N,)`` (or None) and stable example ids ``ids (N,)``."""

    x: Tensor
    mask: Tensor
    y: Tensor | None
    ids: Tensor

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, n: int | None, seed: int = 0) -> Encoded:
        """A seeded random subset of ``n`` rows; example ids are kept (store lookups)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        keep = torch.sort(torch.randperm(len(self), generator=g)[:n]).values
        y = None if self.y is None else self.y[keep]
        return Encoded(self.x[keep], self.mask[keep], y, self.ids[keep])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Rows ``idx``, trimmed to the longest sequence in the batch (dynamic padding)."""
        m = self.mask[idx]
        t = max(int(m.sum(1).max()), 1)
        y = None if self.y is None else self.y[idx]
        return self.x[idx, :t], m[:, :t], y, self.ids[idx]


def encode(tokenizer, split: TextSplit, max_length: int) -> Encoded:
    """Tokenise once (truncating at ``max_length``) into fixed-size tensors."""
    enc = tokenizer(
        split.texts,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    x = enc["input_ids"].to(torch.int64)  # (N, L)
    mask = enc["attention_mask"].to(torch.int64)  # (N, L)
    y = None if split.labels is None else torch.tensor(split.labels, dtype=torch.int64)
    return Encoded(x, mask, y, torch.arange(len(x), dtype=torch.int64))


def num_classes(*splits: TextSplit) -> int:
    labels = [y for s in splits if s.labels for y in s.labels]
    if not labels:
        raise DKError("data: no labels")
    return max(labels) + 1
