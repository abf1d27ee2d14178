"""Distillation losses: pure functions (:mod:`.divergences`; top-k + tail in :mod:`.sparse`)
and named terms (:mod:`.stack`)."""

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
from .sparse import (
    reconstruct,
    sparse_forward_kl,
    sparse_hinton_kd,
    sparse_jsd,
    sparse_reverse_kl,
    sparse_tvd,
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
    "reconstruct",
    "reverse_kl",
    "sparse_forward_kl",
    "sparse_hinton_kd",
    "sparse_jsd",
    "sparse_reverse_kl",
    "sparse_tvd",
    "tvd",
]
