"""Loading and saving transformers models and tokenizers, with one-line errors.

Models come from a local folder, a hub id (only where the network allows; this tool never
needs it), or a tiny architecture built from a config by registry name (``TINY``), so
tests and CPU recipes run offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DKError


def require_transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise DKError(
            "this needs Hugging Face transformers: pip install 'darkknowledge[hf]'"
        ) from None
    return transformers


# Tiny architectures by registry name: (config class, keyword arguments). Sizes are small
# enough for CPU tests; recipes override any field (e.g. num_hidden_layers, vocab_size).
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": (
        "BertConfig",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        ),
    ),
    "tiny-roberta": (
        "RobertaConfig",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
        ),
    ),
    "tiny-gpt2": (
        "GPT2Config",
        dict(vocab_size=1000, n_embd=64, n_layer=4, n_head=4, n_positions=256),
    ),
    "tiny-llama": (
        "LlamaConfig",
        dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
        ),
    ),
}

AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForCausalLM",
)


def tiny_config(name: str, **overrides):
    """A transformers config for a registry name in :data:`TINY`, with field overrides."""
    tf = require_transformers()
    if name not in TINY:
        raise DKError(f"unknown tiny model {name!r}; known: {', '.join(sorted(TINY))}")
    cls_name, kw = TINY[name]
    cfg_cls = getattr(tf, cls_name)
    try:
        return cfg_cls(**{**kw, **overrides})
    except (TypeError, ValueError) as e:
        raise DKError(f"tiny model {name!r}: bad config override ({e})") from None


def _auto(auto_class: str):
    tf = require_transformers()
    if auto_class not in AUTO_CLASSES:
        raise DKError(f"unknown auto class {auto_class!r}; known: {', '.join(AUTO_CLASSES)}")
    return getattr(tf, auto_class)


def build_tiny(name: str, auto_class: str = "AutoModel", seed: int = 0, **overrides):
    """A randomly initialised tiny model (seeded) for a registry name in :data:`TINY`."""
    import torch

    cfg = tiny_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _auto(auto_class).from_config(cfg)


def load_model(source: str | os.PathLike, auto_class: str = "AutoModel", **kwargs):
    """Load a pretrained model from a local folder (or a hub id where the network allows).
    Errors (missing folder, no weights, no network) become one line."""
    auto = _auto(auto_class)
    src = str(source)
    if Path(src).exists() and not Path(src).is_dir():
        raise DKError(f"{src}: expected a model folder (config.json + weights), not a file")
    try:
        return narrow_learned_positions(auto.from_pretrained(src, **kwargs))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DKError(f"cannot load model {src!r} ({auto_class}): {first}") from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise DKError(f"cannot load model {src!r} as {auto_class}: {first}") from None


def load_tokenizer(source: str | os.PathLike, **kwargs):
    """A tokenizer from a model folder, or a GPT-2 BPE tokenizer from a folder holding
    ``vocab.json`` + ``merges.txt`` (like ../shared/data/tokenizers/gpt2)."""
    tf = require_transformers()
    src = Path(str(source))
    if (
        (src / "vocab.json").exists()
        and (src / "merges.txt").exists()
        and not ((src / "tokenizer.json").exists() or (src / "tokenizer_config.json").exists())
    ):
        try:
            return tf.GPT2TokenizerFast.from_pretrained(str(src), **kwargs)
        except (OSError, ValueError) as e:
            raise DKError(f"cannot load the BPE tokenizer in {src}: {e}") from None
    try:
        return tf.AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DKError(f"cannot load tokenizer {str(source)!r}: {first}") from None


def whole_copy(model, full: dict):
    """An ordinary (unsharded) copy of a transformers ``model`` whose parameters are
    sharded, from its gathered state dict ``full``: the same class and config, the
    sharded model's dtype (a bf16 student stays bf16) and its generation config."""
    import copy

    import torch

    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the throw-away init leaves the RNG alone
        plain = type(model)(model.config).to(dtype)
    plain.load_state_dict(full)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def positions(config) -> int | None:
    """How many token positions a model takes (``n_positions`` /
    ``max_position_embeddings``); RoBERTa-style models lose ``pad_token_id + 1`` of them
    to their position offset; a model saved with a widened position table
    (:func:`widen_learned_positions`) takes the ones it was trained on. None when the
    config names none."""
    for key in ("trained_positions", "n_positions", "max_position_embeddings", "n_ctx"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            if "roberta" in str(getattr(config, "model_type", "")):
                n -= int(getattr(config, "pad_token_id", None) or 0) + 1
            return n
    return None


# What transformers 5 writes as the class of a tokenizer built from a ``tokenizers``
# object; transformers 4 knows the same class as PreTrainedTokenizerFast (5 keeps that
# name as an alias), so that name loads everywhere.
_BACKEND_CLASSES = ("TokenizersBackend",)


def _update_json(path: Path, change) -> None:
    import json

    if not path.exists():
        return
    obj = json.loads(path.read_text())
    new = change(dict(obj))
    if new != obj:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _portable_tokenizer(cfg: dict, n: int | None, template: str | None) -> dict:
    if cfg.get("tokenizer_class") in _BACKEND_CLASSES:
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        # transformers 4's generic fast tokenizer adds token_type_ids unless told its
        # inputs; a causal LM's generate() refuses them
        cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
    cfg.pop("backend", None)  # transformers 5's own marker; 4 would pass it to __init__
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        # transformers 5 lists a tokenizer's extra special tokens here; 4.5x takes this key
        # for a dict only and fails on a list (even an empty one): 4 reads the list from
        # additional_special_tokens, which 5 reads too
        cfg.pop("extra_special_tokens")
        if extra:
            cfg["additional_special_tokens"] = extra
    if template is not None and "chat_template" not in cfg:
        cfg["chat_template"] = template  # 5 writes chat_template.jinja, which 4.45 ignores
    if n is not None and not (0 < int(cfg.get("model_max_length") or 0) <= n):
        cfg["model_max_length"] = n  # not transformers' "unbounded" 1e30
    return cfg


# A GPT-2 model saved with fewer learned positions than this gets its position table
# widened to it (see widen_learned_positions).
GENERATE_POSITIONS = 1024


def _position_rows(model, rows: int) -> None:
    """Give a GPT-2 model (in place) a learned position table of ``rows`` rows: the
    first rows of the old table, and past its end copies of its last row."""
    import torch

    w = model.transformer.wpe.weight.detach()
    keep = min(rows, w.shape[0])
    new = torch.nn.Embedding(rows, w.shape[1], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight[:keep] = w[:keep]
        new.weight[keep:] = w[keep - 1]
    model.transformer.wpe = new
    model.config.n_positions = rows


def widen_learned_positions(model, upto: int = GENERATE_POSITIONS):
    """A copy of a GPT-2 model whose learned position table runs to ``upto`` rows, the
    rows past the trained ``n_positions`` repeating the last trained one; None when there
    is nothing to widen (not GPT-2, or already ``upto`` positions or more).

    Plain transformers has no vector for position ``n_positions`` of a learned-position
    model, and ``generate(max_new_tokens=...)`` past it fails with an IndexError whatever
    the saved generation config says. With the widened table, every position the model
    was trained on gives the same outputs as before (the trained rows are untouched),
    and generation past them goes on with the last trained position's vector instead of
    failing. The config records the trained count as ``trained_positions`` (what
    :func:`positions` then reports)."""
    import copy

    cfg = model.config
    n = getattr(cfg, "n_positions", None)
    if getattr(cfg, "model_type", "") != "gpt2" or not isinstance(n, int) or n >= upto:
        return None
    wide = copy.deepcopy(model)
    _position_rows(wide, upto)
    wide.config.trained_positions = n
    return wide


def narrow_learned_positions(model):
    """Undo :func:`widen_learned_positions` on a loaded model (in place): the position
    table cut back to the ``trained_positions`` rows, so inside this tool a saved model is
    the model as trained (same weights, same fingerprint, same limits)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "trained_positions", None)
    if getattr(cfg, "model_type", "") != "gpt2" or not isinstance(n, int):
        return model
    if 0 < n < model.transformer.wpe.num_embeddings:
        _position_rows(model, n)
    del cfg.trained_positions
    return model


def save_pretrained(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Save a model (and its tokenizer) with ``save_pretrained`` (safetensors), so that
    plain transformers (4.x and 5.x) loads both: the tokenizer's class is one both know,
    and its ``model_max_length`` is the model's positions (for a widened model, the ones
    it was trained on), not transformers' unbounded 1e30, so a pipeline's
    ``truncation=True`` keeps prompts inside the model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    n = positions(model.config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        jinja = out / "chat_template.jinja"
        template = jinja.read_text() if jinja.exists() else None
        _update_json(out / "tokenizer_config.json", lambda c: _portable_tokenizer(c, n, template))
    return out


def char_tokenizer(text: str, extra_special: tuple[str, ...] = ()):
    """A character-level fast tokenizer over the characters of ``text`` (sorted, so the
    same text always gives the same ids), with ``<|endoftext|>`` as BOS/EOS/pad and
    ``<unk>`` for unseen characters. It saves and reloads with ``save_pretrained`` /
    ``AutoTokenizer`` like any other tokenizer, so char-level models can be exported and
    served like BPE ones."""
    tf = require_transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<unk>", *extra_special]
    chars = sorted(set(text))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=list(extra_special) or None,
        # no token_type_ids: transformers 4 would hand them to generate(), which refuses
        model_input_names=["input_ids", "attention_mask"],
    )
