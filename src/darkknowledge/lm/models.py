"""What the LM code needs from a transformers causal LM: its body (to the final hidden
states) and its LM head, so the head can be applied chunk by chunk."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight ``(V, H)`` and bias ``(V,)`` or None."""
    out = unwrap(model).get_output_embeddings()
    w = getattr(out, "weight", None)
    if w is None:  # a peft-wrapped head keeps the weight in base_layer
        base = getattr(out, "base_layer", out)
        w = base.weight
        return w, getattr(base, "bias", None)
    return w, getattr(out, "bias", None)


def body(model: nn.Module) -> nn.Module:
    m = unwrap(model)
    return getattr(m, m.base_model_prefix)


def final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Final (post-norm) hidden states ``(B, T, H)``: the body without the LM head, with
    no KV cache and no per-layer hidden states or attention maps kept (whatever the
    model's config says)."""
    out = body(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=False,
        output_attentions=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def vocab_size(model: nn.Module) -> int:
    return int(head(model)[0].shape[0])


def max_positions(model: nn.Module) -> int | None:
    cfg = unwrap(model).config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def param_count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


class LMEnsemble(nn.Module):
    """Causal LMs over one shared vocabulary, as one teacher: ``prob_mean`` gives
    log Σ w_i softmax(z_i) (the mean distribution), ``logit_mean`` Σ w_i z_i (the
    geometric mean, renormalised by the softmax), as the classify family's ``Ensemble``.

    The distillation loss applies it chunk by chunk (:meth:`combine` of each member's
    head on its hidden states); ``forward`` gives whole logits (labelling, validation)."""

    def __init__(self, members: list[nn.Module], weights: list[float] | None, combine: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights if weights is not None else [1.0] * len(members))
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.how = combine

    def combine(self, logits: list[Tensor]) -> Tensor:
        """The members' logits ``[(..., V)]`` → the ensemble's ``(..., V)``."""
        z = torch.stack([x.float() for x in logits])  # (M, ..., V)
        w = self.weights.to(z.device).view(-1, *([1] * (z.dim() - 1)))
        if self.how == "logit_mean":
            return (w * z).sum(0)
        return torch.logsumexp(torch.log_softmax(z, -1) + w.log(), dim=0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_):
        outs = [m(input_ids=input_ids, attention_mask=attention_mask).logits for m in self.members]
        return SimpleNamespace(logits=self.combine(outs))
