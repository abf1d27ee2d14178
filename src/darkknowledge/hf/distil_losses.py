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
from torch import Tensor

from ..errors import DKError
from ..losses import IGNORE_INDEX, cross_entropy, hinton_kd
from ..losses.features import (  # noqa: F401  (their home is the loss stack now)
    HiddenProjection,
    attention_transfer,
    cosine_distance,
    hidden_cosine,
    hidden_mse,
    pool,
)


def soft_target(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over valid positions. (B, [T,] V)."""
    return hinton_kd(student_logits, teacher_logits, None, temperature=temperature, mask=mask)


def mlm_loss(student_logits: Tensor, mlm_labels: Tensor) -> Tensor:
    """Masked-LM cross-entropy; ``mlm_labels (B, T)`` is −100 except at masked tokens."""
    return cross_entropy(student_logits, mlm_labels)


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
