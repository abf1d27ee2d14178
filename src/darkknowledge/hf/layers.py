"""Students built from a teacher's layers (Sanh et al. 2019, "DistilBERT": "we initialize
the student from the teacher by taking one layer out of two").

:func:`student_from_teacher` builds a model with the same config as the teacher but
fewer layers, then copies the embeddings, the chosen layers (student layer ``i`` ←
teacher layer ``layers[i]``) and everything after the layer stack (final norm, pooler,
heads present in both). Every copied tensor's shape is checked first. Supported layer
stacks: BERT-family encoders (BERT, MiniLM, RoBERTa: ``encoder.layer``), GPT-2
(``h``) and LLaMA-style decoders (``layers``).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import DKError

# model_type -> where the layer stack sits inside the base model
LAYER_STACKS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "electra": "encoder.layer",
    "gpt2": "h",
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
}


def base_model(model: nn.Module) -> nn.Module:
    """The bare transformer inside a model with a head (``model.bert``, ``model.model``,
    ``model.transformer``), or the model itself."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path inside the base model, the ModuleList of layers)``; a clear error for an
    architecture this module does not know."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if cfg is None or kind is None:
        raise DKError(
            f"layers: {type(model).__name__} is not a transformers model (no config.model_type)"
        )
    if kind not in LAYER_STACKS:
        raise DKError(
            f"layers: model_type {kind!r} ({type(model).__name__}) is not supported: no known "
            f"layer stack; supported: {', '.join(sorted(LAYER_STACKS))}"
        )
    path = LAYER_STACKS[kind]
    mod: nn.Module = base_model(model)
    for part in path.split("."):
        mod = getattr(mod, part, None)  # type: ignore[assignment]
        if mod is None:
            raise DKError(
                f"layers: {type(model).__name__} ({kind}) has no layer stack at "
                f"'{path}' (missing '{part}')"
            )
    if not isinstance(mod, nn.ModuleList):
        raise DKError(f"layers: '{path}' of {type(model).__name__} is not a list of layers")
    return path, mod


def num_layers(model: nn.Module) -> int:
    return len(layer_stack(model)[1])


def every_other(n: int) -> list[int]:
    """DistilBERT's default: one layer out of two, starting at the first."""
    return list(range(0, n, 2))


def check_layers(layers: list[int], n_teacher: int) -> list[int]:
    layers = [int(i) for i in layers]
    if not layers:
        raise DKError("layers: the student needs at least one layer")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise DKError(
            f"layers: {bad} out of range; the teacher has {n_teacher} layers (0 … {n_teacher - 1})"
        )
    if sorted(set(layers)) != layers:
        raise DKError(f"layers: {layers} must be increasing and without repeats")
    return layers


def _norm(key: str, prefix: str) -> str:
    return key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key


def layer_map_keys(
    student: nn.Module, teacher: nn.Module, layers: list[int]
) -> tuple[dict[str, str], list[str]]:
    """Which teacher tensor each student tensor is copied from.

    Returns ``(mapping student key -> teacher key, student keys with no teacher
    counterpart)``. Keys are compared without the base-model prefix, so a bare
    ``BertModel`` teacher initialises a ``BertForSequenceClassification`` student (its
    classifier stays freshly initialised and is listed as unmatched)."""
    path, s_stack = layer_stack(student)
    t_path, _ = layer_stack(teacher)
    if len(s_stack) != len(layers):
        raise DKError(
            f"layers: the student has {len(s_stack)} layers but {len(layers)} were chosen"
        )
    sp = getattr(student, "base_model_prefix", "")
    tp = getattr(teacher, "base_model_prefix", "")
    t_keys = {_norm(k, tp): k for k in teacher.state_dict()}
    pat = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    mapping: dict[str, str] = {}
    fresh: list[str] = []
    for key in student.state_dict():
        nk = _norm(key, sp)
        m = pat.match(nk)
        if m:
            nk = f"{t_path}.{layers[int(m.group(1))]}.{m.group(2)}"
        if nk in t_keys:
            mapping[key] = t_keys[nk]
        else:
            fresh.append(key)
    return mapping, fresh


def copy_layers(
    student: nn.Module, teacher: nn.Module, layers: list[int], allow_fresh: tuple[str, ...] = ()
) -> list[str]:
    """Copy the teacher's embeddings, chosen layers and shared tail into ``student``.

    Every tensor's shape is checked before anything is written; a student tensor inside
    the base model with no teacher counterpart is an error (the architectures differ),
    while head tensors (outside the base model, or named in ``allow_fresh``) stay as
    initialised. Returns the student keys left freshly initialised."""
    layers = check_layers(layers, num_layers(teacher))
    mapping, fresh = layer_map_keys(student, teacher, layers)
    sp = getattr(student, "base_model_prefix", "")
    has_base = sp and hasattr(student, sp)
    missing = [
        k
        for k in fresh
        if (not has_base or k.startswith(sp + ".")) and not any(a in k for a in allow_fresh)
    ]
    if missing:
        raise DKError(
            f"layers: the teacher ({type(teacher).__name__}) has no tensor for the student's "
            f"{missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    for sk, tk in mapping.items():
        if s_sd[sk].shape != t_sd[tk].shape:
            raise DKError(
                f"layers: shape mismatch: student {sk} {tuple(s_sd[sk].shape)} vs teacher "
                f"{tk} {tuple(t_sd[tk].shape)} (the widths must match to copy layers)"
            )
    with torch.no_grad():
        for sk, tk in mapping.items():
            s_sd[sk].copy_(t_sd[tk])
    return fresh


def student_config(teacher: nn.Module, n_layers: int, **overrides):
    """The teacher's config with ``n_layers`` layers (and any field overrides)."""
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = n_layers  # GPT-2 maps it to n_layer
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, list | tuple) and len(lt) != n_layers:
        cfg.layer_types = list(lt[:n_layers])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def student_from_teacher(
    teacher: nn.Module,
    layers: list[int] | None = None,
    auto_class: str | None = None,
    init: str = "teacher",
    seed: int = 0,
    **config_overrides,
) -> nn.Module:
    """A student with the teacher's config but only ``layers`` (default every other
    layer), initialised from the teacher's tensors (``init='teacher'``) or at random
    (``init='random'``, the same architecture for an ablation).

    ``auto_class`` (e.g. ``'AutoModelForSequenceClassification'``) gives the student a
    different head than the teacher; by default it has the teacher's class."""
    from .io import _auto

    n = num_layers(teacher)
    layers = check_layers(every_other(n) if layers is None else layers, n)
    if init not in ("teacher", "random"):
        raise DKError(f"layers: init must be 'teacher' or 'random', not {init!r}")
    cfg = student_config(teacher, len(layers), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            student = (
                type(teacher)(cfg) if auto_class is None else _auto(auto_class).from_config(cfg)
            )
        except (ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DKError(
                f"layers: cannot build the student from the teacher's config: {first}"
            ) from None
    student.to(next(teacher.parameters()).dtype)
    if init == "teacher":
        copy_layers(student, teacher, layers)
    return student
