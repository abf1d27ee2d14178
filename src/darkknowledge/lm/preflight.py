"""The pre-flight check, run before step 0: can this teacher teach this student token by
token, and will the configured batch fit in memory?

Everything here fails with one line naming both sides (``teacher … student …``), so a
vocabulary or tokenizer mismatch is found before any training, never as a shape error
(or a silently wrong run) later.
"""

from __future__ import annotations

import os

from ..errors import DKError
from . import models as M

SPECIALS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _tok_len(tok) -> int:
    return len(tok)


def check_pair(teacher, t_tok, student, s_tok, *, chat: bool) -> dict:
    """Vocabulary, tokenizer, special tokens and chat templates of a teacher/student pair."""
    tv, sv = M.vocab_size(teacher), M.vocab_size(student)
    if tv != sv:
        raise DKError(
            f"vocabulary mismatch: the teacher's LM head has {tv:,} outputs (tokenizer "
            f"{_tok_len(t_tok):,} tokens), the student's {sv:,} (tokenizer {_tok_len(s_tok):,}); "
            "token-level distillation needs the same vocabulary: give the student the "
            "teacher's tokenizer and vocabulary size"
        )
    if t_tok is not s_tok:
        a, b = t_tok.get_vocab(), s_tok.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])
            tok, idx = diff[0]
            raise DKError(
                f"tokenizer mismatch: teacher tokenizer has {len(a):,} tokens, student "
                f"{len(b):,}; they differ first at token {tok!r} (id {idx}): both models must "
                "use the same tokenizer"
            )
    for key in SPECIALS:
        t_id, s_id = getattr(t_tok, key, None), getattr(s_tok, key, None)
        if key == "pad_token_id" and (t_id is None or s_id is None):
            continue  # padding falls back to EOS and is masked anyway
        if t_id != s_id:
            raise DKError(
                f"special token mismatch: teacher {key[:-3]} id {t_id}, student {s_id}; "
                "BOS/EOS must be the same token for both"
            )
    for name, tok, n in (("teacher", t_tok, tv), ("student", s_tok, sv)):
        if len(tok) > n:
            raise DKError(
                f"{name}: its tokenizer has {len(tok):,} tokens but its LM head only {n:,} "
                "outputs; ids past the head would crash"
            )
    info = {"vocab": tv, "tokenizer_tokens": len(s_tok)}
    if chat:
        tt, st = getattr(t_tok, "chat_template", None), getattr(s_tok, "chat_template", None)
        info["chat_template"] = (
            "same" if tt == st else "different (each model renders its own; responses aligned)"
        )
    return info


def check_length(model, max_length: int, who: str) -> None:
    n = M.max_positions(model)
    if n is not None and max_length > n:
        raise DKError(
            f"{who}: sequences of {max_length} tokens but the model has {n} positions; "
            "lower data.block_size / data.max_length"
        )


def memory_estimate(
    student,
    teacher,
    *,
    batch: int,
    seq: int,
    chunk: int,
    bytes_per: int = 4,
    trainable_params: int | None = None,
) -> dict:
    """A rough peak-memory estimate (bytes) of one training step of the configured batch.

    Weights (student, teacher), AdamW state and gradients of the trainable parameters;
    the student's stored activations (≈ 34·B·T·H per layer plus 5·heads·B·T² for the
    attention scores: Korthikanti et al. 2022, scaled to the dtype), the teacher's largest
    single layer (no grad), and the chunked LM head: one chunk's logits for both models
    and their softmaxes, plus the gradient of the student's hidden states.
    """
    cfg = M.unwrap(student).config
    h = getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", 0)
    layers = getattr(cfg, "n_layer", None) or getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "n_head", None) or getattr(cfg, "num_attention_heads", 1)
    v = M.vocab_size(student)
    p_s = M.param_count(student)
    p_train = (
        M.param_count(student, trainable=True) if trainable_params is None else trainable_params
    )
    p_t = M.param_count(teacher) if teacher is not None else 0
    scale = bytes_per / 2
    acts = layers * (34 * batch * seq * h + 5 * heads * batch * seq * seq) * scale
    teacher_act = 0
    if teacher is not None:
        tc = M.unwrap(teacher).config
        th = getattr(tc, "n_embd", None) or getattr(tc, "hidden_size", 0)
        t_heads = getattr(tc, "n_head", None) or getattr(tc, "num_attention_heads", 1)
        teacher_act = (16 * batch * seq * th + 2 * t_heads * batch * seq * seq) * bytes_per
    n_models = 2 if teacher is not None else 1
    head = min(chunk, batch * seq) * v * 4 * 3 * n_models + batch * seq * h * bytes_per
    est = {
        "weights": (p_s + p_t) * bytes_per,
        "grads_and_adam": p_train * 4 * 3,
        "activations": int(acts + teacher_act),
        "lm_head_chunk": int(head),
    }
    est["total"] = int(sum(est.values()))
    return est


def available_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def preflight(
    teacher,
    t_tok,
    student,
    s_tok,
    *,
    max_length: int,
    batch: int,
    chunk: int,
    chat: bool,
    bytes_per: int = 4,
) -> dict:
    """All checks; returns what they found (written to the run folder)."""
    info: dict = {}
    if teacher is not None:
        info.update(check_pair(teacher, t_tok, student, s_tok, chat=chat))
        check_length(teacher, max_length, "teacher")
    else:
        info["vocab"] = M.vocab_size(student)
    check_length(student, max_length, "student")
    if len(s_tok) > M.vocab_size(student):
        raise DKError(
            f"student: its tokenizer has {len(s_tok):,} tokens but its LM head only "
            f"{M.vocab_size(student):,} outputs"
        )
    info["max_length"] = max_length
    est = memory_estimate(
        student, teacher, batch=batch, seq=max_length, chunk=chunk, bytes_per=bytes_per
    )
    info["memory_estimate"] = est
    avail = available_memory()
    if avail is not None and est["total"] > avail:
        raise DKError(
            f"the configured batch needs about {est['total'] / 2**30:.1f} GiB (estimate), "
            f"more than this machine's {avail / 2**30:.1f} GiB; lower train.batch_size "
            "(raise train.grad_accum to keep the effective batch) or distill.chunk"
        )
    return info
