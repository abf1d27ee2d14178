"""``dk store check``: a signal doctor that refuses or warns before training.

It reads a store shard by shard (streaming: one chunk of rows at a time, whatever the
store's size) and reports one line per finding, ``refuse: ...`` or ``warn: ...``:

- recipe-independent (always): every file's SHA-256; NaN/inf in any stored float (masked
  positions included: 0·NaN is NaN in a loss); top-k log-probs > 0 or not sorted; tail
  mass outside [0, 1]; top-k + tail, dense or head probabilities not summing to 1; shards
  with no valid position (refused) and examples with none (warned); a teacher that puts
  its whole mass on the label at every position, where labels are known (a store of
  sampled responses keeps them): KD is then CE.
- ``against`` a recipe (classify or causal_lm; :mod:`darkknowledge.doctor`, a layer above
  the store): the student's vocabulary size, tokenizer digest and special ids; the
  alignment of the stored positions with the recipe's tokenisation (the fingerprint's
  data digest, and position by position where the store keeps its token ids); the
  stored temperature against the loss's; a KD term of weight 0. The recipe's labels then
  also feed the KD = CE check.

:func:`check_store` returns the findings; nothing is raised for a bad store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DKError
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
    path: str | Path, against: Callable[[Doctor, SignalStore], Tensor | None] | None = None
) -> list[Finding]:
    """Every finding about the store ``path``. ``against(doctor, store)``: the
    recipe-dependent checks (:mod:`darkknowledge.doctor`), which return the labels of the
    store's rows ``(N, [T])`` (−1: none) when the recipe gives them, else None."""
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
            got = against(d, st)
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
    width = {"dense": st.vocab, "head": st.vocab, "topk": st.k or 1, "sampled": st.k or 1}[
        st.signal
    ]
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
            elif st.signal == "sampled":  # k draws: the counts of each position sum to k
                cnt = to_torch(mp["sample_counts"][lo:hi]).long().reshape(len(valid), -1)
                sid = to_torch(mp["sample_ids"][lo:hi]).long().reshape(len(valid), -1)
                tallies["sum"].add(valid & (cnt.sum(-1) != st.k), where)
                c, at = cnt.max(-1)
                top_p, top_id = c.double() / st.k, sid.gather(1, at[:, None]).squeeze(1)
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
