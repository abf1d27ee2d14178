"""Hidden-state loss terms, for any family whose student exposes hidden states.

- ``cosine``: 1 − cos(student hidden, teacher hidden) over a layer map (DistilBERT,
  Sanh et al. 2019), per token or on a pooled sentence vector;
- ``hint_mse``: a FitNet-style hint, mean squared error between the (projected) student
  hidden state and the teacher's (Romero et al. 2015, "FitNets: Hints for Thin Deep
  Nets");
- attention transfer: KL between head-averaged attention rows (MiniLM, Wang et al. 2020).

A learned projection (:class:`HiddenProjection`) maps the student's width to the
teacher's; it is part of the loss, trained and checkpointed with the student, and not
exported with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DKError
from .divergences import masked_mean


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """``hidden (B, T, H)`` → ``(B, H)``: ``mean`` over valid tokens or the first (``cls``)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise DKError(f"cosine.pool must be tokens, mean or cls, not {how!r}")


def cosine_distance(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 − cos(s, t) along the last dim, mean over valid positions. ``(..., H)``; the
    loss of DistilBERT's ``CosineEmbeddingLoss`` with target 1."""
    per = 1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-8)  # (...)
    return masked_mean(per, mask)


class HiddenProjection(nn.Module):
    """One learned linear map per mapped student layer, student width → teacher width;
    identity (no parameters) where the widths already match."""

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_width: int):
        super().__init__()
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        self.proj = nn.ModuleDict()
        if student_width != teacher_width:
            for s in self.layer_map:
                self.proj[str(s)] = nn.Linear(student_width, teacher_width)

    def forward(self, layer: int, h: Tensor) -> Tensor:
        key = str(layer)
        return self.proj[key](h) if key in self.proj else h


def _mapped(student_hidden, teacher_hidden: dict[int, Tensor], projection, term: str):
    """(projected student hidden ``(B, T, Ht)``, teacher hidden) per mapped layer pair."""
    for s_layer, t_layer in projection.layer_map.items():
        if s_layer >= len(student_hidden):
            raise DKError(
                f"{term}.layer_map: student layer {s_layer} does not exist "
                f"(0 = embeddings … {len(student_hidden) - 1})"
            )
        yield projection(s_layer, student_hidden[s_layer]), teacher_hidden[t_layer]


def hidden_cosine(
    student_hidden: tuple[Tensor, ...] | list[Tensor],
    teacher_hidden: dict[int, Tensor],
    mask: Tensor,
    projection: HiddenProjection,
    how: str = "tokens",
) -> Tensor:
    """Cosine loss averaged over the layer map ``{student layer: teacher layer}``.

    ``student_hidden`` is the model's ``hidden_states`` (index 0 = embeddings, so layer
    ``l`` is ``hidden_states[l]``), each ``(B, T, Hs)``. ``teacher_hidden`` maps a teacher
    layer to ``(B, T, Ht)`` (``how='tokens'``) or an already pooled ``(B, Ht)``."""
    terms = []
    for h, t in _mapped(student_hidden, teacher_hidden, projection, "cosine"):
        if how == "tokens":
            terms.append(cosine_distance(h, t[:, : h.shape[1]], mask))
        else:
            terms.append(cosine_distance(pool(h, mask, how), t))
    return torch.stack(terms).mean()


def attention_transfer(
    student_attn: tuple[Tensor, ...],
    teacher_attn: tuple[Tensor, ...],
    layer_map: dict[int, int],
    mask: Tensor,
) -> Tensor:
    """KL(teacher ‖ student) between head-averaged attention rows ``(B, T, T)``.

    Attention tuples are per layer (1-based layer ``l`` is ``attn[l-1]``), each
    ``(B, heads, T, T)``; mean over valid query positions and the mapped layers."""
    terms = []
    for s_layer, t_layer in layer_map.items():
        if s_layer < 1 or t_layer < 1:
            raise DKError("attention.layer_map: layers are 1-based (embeddings have no attention)")
        s = student_attn[s_layer - 1].float().mean(1).clamp_min(1e-12).log()  # (B, T, T)
        t = teacher_attn[t_layer - 1].float().mean(1)[:, : s.shape[1], : s.shape[2]]
        per = (t * (t.clamp_min(1e-12).log() - s)).sum(-1)  # (B, T)
        terms.append(masked_mean(per, mask))
    return torch.stack(terms).mean()


def hidden_mse(
    student_hidden: tuple[Tensor, ...] | list[Tensor],
    teacher_hidden: dict[int, Tensor],
    mask: Tensor,
    projection: HiddenProjection,
    how: str = "tokens",
) -> Tensor:
    """FitNet hint: mean squared error between the projected student hidden state and the
    teacher's, averaged over the layer map (shapes as :func:`hidden_cosine`); per token
    the mean is over valid tokens and the hidden width."""
    terms = []
    for h, t in _mapped(student_hidden, teacher_hidden, projection, "hint_mse"):
        h, t = h.float(), t.float()
        if how == "tokens":
            per = (h - t[:, : h.shape[1]]).pow(2).mean(-1)  # (B, T)
            terms.append(masked_mean(per, mask))
        else:
            terms.append((pool(h, mask, how) - t).pow(2).mean())
    return torch.stack(terms).mean()
