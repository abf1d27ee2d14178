"""``dk store check --against RECIPE``: the recipe-dependent checks of the signal doctor
(:mod:`darkknowledge.store.check` has the rest): the student's vocabulary, tokenizer and
special ids; the alignment of the stored positions with the recipe's tokenisation; the
stored temperature against the loss's; a KD term of weight 0. Each finding is one line
(``refuse:`` or ``warn:``); a recipe that does not load is one refusal."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .store import fingerprint as fp
from .store.check import Doctor, Finding, check_store
from .store.reader import SignalStore


def check(
    path: str | Path, against: str | Path | None = None, overrides: list[str] | None = None
) -> list[Finding]:
    """Every finding about the store ``path``, checked against the recipe ``against``."""
    if against is None:
        return check_store(path)
    return check_store(path, lambda d, st: _against(d, st, Path(against), overrides or []))


def _against(d: Doctor, st: SignalStore, recipe_path: Path, overrides: list[str]):
    """The recipe-dependent checks; the labels of the store's rows ``(N, [T])`` (−1:
    none) when the recipe gives them for exactly the stored inputs, else None."""
    from .families import load_family_recipe

    fam, recipe, _ = load_family_recipe(recipe_path, overrides)
    tc = recipe.teacher
    if tc is None:
        d.refuse(f"{recipe_path}: the recipe has no teacher: a store would not be used")
        return None
    if getattr(tc, "kind", None) == "store" and Path(tc.path).resolve() != st.path.resolve():
        d.warn(f"teacher.path is {tc.path}, not {st.path}: checked as if it were this store")
    if fam == "classify":
        return _classify(d, st, recipe)
    if fam == "causal_lm":
        return _causal_lm(d, st, recipe)
    d.refuse(f"{recipe_path}: --against takes classify and causal_lm recipes, not {fam}")
    return None


def _fingerprint(d: Doctor, st: SignalStore, expect: dict, what: dict[str, str]) -> bool:
    """Refuse the first fingerprint field that differs (``what``: a field's meaning)."""
    f = fp.first_difference(st.fingerprint, expect)
    if f is None:
        return True
    d.refuse(
        f"fingerprint field '{f}' differs: {what.get(f, 'the store was labelled for another run')}"
        f" (store {fp._short(st.fingerprint.get(f))}, recipe {fp._short(expect[f])})"
    )
    return False


def _temperature(d: Doctor, st: SignalStore, name: str, t: float | None) -> None:
    if st.signal in ("topk", "sampled") and t is not None and abs(t - st.temperature) > 1e-9:
        d.refuse(
            f"temperature: the top-k store holds probabilities at {st.temperature:g}, "
            f"{name} is {t:g}; relabel at {t:g} or set {name}={st.temperature:g}"
        )


def _classify(d: Doctor, st: SignalStore, recipe):
    from .data import load_data
    from .pipeline import data_preprocessing
    from .store.fingerprint import json_digest, tensor_digest

    if st.task != "classification":
        d.refuse(f"the store holds {st.task} signals; a classify recipe needs classification ones")
        return None
    data = load_data(recipe.data)
    classes = data.train.num_classes
    if st.vocab != classes:
        d.refuse(
            f"vocabulary: the store holds {st.vocab}-way signals, the data has {classes} classes"
        )
    loss = recipe.resolved_loss()
    kd = 0.0
    for name, c in loss.active().items():
        _temperature(d, st, f"loss.{name}.temperature", getattr(c, "temperature", None))
        if name != "ce":
            kd += c.weight * (c.alpha if name == "hinton_kd" else 1.0)
    if kd == 0:
        terms = [n for n in loss.active() if n != "ce"] or ["(none)"]
        d.refuse(
            f"KD weight is 0 (loss terms {', '.join(terms)}): the store's signals cannot "
            "move the student; give a KD term a weight > 0 (hinton_kd: weight and alpha)"
        )
    t = data.transfer
    expect = {
        "data": tensor_digest(t.x),
        "example_ids": tensor_digest(t.ids),
        "preprocessing": json_digest(data_preprocessing(recipe)),
        **getattr(recipe.teacher, "expect", {}),
    }
    meaning = {
        "data": f"the store was labelled on other inputs than the recipe's {len(t.x)} "
        f"transfer examples (the store has {len(st)})",
        "example_ids": "the recipe's example ids are not the stored ones",
        "preprocessing": "the recipe's data section (preprocessing) differs from the store's",
    }
    if not _fingerprint(d, st, expect, meaning) or t.y is None:
        return None
    labels = torch.full((len(st),), -1, dtype=torch.long)
    labels[st.rows_of(t.ids)] = t.y.long()
    return labels


def _causal_lm(d: Doctor, st: SignalStore, recipe):
    from .lm.pipeline import Data, _store_preprocessing, _token_blocks, load_tokenizers
    from .lm.recipe import TextData
    from .store.fingerprint import json_digest, tensor_digest

    if st.task != "sequence":
        d.refuse(f"the store holds {st.task} signals; a causal_lm recipe needs token ones")
        return None
    dist = recipe.distill
    if dist.mode != "token":
        d.refuse(f"distill.mode is {dist.mode}: only token-level KD trains from a store")
    if dist.loss.kd_weight == 0:
        d.refuse(
            "KD weight is 0 (distill.loss.kd_weight: 0): the store's signals cannot move "
            "the student; set distill.loss.kd_weight > 0"
        )
    _temperature(d, st, "distill.loss.temperature", dist.loss.temperature)
    s_tok, _, text = load_tokenizers(recipe)
    vocab = len(s_tok)
    if st.vocab != vocab:
        d.refuse(
            f"vocabulary: the store holds {st.vocab}-way token signals, the student's "
            f"tokenizer has {vocab} tokens"
        )
        return None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        i = getattr(s_tok, name, None)
        if i is not None and not 0 <= i < st.vocab:
            d.refuse(f"special ids: the student's {name} {i} is outside the store's {st.vocab}")
    if st.fingerprint.get("tokenizer") != json_digest(s_tok.get_vocab()):
        d.refuse(
            "tokenizer: the store was labelled with another tokenizer of the same size "
            "(its token strings or ids differ: fingerprint 'tokenizer'); the positions "
            "cannot be compared"
        )
        return None
    data = Data(recipe, s_tok, None, text)
    if not isinstance(recipe.data, TextData):
        return _chat_alignment(d, st, recipe, data)
    if not data.blocks:
        d.refuse("data.sampling is random: a store serves data.sampling: blocks only")
        return None
    x, ids, _ = _token_blocks(data)
    n, block = x.shape
    stored_t = st._maps[0]["mask"].shape[1]
    if stored_t != block:
        d.refuse(
            f"alignment: the store's examples are {stored_t} tokens long, the recipe's "
            f"blocks {block} (data.block_size): every stored position would be misaligned"
        )
        return None
    expect = {
        "data": tensor_digest(x),
        "example_ids": tensor_digest(ids),
        "preprocessing": json_digest(_store_preprocessing(recipe)),
        **getattr(recipe.teacher, "expect", {}),
    }
    meaning = {
        "data": f"alignment: the recipe's {n} token blocks of {block} are not the "
        f"{len(st)} the store was labelled on (another text or split)",
        "example_ids": f"alignment: the recipe's {n} block ids are not the store's {len(st)}",
        "preprocessing": "the recipe's data section (preprocessing) differs from the store's",
    }
    if st.inputs is not None and _first_misaligned(d, st, x, ids):
        return None  # a store that keeps its token ids: the first position is named
    if not _fingerprint(d, st, expect, meaning):
        return None
    labels = torch.full((len(st), block), -1, dtype=torch.long)
    labels[st.rows_of(ids), :-1] = x[:, 1:]  # position t predicts token t + 1
    return labels


def _first_misaligned(d: Doctor, st: SignalStore, x: Tensor, ids: Tensor) -> bool:
    """Refuse the first block whose tokens differ from the stored ones (True if one did)."""
    at = {int(e): r for r, e in enumerate(st.input_ids.tolist())}
    for i, e in enumerate(ids.tolist()):
        if e not in at:
            d.refuse(f"alignment: block {e} is not in the store")
            return True
        a, b = x[i], st.inputs[at[e], : x.shape[1]]
        diff = (a[: len(b)] != b).nonzero()
        if len(diff):
            p = int(diff[0])
            d.refuse(
                f"alignment: example {e}, position {p}: the recipe's token is {int(a[p])}, "
                f"the store's {int(b[p])}"
            )
            return True
    return False


def _chat_alignment(d: Doctor, st: SignalStore, recipe, data):
    """Chat rows joined by key to a store of sampled responses, token by token."""
    from .lm.data import read_keys
    from .lm.pipeline import join_responses

    dd = recipe.data
    if st.keys is None or st.inputs is None:
        d.refuse(
            "the store has no (prompt id, sample) keys, so chat rows cannot be joined to it "
            "(on chat data use a store from `dk store from-api`)"
        )
        return None
    keys = data.train_keys or read_keys(dd.train, dd.id_key, dd.sample_key)[: len(data.train)]
    j = join_responses(st, keys, data.train.student)
    if j.missing is not None:
        i, key = j.missing
        d.refuse(
            f"alignment: {dd.train}: training row {i + 1} (id {key[0]!r}, sample "
            f"{key[1]}) is not in the store"
        )
        return None
    if j.covered == 0:
        d.refuse(
            "alignment: no response token of the chat rows agrees with the sampled tokens "
            "the store holds (another text, chat template or tokenizer)"
        )
        return None
    if j.first is not None:
        i, key, m, a, b = j.first
        d.warn(
            f"alignment: training row {i + 1} (id {key[0]!r}, sample {key[1]}), response "
            f"position {m}: the student's token is {a}, the store's {b}; KD covers "
            f"{j.covered / max(j.total, 1):.1%} of the response tokens (the rest trains with CE)"
        )
    return None  # the stored inputs are the labels (see _stored_labels)
