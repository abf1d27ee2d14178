"""``dk store check``: a signal doctor that refuses or warns before training.

It reads a store shard by shard (streaming: one chunk of rows at a time, whatever the
store's size) and reports one line per finding, ``refuse: ...`` or ``warn: ...``:

- recipe-independent (always): every file's SHA-256; NaN/inf in any stored float (masked
  positions included: 0·NaN is NaN in a loss); top-k log-probs > 0 or not sorted; tail
  mass outside [0, 1]; top-k + tail, dense or head probabilities not summing to 1; shards
  with no valid position (refused) and examples with none (warned); a teacher that puts
  its whole mass on the label at every position, where labels are known (a store of
  sampled responses keeps them): KD is then CE.
- ``against`` a recipe (classify or causal_lm): the student's vocabulary size, tokenizer
  digest and special ids; the alignment of the stored positions with the recipe's
  tokenisation (the fingerprint's data digest, and position by position where the store
  keeps its token ids); the stored temperature against the loss's; a KD term of weight
  0. The recipe's labels then also feed the KD = CE check.

:func:`check_store` returns the findings; nothing is raised for a bad store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DKError
from . import fingerprint as fp
from .format import dequantize_q8, to_torch
from .reader import SignalStore

# Tolerances: |Σ p − 1| per position, by storage dtype (q8 rounds each log-prob to
# ±0.05 nats, about ±5 % of each probability).
SUM_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 3e-2, "q8": 6e-2}
LOGPROB_TOL = 1e-4  # a log-prob above this is > 0; an ascent above it is unsorted
TAIL_TOL = 1e-4
ONE_HOT = 0.99  # top-1 mass at or above this, on the label, is one-hot
ONE_HOT_SHARE = 0.99  # ... at this share of the labelled positions or more: KD = CE
CHUNK = 1 << 22  # floats per chunk (rows × T × width)


@dataclass
class Finding:
    level: str  # "refuse" | "warn"
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"


@dataclass
class _Tally:
    """One fault class over the whole store: how many positions, and the first."""

    what: str
    level: str = "refuse"
    count: int = 0
    first: str | None = None

    def add(self, bad: Tensor, where) -> None:
        n = int(bad.sum())
        if n:
            if self.first is None:
                self.first = where(int(bad.flatten().nonzero()[0]))
            self.count += n

    def finding(self, unit: str = "position") -> Finding | None:
        if not self.count:
            return None
        return Finding(self.level, f"{self.what} at {self.count} {unit}(s) (first: {self.first})")


@dataclass
class Doctor:
    findings: list[Finding] = field(default_factory=list)

    def refuse(self, text: str) -> None:
        self.findings.append(Finding("refuse", text))

    def warn(self, text: str) -> None:
        self.findings.append(Finding("warn", text))

    @property
    def refused(self) -> bool:
        return any(f.level == "refuse" for f in self.findings)


def check_store(
    path: str | Path, against: str | Path | None = None, overrides: list[str] | None = None
) -> list[Finding]:
    """Every finding about the store ``path`` (checked against the recipe ``against``)."""
    d = Doctor()
    try:
        st = SignalStore(path, preload_bytes=0, verify=False)
    except DKError as e:
        return [Finding("refuse", str(e))]
    try:
        st.verify_all()
    except DKError as e:
        d.refuse(str(e))
    labels = _stored_labels(st)
    if against is not None:
        try:
            got = _against(d, st, Path(against), overrides or [])
        except DKError as e:
            d.refuse(str(e))
            got = None
        if got is not None:
            labels = got
    _scan(d, st, labels)
    return d.findings


# ---------------------------------------------------------------- the values


def _stored_labels(st: SignalStore) -> Tensor | None:
    """A store of sampled responses: each position's label is the token sampled there
    (the distribution stored at position t is the one token t was drawn from)."""
    if st.inputs is None or st.input_ids is None:
        return None
    out = torch.full_like(st.inputs, -1)
    out[st.rows_of(st.input_ids)] = st.inputs
    return out


def _scan(d: Doctor, st: SignalStore, labels: Tensor | None) -> None:
    """The recipe-independent checks, shard by shard, chunk by chunk."""
    seq = st.task == "sequence"
    tallies = {
        k: _Tally(w)
        for k, w in (
            ("nan", "NaN/inf in the stored signals"),
            ("pos", "top-k log-prob > 0"),
            ("sort", "top-k log-probs not sorted (descending)"),
            ("tail", "tail mass outside [0, 1]"),
            ("sum", "probabilities that do not sum to 1 (top-k + tail, or softmax)"),
        )
    }
    empty = _Tally("no valid position (every position masked)", level="warn")
    hot_n = hot_on = 0
    q8 = st.dtype == "q8"
    tol = SUM_TOL[st.dtype]
    width = {"dense": st.vocab, "head": st.vocab, "topk": st.k or 1}[st.signal]
    W, B = st.head_weight, st.head_bias
    for i, mp in enumerate(st._maps):
        name = st._files[i].name
        ids = to_torch(mp["ids"]).long()
        n = len(ids)
        T = mp["mask"].shape[1] if seq else 1
        if seq:
            mask_all = to_torch(mp["mask"]).bool()
            if not mask_all.any():
                d.refuse(f"{name}: every position of its {n} example(s) is masked: no signal")
            empty.add(
                ~mask_all.any(-1), lambda r, ids=ids, name=name: f"{name}, example id {int(ids[r])}"
            )
        step = max(1, CHUNK // max(T * width, 1))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            cids = ids[lo:hi]

            def where(f, cids=cids, name=name, T=T):
                r, t = divmod(f, T)
                return f"{name}, example id {int(cids[r])}" + (f", position {t}" if seq else "")

            valid = (
                to_torch(mp["mask"][lo:hi]).bool().reshape(-1)
                if seq
                else torch.ones(hi - lo, dtype=torch.bool)
            )
            finite = torch.ones_like(valid)
            for f in st.fields:
                if (
                    f.startswith("hidden.")
                    or f in ("logits", "head_hidden", "tail_mass")
                    or (f == "topk_logprobs" and not q8)
                ):
                    v = to_torch(mp[f][lo:hi]).float().reshape(len(valid), -1)
                    finite &= torch.isfinite(v).all(-1)
            if st.signal == "topk":
                raw = to_torch(mp["topk_logprobs"][lo:hi])
                lp = (dequantize_q8(raw) if q8 else raw.float()).reshape(len(valid), -1)
                tail = to_torch(mp["tail_mass"][lo:hi]).float().reshape(-1)
                tid = to_torch(mp["topk_ids"][lo:hi]).long().reshape(len(valid), -1)
                ok = valid & finite
                positive = ok & (lp > LOGPROB_TOL).any(-1)
                out = ok & ((tail < -TAIL_TOL) | (tail > 1 + TAIL_TOL))
                tallies["pos"].add(positive, where)
                tallies["sort"].add(ok & (lp[:, 1:] > lp[:, :-1] + LOGPROB_TOL).any(-1), where)
                tallies["tail"].add(out, where)
                total = lp.double().exp().sum(-1) + tail.double()
                # the sum once per position: not where a log-prob > 0 or the tail already is
                tallies["sum"].add(ok & ~positive & ~out & ((total - 1).abs() > tol), where)
                top_p, at = lp.max(-1)
                top_p, top_id = top_p.exp(), tid.gather(1, at[:, None]).squeeze(1)
            else:
                if st.signal == "dense":
                    logits = to_torch(mp["logits"][lo:hi]).float().reshape(len(valid), -1)
                else:  # the exact logits, recomputed through the output layer
                    h = to_torch(mp["head_hidden"][lo:hi]).float().reshape(len(valid), -1)
                    logits = F.linear(h, W, B)
                    finite &= torch.isfinite(logits).all(-1)
                p = torch.softmax(logits.double(), -1)
                total = p.sum(-1)
                tallies["sum"].add(valid & finite & ((total - 1).abs() > tol), where)
                top_p, top_id = p.max(-1)
            tallies["nan"].add(~finite, where)
            if labels is not None:
                rows = st.rows_of(cids)
                lab = labels[rows].reshape(-1)
                has = valid & finite & (lab >= 0)
                hot_n += int(has.sum())
                hot_on += int((has & (top_id == lab) & (top_p >= ONE_HOT)).sum())
    for t in tallies.values():
        if f := t.finding():
            d.findings.append(f)
    if f := empty.finding("example"):
        d.findings.append(f)
    if hot_n and hot_on >= ONE_HOT_SHARE * hot_n:
        d.warn(
            f"the teacher puts ≥ {ONE_HOT:g} of its mass on the label at {hot_on} of "
            f"{hot_n} labelled positions: its distribution is the one-hot label, so KD = CE "
            "(distillation adds nothing over the labels)"
        )


# ---------------------------------------------------------------- against a recipe


def _against(d: Doctor, st: SignalStore, recipe_path: Path, overrides: list[str]):
    """The recipe-dependent checks; the labels of the store's rows ``(N, [T])`` (−1:
    none) when the recipe gives them for exactly the stored inputs, else None."""
    from ..families import load_family_recipe

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
    if st.signal == "topk" and t is not None and abs(t - st.temperature) > 1e-9:
        d.refuse(
            f"temperature: the top-k store holds probabilities at {st.temperature:g}, "
            f"{name} is {t:g}; relabel at {t:g} or set {name}={st.temperature:g}"
        )


def _classify(d: Doctor, st: SignalStore, recipe):
    from ..data import load_data
    from ..pipeline import data_preprocessing
    from .fingerprint import json_digest, tensor_digest

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
    from ..lm.pipeline import Data, _store_preprocessing, _token_blocks, load_tokenizers
    from ..lm.recipe import TextData
    from .fingerprint import json_digest, tensor_digest

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
    if st.inputs is not None:  # a store that keeps its token ids: name the first position
        _first_misaligned(d, st, x, ids)
    if not _fingerprint(d, st, expect, meaning):
        return None
    labels = torch.full((len(st), block), -1, dtype=torch.long)
    labels[st.rows_of(ids), :-1] = x[:, 1:]  # position t predicts token t + 1
    return labels


def _first_misaligned(d: Doctor, st: SignalStore, x: Tensor, ids: Tensor) -> None:
    at = {int(e): r for r, e in enumerate(st.input_ids.tolist())}
    for i, e in enumerate(ids.tolist()):
        if e not in at:
            d.refuse(f"alignment: block {e} is not in the store")
            return
        a, b = x[i], st.inputs[at[e], : x.shape[1]]
        diff = (a[: len(b)] != b).nonzero()
        if len(diff):
            p = int(diff[0])
            d.refuse(
                f"alignment: example {e}, position {p}: the recipe's token is {int(a[p])}, "
                f"the store's {int(b[p])}"
            )
            return


def _chat_alignment(d: Doctor, st: SignalStore, recipe, data):
    """Chat rows joined by key to a store of sampled responses, token by token."""
    from ..lm.data import read_keys

    dd = recipe.data
    if st.keys is None or st.inputs is None:
        d.refuse(
            "the store has no (prompt id, sample) keys, so chat rows cannot be joined to it "
            "(on chat data use a store from `dk store from-api`)"
        )
        return None
    keys = data.train_keys or read_keys(dd.train, dd.id_key, dd.sample_key)[: len(data.train)]
    by_key = dict(zip(st.keys, st.input_ids.tolist(), strict=True))
    row_of = {int(e): r for r, e in enumerate(st.input_ids.tolist())}
    mask = torch.cat([to_torch(mp["mask"]).bool() for mp in st._maps])  # (N, T) u8 → bool
    lengths = mask.sum(-1)
    covered = total = 0
    first = None
    for i, key in enumerate(keys):
        if key not in by_key:
            d.refuse(
                f"alignment: {dd.train}: training row {i + 1} (id {key[0]!r}, sample "
                f"{key[1]}) is not in the store"
            )
            return None
        r = row_of[by_key[key]]
        ex = data.train.student[i]
        resp = list(ex.ids[ex.n_prompt :])
        sampled = st.inputs[r, : int(lengths[r])].tolist()
        m = 0
        for a, b in zip(resp, sampled, strict=False):
            if a != b:
                if first is None:
                    first = (i, key, m, a, b)
                break
            m += 1
        covered, total = covered + m, total + len(resp)
    if covered == 0:
        d.refuse(
            "alignment: no response token of the chat rows agrees with the sampled tokens "
            "the store holds (another text, chat template or tokenizer)"
        )
        return None
    if first is not None:
        i, key, m, a, b = first
        d.warn(
            f"alignment: training row {i + 1} (id {key[0]!r}, sample {key[1]}), response "
            f"position {m}: the student's token is {a}, the store's {b}; KD covers "
            f"{covered / max(total, 1):.1%} of the response tokens (the rest trains with CE)"
        )
    return None  # the stored inputs are the labels (see _stored_labels)
