"""A served teacher's next-token distribution on given token sequences, through the
completions API's ``echo`` scoring (as ``dk serve-teacher`` and vLLM offer it).

Each sequence is sent as token ids with ``echo: true, max_tokens: 0, logprobs: K``: the
server generates nothing and returns, for every token after the first, the log-probs of
its K most probable tokens given what precedes it. A causal_lm recipe with
``teacher: {kind: api}`` trains on these as a top-k + tail target (the tail is
1 − Σ of the K probabilities), on the rows of its data or, under ``distill.mode: gkd``,
on the answers the student sampled: the teacher grades every sampled token without its
weights ever being on the training machine.

The student's tokenizer must be the served model's: the echoed tokens are checked
against the ids sent (one line naming the first position that differs). Tokens are asked
for as ids (``return_tokens_as_token_ids``, which dk serve-teacher and vLLM take), since
several tokens may decode to one text (the byte pieces of a character); a server that
refuses the field is asked for texts, and then every alternative must decode from
exactly one token of the tokenizer.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..errors import DKError
from .client import ApiClient, RetryPolicy, TeacherRejected
from .openai_api import token_id
from .recipe import ClientCfg, TeacherCfg
from .sampler import LOGPROB_FLOOR


class ServedTeacherSpec(BaseModel):
    """``teacher: {kind: api}`` of a causal_lm recipe: the endpoint(s), the served
    model's name and K, the number of alternatives asked per token (at most the server's
    cap; OpenAI-style servers cap it at 20). The key is read from ``api_key_env``, never
    from the recipe. Retries and concurrency as in ``dk generate``'s ``client:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["api"]
    base_url: list[str] | str | None = None  # env DK_TEACHER_BASE_URL
    model: str | None = None  # env DK_TEACHER_MODEL
    api_key_env: str = "DK_TEACHER_API_KEY"
    top_logprobs: int = Field(20, ge=1)
    client: ClientCfg = Field(default_factory=ClientCfg)

    def scorer(self, tokenizer) -> EchoScorer:
        """The scorer (endpoints, model name and key resolved: one line if missing)."""
        t = TeacherCfg(base_url=self.base_url, model=self.model, api_key_env=self.api_key_env)
        c = self.client
        retry = RetryPolicy(c.max_attempts, c.backoff_s, c.max_backoff_s, c.timeout_s)
        return EchoScorer(t.urls(), t.model_name(), tokenizer, self.top_logprobs,
                          api_key=t.key(), concurrency=c.concurrency, retry=retry)  # fmt: skip


class EchoScorer:
    """``scorer(seqs)`` → per sequence ``(ids (n-1, K), logprobs (n-1, K))``: row ``j``
    is the teacher's top K for token ``j + 1`` given tokens ``0..j``."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        tokenizer,
        top_logprobs: int,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        retry: RetryPolicy | None = None,
    ):
        self.urls, self.model, self.k = urls, model, top_logprobs
        self.api_key, self.concurrency = api_key, concurrency
        self.retry = retry or RetryPolicy()
        self.tok = tokenizer
        self._ids: dict[str, int] | None = None  # token text → id (-1: several ids)
        self._pieces: dict[int, str] = {}  # id → its text (decoded alone)
        self.requests = 0  # sequences scored (one request each)
        self.as_ids = True  # ask for tokens as token_id:N (probe: unless the server refuses)

    def probe(self) -> bool:
        """Before any training (one line otherwise): the endpoint answers, echoes tokens
        spread over the vocabulary as the student's tokenizer decodes them, and scores
        two tokens with K alternatives. Whether the server names tokens by id
        (``as_ids``, handed to the other processes)."""
        if self.k > len(self.tok):
            raise DKError(f"teacher.top_logprobs: {self.k} is more than the "
                          f"{len(self.tok)} tokens of the vocabulary")  # fmt: skip
        # the echoed texts of tokens spread over the vocabulary: the served tokenizer is
        # the student's (answers by id cannot tell; special tokens may echo as "")
        special = set(getattr(self.tok, "all_special_ids", None) or [])
        n = len(self.tok)
        seq = [i for i in range(0, n, max(n // 64, 1)) if i not in special][:64]
        seq = seq if len(seq) >= 2 else [0, 1]
        body = self._body(seq) | {"logprobs": 1}
        body.pop("return_tokens_as_token_ids", None)
        ((answer, _),) = asyncio.run(self._send([body]))
        lp = answer["choices"][0].get("logprobs") or {}
        toks = lp.get("tokens") if isinstance(lp, dict) else None
        if not isinstance(toks, list) or len(toks) != len(seq):
            raise DKError("teacher echo: the endpoint does not echo token-id prompts with "
                          "logprobs (dk serve-teacher, vLLM do)")  # fmt: skip
        for j, (t, i) in enumerate(zip(toks, seq, strict=True)):
            self._same_token(t, i, "teacher echo (probe)", j)
        try:
            asyncio.run(self._score_all([seq[:2]], [0]))
        except TeacherRejected as e:
            if "return_tokens_as_token_ids" not in str(e):
                raise
            self.as_ids = False  # a server without the field: token texts
            asyncio.run(self._score_all([seq[:2]], [0]))
        return self.as_ids

    def __call__(
        self, seqs: list[list[int]], starts: list[int] | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Row ``j`` of sequence ``i``'s answer is the top K for its token
        ``starts[i] + j + 1`` (default start 0: every token after the first)."""
        starts = starts if starts is not None else [0] * len(seqs)
        scored = asyncio.run(self._score_all(seqs, starts))
        self.requests += len(seqs)
        return scored

    async def _send(self, bodies: list[dict]) -> list:
        client = ApiClient(
            self.urls, api="completions", api_key=self.api_key,
            concurrency=self.concurrency, retry=self.retry,
        )  # fmt: skip
        async with client:
            return await asyncio.gather(*(client.request(b) for b in bodies))

    async def _score_all(self, seqs: list[list[int]], starts: list[int]):
        answers = await self._send([self._body(s) for s in seqs])
        return [
            self._parse(s, a, i, start)
            for i, (s, (a, _), start) in enumerate(zip(seqs, answers, starts, strict=True))
        ]

    def _body(self, seq: list[int]) -> dict:
        body = {"model": self.model, "prompt": seq, "echo": True, "max_tokens": 0,
                "logprobs": self.k, "temperature": 1.0}  # fmt: skip
        return body | ({"return_tokens_as_token_ids": True} if self.as_ids else {})

    def _parse(self, seq: list[int], answer: dict, row: int, start: int) -> tuple[Tensor, Tensor]:
        where = f"teacher echo (row {row})"
        lp = answer["choices"][0].get("logprobs")
        if not isinstance(lp, dict):
            raise DKError(f"{where}: the answer has no logprobs; the endpoint must support "
                          "completions echo with logprobs (dk serve-teacher, vLLM)")  # fmt: skip
        toks, tops = lp.get("tokens"), lp.get("top_logprobs")
        if not isinstance(toks, list) or not isinstance(tops, list) or len(toks) != len(tops):
            raise DKError(f"{where}: logprobs without matching 'tokens' and 'top_logprobs' lists")
        if len(toks) != len(seq):
            raise DKError(
                f"{where}: {len(seq)} token ids sent, {len(toks)} echoed; the endpoint "
                "does not echo token-id prompts as sent"
            )
        ids: list[list[int]] = []
        lps: list[float] = []
        for j in range(1, len(seq)):
            self._same_token(toks[j], seq[j], where, j)
            if j <= start:
                continue
            alts = tops[j]
            if not isinstance(alts, dict) or len(alts) != self.k:
                got = len(alts) if isinstance(alts, dict) else "no"
                raise DKError(
                    f"{where}, token {j}: {got} alternatives where {self.k} were asked "
                    "(two tokens that decode alike count once; serve token ids)"
                )
            ids.append([self._id(a, where, j) for a in alts])
            lps.extend(alts.values())
        try:
            lp_t = torch.tensor(lps, dtype=torch.float64)
        except (TypeError, ValueError):
            lp_t = None
        if lp_t is None or bool(lp_t.isnan().any()) or bool((lp_t > 1e-4).any()):
            bad = next(v for v in lps if not isinstance(v, (int, float)) or not v <= 1e-4)
            raise DKError(f"{where}: a log-prob of {bad!r}, not a number ≤ 0")
        # -inf (an impossible token): the floor servers write in JSON, as a finite number
        lp_t = lp_t.clamp(LOGPROB_FLOOR, 0.0).to(torch.float32).reshape(len(ids), self.k)
        return torch.tensor(ids, dtype=torch.long).reshape(len(ids), self.k), lp_t

    def _id(self, s: str, where: str, j: int) -> int:
        named = token_id(s)
        if named is not None and named < len(self.tok):
            return named
        if self._ids is None:  # each id decoded on its own, as servers report tokens
            self._ids = {}
            for i in range(len(self.tok)):
                t = self.tok.decode([i])
                self._ids[t] = -1 if t in self._ids else i
        i = self._ids.get(s)
        if i is not None and i >= 0:
            return i
        why = "is no token" if i is None else "decodes from several tokens"
        raise DKError(f"{where}, token {j}: the teacher's alternative {s!r} {why} of the "
                      "student's tokenizer; serve the student's tokenizer (token ids)")  # fmt: skip

    def _same_token(self, text, want: int, where: str, j: int) -> None:
        named = token_id(text)
        if named is not None:
            ok = named == want
        else:
            piece = self._pieces.get(want)
            if piece is None:
                piece = self._pieces[want] = self.tok.decode([want])
            ok = text == piece
        if not ok:
            raise DKError(
                f"{where}, token {j}: the teacher echoed {text!r} for the student's "
                f"{self.tok.decode([want])!r}; the served model must use the student's tokenizer"
            )


def batch_target(scorer: EchoScorer, input_ids: Tensor, labels: Tensor, valid: Tensor):
    """The teacher's top-k target at a batch's labelled positions, in the order of
    ``valid.nonzero()`` (row-major, the order of ``h[valid]``): ``(ids (n, K),
    logprobs (n, K), tail (n,))``. Row ``i`` is sent up to its last label: the inputs to
    there and that label (position ``p`` predicts token ``p + 1``); its alternatives are
    read from its first label on."""
    valid = valid.cpu()
    seqs, starts, rows = [], [], []
    for i in range(input_ids.shape[0]):
        pos = valid[i].nonzero().flatten()
        if len(pos) == 0:
            continue
        first, last = int(pos[0]), int(pos[-1])
        seqs.append([*input_ids[i, : last + 1].tolist(), int(labels[i, last])])
        starts.append(first)
        rows.append(pos - first)
    if not seqs:  # no labelled position (no request): an empty target, as h[valid] is
        k = scorer.k
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0)
    scored = scorer(seqs, starts)
    ids = torch.cat([s[0][r] for r, s in zip(rows, scored, strict=True)])
    lps = torch.cat([s[1][r] for r, s in zip(rows, scored, strict=True)])
    tail = (1.0 - lps.exp().sum(-1)).clamp_min(0.0)
    return ids, lps, tail
