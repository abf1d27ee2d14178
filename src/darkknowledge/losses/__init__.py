"""Distillation losses: pure functions (:mod:`.divergences`) and named terms (:mod:`.stack`)."""

from .divergences import (
    IGNORE_INDEX,
    cross_entropy,
    forward_kl,
    hinton_kd,
    jsd,
    masked_mean,
    reverse_kl,
    tvd,
)
from .stack import CE, JSD, TVD, ForwardKL, HintonKD, LossStack, ReverseKL

__all__ = [
    "CE",
    "IGNORE_INDEX",
    "JSD",
    "TVD",
    "ForwardKL",
    "HintonKD",
    "LossStack",
    "ReverseKL",
    "cross_entropy",
    "forward_kl",
    "hinton_kd",
    "jsd",
    "masked_mean",
    "reverse_kl",
    "tvd",
]
