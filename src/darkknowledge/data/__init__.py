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
    with_augmented_copies,
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
    "plain_training_set",
    "read_idx",
    "split_train_val",
    "with_augmented_copies",
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
    if t is not None and t.copies:
        transfer = with_augmented_copies(
            transfer, t.augment, t.copies, t.jitter_px, cfg.split_seed, _id_stride(train, val, test)
        )
    return DataSplits(train, val, test, transfer, desc)


def plain_training_set(cfg: DigitsData | IdxData, data: DataSplits) -> ArrayDataset:
    """What a plain baseline trains on: the training set, plus the transfer set's augmented
    copies (``data.transfer.copies``) with their hard labels: as many images as the
    distilled student sees, the very same ones when the transfer set is the training set."""
    t = cfg.transfer
    if t is None or not t.copies:
        return data.train
    if t.fraction == 1.0 and not t.omit_classes and t.labels:
        return data.transfer  # the transfer set is the training set plus its copies
    stride = _id_stride(data.train, data.val, data.test)
    return with_augmented_copies(
        data.train, t.augment, t.copies, t.jitter_px, cfg.split_seed, stride
    )


def _id_stride(*sets: ArrayDataset) -> int:
    """Above every example id of the splits: copy k of id i is named i + k · stride."""
    return 1 + max((int(s.ids.max()) for s in sets if len(s)), default=-1)
