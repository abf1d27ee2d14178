"""Distillation losses: one registry of per-position divergences (:mod:`.registry`),
pure loss functions on it (:mod:`.divergences`; top-k + tail in :mod:`.sparse`) and
named terms (:mod:`.stack`)."""

from .divergences import (
    IGNORE_INDEX,
    cross_entropy,
    divergence_loss,
    forward_kl,
    hinton_kd,
    jsd,
    masked_mean,
    reverse_kl,
    tvd,
)
from .registry import (
    DIVERGENCES,
    Divergence,
    get_divergence,
    per_position,
    register_divergence,
)
from .sampled import SampledTarget, sampled_forward_kl, sampled_hinton_kd
from .sparse import (
    reconstruct,
    sparse_divergence_loss,
    sparse_forward_kl,
    sparse_hinton_kd,
    sparse_jsd,
    sparse_reverse_kl,
    sparse_tvd,
)
from .stack import CE, JSD, TVD, ForwardKL, HintonKD, LossStack, ReverseKL

__all__ = [
    "CE",
    "DIVERGENCES",
    "IGNORE_INDEX",
    "JSD",
    "TVD",
    "Divergence",
    "ForwardKL",
    "HintonKD",
    "LossStack",
    "ReverseKL",
    "SampledTarget",
    "cross_entropy",
    "divergence_loss",
    "forward_kl",
    "get_divergence",
    "hinton_kd",
    "jsd",
    "masked_mean",
    "per_position",
    "reconstruct",
    "register_divergence",
    "reverse_kl",
    "sampled_forward_kl",
    "sampled_hinton_kd",
    "sparse_divergence_loss",
    "sparse_forward_kl",
    "sparse_hinton_kd",
    "sparse_jsd",
    "sparse_reverse_kl",
    "sparse_tvd",
    "tvd",
]
