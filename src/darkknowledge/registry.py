"""Named builders. Recipes pick components by these names only, never by import path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import DKError
from .models.vision import MLP, LeNet5, SmallCNN, SmallResNet


class Registry:
    """A name → builder table with a helpful error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str):
        def deco(fn):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise DKError(f"unknown {self.kind} {name!r}: choose one of {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


MODELS = Registry("model")


@MODELS.register("mlp")
def _mlp(cfg, input_shape, num_classes):
    return MLP(
        input_shape, num_classes, list(cfg.hidden), cfg.dropout, cfg.input_dropout, cfg.max_norm
    )


@MODELS.register("lenet5")
def _lenet5(cfg, input_shape, num_classes):
    return LeNet5(input_shape, num_classes)


@MODELS.register("small_cnn")
def _small_cnn(cfg, input_shape, num_classes):
    return SmallCNN(input_shape, num_classes, cfg.width)


@MODELS.register("small_resnet")
def _small_resnet(cfg, input_shape, num_classes):
    return SmallResNet(input_shape, num_classes, cfg.width, list(cfg.blocks))


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a model from its recipe section (``{name: ..., **kwargs}``), after checking
    on the meta device (no memory) that it fits: see :func:`check_fits`."""
    make = MODELS.get(cfg.name)
    with torch.device("meta"):
        n = sum(p.numel() for p in make(cfg, tuple(input_shape), num_classes).parameters())
    check_fits(n, f"model {cfg.name}")
    return make(cfg, tuple(input_shape), num_classes)


def available_bytes() -> int:
    """The memory this process may still take: MemAvailable (Linux), else 16 GiB."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def check_fits(params: int, what: str) -> None:
    """Refuse, in one line, a model whose fp32 weights, gradients and AdamW's two moments
    (16 bytes a parameter) would not fit in the memory available now."""
    need, have = 16 * params, available_bytes()
    if need > have:
        raise DKError(
            f"{what}: {params:,} parameters need about {need / 2**30:.1f} GiB to train "
            f"(weights, gradients, AdamW state) but {have / 2**30:.1f} GiB are available; "
            "make it smaller"
        )
