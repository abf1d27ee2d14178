"""The sampler behind ``dk serve-teacher``: one causal LM + tokenizer, sampled
token by token with a KV cache, so that text can be streamed as it is made.

:meth:`Generator.pieces` yields, step by step, what each of the ``n`` samples gained
(:class:`Piece`: text to append, the tokens whose log-probabilities are now final, and
at the end the finish reason). A streamed answer forwards the pieces; a plain answer joins
them, so the two are the same text and log-probs by construction.

- Sampling uses only the request's parameters (``temperature``: 0, or below 1e-5, is
  greedy; ``top_p``) with a :class:`torch.Generator` of its own seeded by ``seed``: not
  the model's ``generation_config``, not the global RNG.
- Log-probabilities are the model's own (temperature 1, before top-p); -inf reads
  -9999 (as in vLLM), since JSON has no infinities.
- Text is detokenized incrementally (a few tokens of context, no half characters); text
  that could be the start of a stop sequence is held back until it is known not to be one.
- The ``n`` samples of one prompt are one batch (at most ``max_batch`` rows; the prompt is
  encoded once and its cache repeated). Requests run one at a time (a lock): the model is
  not thread-safe.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

DETOK_CONTEXT = 5  # tokens decoded before the new ones, so that spacing comes out right
GREEDY_BELOW = 1e-5  # a temperature this low is greedy (dividing by it would overflow)
LOGPROB_FLOOR = -9999.0  # what an impossible token's log-prob reads (JSON has no -inf)


@dataclass
class Token:
    """One token with its log-probability: ``text`` is the token decoded on its own,
    ``offset`` where it starts in its sample's text (characters)."""

    id: int
    text: str
    offset: int
    logprob: float | None = None  # None: a prompt's first token (nothing predicts it)
    top: list[tuple[str, float]] | None = None  # the k most probable tokens, best first
    top_ids: list[int] | None = None  # their ids (two tokens may decode alike)


@dataclass
class Piece:
    """What sample ``index`` gained in one step; ``finish`` ("stop", "length") on its last
    piece, with ``n_tokens``, the tokens it generated (those kept after a stop cut)."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None
    n_tokens: int = 0


@dataclass
class Sample:
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None
    n_tokens: int = 0


def collect(pieces, n: int) -> list[Sample]:
    """Join the pieces of ``n`` samples (what a non-streamed answer returns)."""
    out = [Sample() for _ in range(n)]
    for p in pieces:
        s = out[p.index]
        s.text += p.text
        s.tokens += p.tokens
        if p.finish:
            s.finish, s.n_tokens = p.finish, p.n_tokens
    return out


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


class _Row:
    """One sample being generated: incremental detokenization, stop sequences, and which
    text and tokens may be handed out."""

    def __init__(self, gen: Generator, prompt: list[int], stop: list[str], max_new: int):
        self.gen = gen
        self.stop = stop
        self.max_new = max_new
        self.ids = list(prompt[-DETOK_CONTEXT:])  # context + generated
        self.prefix = 0  # ids[prefix:read] decode to text already taken
        self.read = len(self.ids)
        self.n = 0  # generated tokens
        self.text = ""
        self.sent = 0  # characters of text handed out
        self.pending: list[Token] = []
        self.kept = 0  # tokens handed out
        self.finish: str | None = None

    def _detok(self, final: bool) -> str:
        dec = self.gen.decode
        before = dec(self.ids[self.prefix : self.read])
        now = dec(self.ids[self.prefix :])
        if final or (len(now) > len(before) and not now.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""  # an incomplete character: wait for the next token

    def step(self, index: int, tok: Token | None) -> Piece | None:
        """Add ``tok`` (None: end of sequence) and say what may be handed out."""
        start = len(self.text)
        if tok is None:
            self.text += self._detok(final=True)
            self.finish = "stop"
        else:
            tok.offset = start
            self.ids.append(tok.id)
            self.n += 1
            last = self.n >= self.max_new
            self.text += self._detok(final=last)
            self.pending.append(tok)
            if last:
                self.finish = "length"
        cut = self._stop_at(start)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
            release = [t for t in self.pending if t.offset < cut]
            safe = cut
        elif self.finish:
            release, safe = self.pending, len(self.text)
        else:
            safe = max(self.sent, len(self.text) - self._held())
            release = [t for t in self.pending if t.offset < safe]
        self.pending = self.pending[len(release) :] if not self.finish else []
        delta, self.sent = self.text[self.sent : safe], safe
        self.kept += len(release)
        if not (delta or release or self.finish):
            return None
        return Piece(index, delta, release, self.finish, self.kept if self.finish else 0)

    def _stop_at(self, start: int) -> int | None:
        """Where the first stop sequence begins (it ends in the text added since
        ``start``: the text before had none)."""
        hits = [self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Length of the longest end of the text that could begin a stop sequence."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


class Generator:
    """Sampling and log-probs for one causal LM + tokenizer."""

    def __init__(self, model, tokenizer, max_batch: int = 64):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch = max_batch
        self.eos = tokenizer.eos_token_id
        cfg = model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", 2048
        )
        self.device = next(model.parameters()).device
        self.vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
        self.lock = threading.Lock()
        self._pieces: dict[int, str] = {}
        # transformers renamed the KV cache argument (past_key_values → cache)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # text <-> tokens
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def piece(self, i: int) -> str:
        """Token ``i`` decoded on its own (cached)."""
        p = self._pieces.get(i)
        if p is None:
            p = self._pieces[i] = self.tok.decode([i])
        return p

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for chat ``messages`` (role + string content): the tokenizer's chat
        template, or without one (a model trained on plain text) the contents in order."""
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return "\n".join(m.get("content") or "" for m in messages)

    def check_prompt(self, ids: list[int]) -> list[int]:
        """The ids to feed for a prompt (an empty prompt starts from the end-of-sequence
        token); ``ValueError`` if they do not fit the context or the vocabulary."""
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the vocabulary (0..{self.vocab - 1})")
        ids = ids or [self.eos]
        if len(ids) >= self.context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; the model's context is {self.context}"
            )
        return ids

    # scoring and sampling
    def _top(self, lp, top: int):
        v, ix = lp.topk(top, -1)
        return v.tolist(), ix.tolist()

    def score_prompt(self, ids: list[int], top: int | None) -> list[Token]:
        """The prompt's own tokens with their log-probabilities given what precedes them
        (the first has none), and the ``top`` most probable tokens at each position."""
        torch = self.torch
        out: list[Token] = []
        off = 0
        with self.lock, torch.no_grad():
            lp = None
            if top is not None and len(ids) > 1:
                x = torch.tensor([ids], device=self.device)
                lp = torch.log_softmax(self.model(input_ids=x).logits[0, :-1].float(), -1)
                lp = lp.clamp(min=LOGPROB_FLOOR)
            tv, ti = self._top(lp, top) if lp is not None and top else (None, None)
            for i, t in enumerate(ids):
                tok = Token(t, self.piece(t), off)
                if i > 0 and lp is not None:
                    tok.logprob = float(lp[i - 1, t])
                    tok.top = (
                        [(self.piece(a), v) for a, v in zip(ti[i - 1], tv[i - 1], strict=True)]
                        if tv is not None
                        else []
                    )
                    tok.top_ids = list(ti[i - 1]) if ti is not None else []
                off += len(tok.text)
                out.append(tok)
        return out

    def _prefill(self, ids: list[int], k: int):
        """Run the prompt once; → (next-token logits (k, V), cache for k rows)."""
        torch = self.torch
        x = torch.tensor([ids], device=self.device)
        try:
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            out = self.model(input_ids=x, use_cache=True)
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        if k > 1:
            try:
                cache.batch_repeat_interleave(k)
            except (AttributeError, NotImplementedError):  # a cache that cannot be repeated
                out = self.model(input_ids=x.expand(k, -1), use_cache=True)
                return out.logits[:, -1].float(), _cache_of(out)
            logits = logits.expand(k, -1)
        return logits, cache

    def _pick(self, logits, temperature: float, top_p: float, rng):
        torch = self.torch
        if temperature < GREEDY_BELOW:
            return logits.argmax(-1)
        z = logits / temperature
        if top_p < 1:
            sz, si = z.sort(-1, descending=True)
            p = sz.softmax(-1)
            # keep the fewest most probable tokens whose mass reaches top_p (at least one:
            # a top_p below float32's range rounds to 0)
            drop = p.cumsum(-1) - p >= top_p
            drop[:, 0] = False
            sz = sz.masked_fill(drop, float("-inf"))
            z = torch.full_like(z, float("-inf")).scatter(-1, si, sz)
        return torch.multinomial(z.softmax(-1), 1, generator=rng).squeeze(-1)

    def pieces(
        self,
        ids: list[int],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 16,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_logprobs: int | None = None,
    ) -> Iterator[Piece]:
        """Sample ``n`` continuations of ``ids`` (checked with :meth:`check_prompt`), at
        most ``max_tokens`` each (and the context); pieces as they come. With
        ``top_logprobs`` (an int, 0 allowed) the tokens carry log-probs, else not."""
        torch = self.torch
        stop = [s for s in stop or [] if s]
        max_new = max(0, min(max_tokens, self.context - len(ids)))
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        with self.lock:
            for base in range(0, n, self.max_batch):
                k = min(self.max_batch, n - base)
                if max_new == 0:
                    for j in range(k):
                        yield Piece(base + j, finish="length")
                    continue
                rows = [_Row(self, ids, stop, max_new) for _ in range(k)]
                with torch.no_grad():
                    logits, cache = self._prefill(ids, k)
                while True:
                    with torch.no_grad():
                        nxt = self._pick(logits, temperature, top_p, rng)
                        step = self._tokens(logits, nxt, top_logprobs)
                    out = []
                    for j, (row, tok) in enumerate(zip(rows, step, strict=True)):
                        if row.finish is None:
                            p = row.step(base + j, None if tok.id == self.eos else tok)
                            if p is not None:
                                out.append(p)
                    yield from out
                    if all(r.finish for r in rows):
                        break
                    with torch.no_grad():
                        kw = {self._cache_arg: cache}
                        o = self.model(input_ids=nxt.unsqueeze(-1), use_cache=True, **kw)
                        logits, cache = o.logits[:, -1].float(), _cache_of(o)

    def _tokens(self, logits, nxt, top: int | None) -> list[Token]:
        """The step's chosen tokens, with log-probs when asked for."""
        ids = nxt.tolist()
        if top is None:
            return [Token(i, self.piece(i), 0) for i in ids]
        lp = self.torch.log_softmax(logits, -1).clamp(min=LOGPROB_FLOOR)
        chosen = lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).tolist()
        tv, ti = self._top(lp, top) if top else ([[]] * len(ids), [[]] * len(ids))
        return [
            Token(
                i,
                self.piece(i),
                0,
                c,
                [(self.piece(a), v) for a, v in zip(ai, av, strict=True)],
                list(ai),
            )
            for i, c, av, ai in zip(ids, chosen, tv, ti, strict=True)
        ]
