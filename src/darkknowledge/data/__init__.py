"""Datasets: in-memory image sets, splits, transfer sets, augmentation."""

from __future__ import annotations

import torch

from ..config import DigitsData, IdxData
from ..errors import DKError
from .vision import (
    ArrayDataset,
    DataSplits,
    augment,
    hflip,
    jitter,
    load_digits_split,
    load_idx_folder,
    make_transfer_set,
    read_idx,
    split_train_val,
)

__all__ = [
    "ArrayDataset",
    "DataSplits",
    "augment",
    "hflip",
    "jitter",
    "load_data",
    "load_digits_split",
    "load_idx_folder",
    "make_transfer_set",
    "read_idx",
    "split_train_val",
]


def load_data(cfg: DigitsData | IdxData) -> DataSplits:
    """Build train/val/test/transfer from a recipe's ``data:`` section."""
    if cfg.name == "digits":
        full_train, test = load_digits_split(cfg.test_fraction, cfg.split_seed)
        desc = "sklearn digits (8×8)"
    elif cfg.name == "idx":
        full_train, test = load_idx_folder(cfg.path)
        desc = f"IDX folder {cfg.path}"
    else:  # pragma: no cover - the config union admits nothing else
        raise DKError(f"data.name: unknown dataset {cfg.name!r}")
    if cfg.limit is not None:
        full_train = full_train.subset(torch.arange(min(cfg.limit, len(full_train))))
    train, val = split_train_val(full_train, cfg.val_fraction, cfg.split_seed)
    t = cfg.transfer
    transfer = (
        train
        if t is None
        else make_transfer_set(train, t.fraction, t.omit_classes, t.labels, cfg.split_seed)
    )
    if len(transfer) == 0:
        raise DKError(
            "data.transfer: the transfer set is empty; keep more classes or a larger fraction"
        )
    return DataSplits(train, val, test, transfer, desc)
