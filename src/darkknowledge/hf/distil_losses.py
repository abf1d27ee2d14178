"""DistilBERT's loss terms (Sanh et al. 2019) for transformer students.

- soft targets: T²·KL(teacher ‖ student) at temperature T on task logits ``(B, C)`` or on
  masked-LM logits ``(B, T, V)`` at the masked positions (the core
  :func:`~darkknowledge.losses.hinton_kd` with no labels);
- hard labels / masked-LM: cross-entropy (the core
  :func:`~darkknowledge.losses.cross_entropy`, ``-100`` = no label);
- cosine: 1 − cos(student hidden, teacher hidden) over a layer map, with a learned
  linear projection when the widths differ, per token (mean over valid tokens) or on a
  pooled sentence vector;
- attention transfer (optional): KL between the teacher's and the student's attention
  distributions, averaged over heads, at valid query positions (as in MiniLM, Wang et
  al. 2020, but head-averaged so head counts may differ).

:func:`triple_loss` is DistilBERT's task-agnostic objective: soft MLM + MLM + cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DKError
from ..losses import IGNORE_INDEX, cross_entropy, hinton_kd, masked_mean


def soft_target(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over valid positions. (B, [T,] V)."""
    return hinton_kd(student_logits, teacher_logits, None, temperature=temperature, mask=mask)


def mlm_loss(student_logits: Tensor, mlm_labels: Tensor) -> Tensor:
    """Masked-LM cross-entropy; ``mlm_labels (B, T)`` is −100 except at masked tokens."""
    return cross_entropy(student_logits, mlm_labels)


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
    for s_layer, t_layer in projection.layer_map.items():
        if s_layer >= len(student_hidden):
            raise DKError(
                f"cosine.layer_map: student layer {s_layer} does not exist "
                f"(0 = embeddings … {len(student_hidden) - 1})"
            )
        h = projection(s_layer, student_hidden[s_layer])  # (B, T, Ht)
        t = teacher_hidden[t_layer]
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


def mask_tokens(
    ids: Tensor,
    mask: Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int] | tuple[int, ...] = (),
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: pick ``prob`` of the valid, non-special tokens; of those 80% become
    ``[MASK]``, 10% a random token, 10% stay. Returns ``(input ids, labels)`` with labels
    −100 except at the picked positions. ``ids``/``mask`` ``(B, T)``."""
    can = mask.bool().clone()
    for s in special_ids:
        can &= ids != s
    r = torch.rand(ids.shape, generator=generator)
    picked = can & (r < prob)
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    r2 = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[picked & (r2 < 0.8)] = mask_token_id
    rand_pos = picked & (r2 >= 0.8) & (r2 < 0.9)
    out[rand_pos] = torch.randint(vocab_size, ids.shape, generator=generator)[rand_pos]
    return out, labels


def triple_loss(
    student_out,
    teacher_out,
    mlm_labels: Tensor,
    mask: Tensor,
    projection: HiddenProjection,
    temperature: float = 2.0,
    alpha_soft: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """DistilBERT's task-agnostic loss (weights from its training script: 5·soft + 2·MLM
    + 1·cosine). ``student_out``/``teacher_out`` are masked-LM outputs with
    ``hidden_states``; the soft term covers the masked positions only, as in DistilBERT."""
    picked = mlm_labels != IGNORE_INDEX  # (B, T)
    s_logits, t_logits = student_out.logits, teacher_out.logits  # (B, T, V)
    if s_logits.shape[-1] != t_logits.shape[-1]:
        raise DKError(
            f"triple loss: vocab sizes differ (student {s_logits.shape[-1]}, teacher "
            f"{t_logits.shape[-1]}): use the teacher's tokenizer and vocabulary"
        )
    soft = soft_target(s_logits, t_logits, temperature, picked)
    mlm = mlm_loss(s_logits, mlm_labels)
    t_hidden = {t: teacher_out.hidden_states[t] for t in projection.layer_map.values()}
    cos = hidden_cosine(student_out.hidden_states, t_hidden, mask, projection, "tokens")
    total = alpha_soft * soft + alpha_mlm * mlm + alpha_cos * cos
    parts = {"soft": soft, "mlm": mlm, "cos": cos}
    return total, {k: float(v.detach()) for k, v in parts.items()}
