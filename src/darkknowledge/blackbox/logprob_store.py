"""An API teacher's log-probabilities → a top-k + tail signal store.

``dk generate`` keeps each sample's ``logprobs`` (the sampled tokens and the server's
``top_logprobs`` alternatives, in the chat or the completions shape) in
``results.jsonl``. :func:`logprobs_to_store` turns them into a token-level store that
the sparse losses read like any other: per response position the K alternatives' ids and
log-probabilities and the tail mass 1 − Σ exp(log-probs), with a mask over positions.

Token strings are mapped to ids with the tokenizer the student shares with the teacher:
each must be exactly one token of it (or the ``token_id:N`` form some servers return),
otherwise the conversion stops with a one-line error naming the token. K is what the
server returned (its ``top_logprobs`` cap applies); a position with fewer alternatives
is an error too, since a store holds the same K everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DKError
from ..signals import Signals
from ..store import LabelSpec, label
from ..store.fingerprint import json_digest
from .generate import read_results
from .openai_api import token_id


def _positions(lp: dict, where: str) -> list[tuple[str, dict[str, float]]]:
    """(sampled token, {alternative: log-prob}) per position, from either API shape."""
    if isinstance(lp.get("content"), list):  # chat: [{token, logprob, top_logprobs: [...]}]
        out = []
        for t in lp["content"]:
            alts = {a["token"]: float(a["logprob"]) for a in t.get("top_logprobs") or []}
            out.append((t["token"], alts))
        return out
    if isinstance(lp.get("tokens"), list) and isinstance(lp.get("top_logprobs"), list):
        return [
            (tok, {a: float(v) for a, v in (alts or {}).items()})
            for tok, alts in zip(lp["tokens"], lp["top_logprobs"], strict=True)
        ]
    raise DKError(f"{where}: logprobs in an unknown shape (expected chat 'content' or "
                  "completions 'tokens' + 'top_logprobs')")  # fmt: skip


class _TokenIds:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, s: str, where: str) -> int:
        if s in self.cache:
            return self.cache[s]
        i = token_id(s)
        if i is None:
            ids = self.tok.encode(s, add_special_tokens=False)
            if len(ids) != 1:
                raise DKError(
                    f"{where}: the teacher's token {s!r} is {len(ids)} tokens of this "
                    "tokenizer, not one: use the teacher's own tokenizer"
                )
            i = ids[0]
        self.cache[s] = i
        return i


class _ListTeacher:
    """Serves the dense logits that reconstruct each stored position exactly: the K
    log-probs at their ids, the tail mass spread evenly over the other outputs."""

    combine = "api"

    def __init__(self, ids: Tensor, lps: Tensor, vocab: int):
        self.ids, self.lps, self.vocab = ids, lps, vocab  # (N, T, K)

    def modules(self):
        return []

    def signals(self, batch) -> Signals:
        rows = batch.ids.long()
        ids, lps = self.ids[rows], self.lps[rows]  # (B, T, K)
        k = ids.shape[-1]
        tail = (1.0 - lps.double().exp().sum(-1)).clamp_min(1e-12)  # (B, T)
        fill = (tail / max(self.vocab - k, 1)).log().float()
        # keep the K alternatives on top even where they are less likely than a tail share
        fill = torch.minimum(fill, lps.min(-1).values - 1e-3)
        z = fill.unsqueeze(-1).expand(*ids.shape[:-1], self.vocab).clone()
        z.scatter_(-1, ids, lps)
        return Signals(logits=z)


def logprobs_to_store(
    results: str | Path,
    out: str | Path,
    tokenizer,
    *,
    samples: str = "all",
    dtype: str = "q8",
    force: bool = False,
):
    """Write a top-k + tail store from ``results.jsonl`` of ``dk generate``.

    ``samples``: ``all`` (every sample with log-probs) or ``correct`` (those the verifier
    accepted). Example ids are the row order of the samples taken (0, 1, ...); each is
    keyed by its prompt id and sample index, and the store keeps the sampled tokens, so a
    ``causal_lm`` recipe on chat data (``dk generate``'s ``sft.jsonl``) joins its rows to
    the store by key (:func:`darkknowledge.lm.pipeline.open_token_store`)."""
    results = Path(results)
    if samples not in ("all", "correct"):
        raise DKError(f"samples must be 'all' or 'correct', not {samples!r}")
    rows = read_results(results)
    if not rows:
        raise DKError(f"{results}: no answered prompts")
    to_id = _TokenIds(tokenizer)
    seqs: list[list[int]] = []
    keys: list[tuple[str, int]] = []
    tops: list[list[list[tuple[int, float]]]] = []
    k = None
    for pid, row in rows.items():
        for s in row.get("samples", []):
            if samples == "correct" and not (s.get("verdict") or {}).get("correct"):
                continue
            if s.get("logprobs") is None:
                continue
            where = f"{results.name}: prompt {pid!r} sample {s.get('index')}"
            pos = _positions(s["logprobs"], where)
            seq, top = [], []
            for j, (tok, alts) in enumerate(pos):
                if k is None:
                    k = len(alts)
                if len(alts) != k or k == 0:
                    raise DKError(f"{where}: position {j} has {len(alts)} alternatives, "
                                  f"expected {k} (a store keeps the same K everywhere)")  # fmt: skip
                seq.append(to_id(tok, where))
                top.append(sorted(((to_id(a, where), v) for a, v in alts.items()),
                                  key=lambda t: -t[1]))  # fmt: skip
            if seq:
                seqs.append(seq)
                tops.append(top)
                keys.append((str(pid), int(s.get("index", 0))))
    if not seqs or k is None:
        raise DKError(f"{results}: no samples with log-probs (set sampling.top_logprobs)")
    n, t_max = len(seqs), max(map(len, seqs))
    x = torch.zeros(n, t_max, dtype=torch.long)
    mask = torch.zeros(n, t_max, dtype=torch.bool)
    ids = torch.zeros(n, t_max, k, dtype=torch.long)
    lps = torch.full((n, t_max, k), -30.0)
    for i, (seq, top) in enumerate(zip(seqs, tops, strict=True)):
        x[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
        ids[i, : len(seq)] = torch.tensor([[a for a, _ in p] for p in top])
        lps[i, : len(seq)] = torch.tensor([[v for _, v in p] for p in top])
    for i in range(n):  # padding: any K distinct ids, masked out anyway
        ids[i, len(seqs[i]) :] = torch.arange(k)
    vocab = len(tokenizer)
    if int(ids.max()) >= vocab:
        raise DKError(f"{results}: token id {int(ids.max())} is outside the tokenizer's {vocab}")
    teacher = _ListTeacher(ids, lps, vocab)
    digest = hashlib.sha256(results.read_bytes()).hexdigest()
    row0 = next(iter(rows.values()))
    spec = LabelSpec(signal="topk", k=k, dtype=dtype, tail_prior=False,
                     shard_size=4096, batch_size=max(1, min(64, 2**26 // max(t_max * vocab, 1))))  # fmt: skip
    return label(
        teacher,
        x,
        torch.arange(n),
        out,
        spec,
        mask=mask,
        preprocessing={"source": "api logprobs", "results_sha256": digest, "samples": samples},
        tokenizer=json_digest(tokenizer.get_vocab()),
        describe={"teacher": row0.get("teacher"), "sampling": row0.get("sampling")},
        keys=keys,
        store_inputs=True,
        force=force,
        progress=False,
    )


__all__ = ["logprobs_to_store"]
