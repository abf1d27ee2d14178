"""Top-k and sampled signals computed over the vocabulary in chunks.

The plain way to label a position materialises its logits ``(V,)`` for the whole batch
(``B·T·V`` floats, far larger than any cache, in freshly allocated memory), then runs a
full ``topk``, an ``exp`` pass for the normaliser and a ``multinomial`` over all ``V``
entries: passes as long as a good part of the teacher's forward. Here the logits of a
batch's rows are produced one vocabulary chunk ``(R, CHUNK)`` at a time into one buffer
kept between batches, either by the teacher's output layer applied to its input (the
*fused* path: the layer's own forward does not run) or by copying from the logits a
teacher returned. While a chunk is in cache it gives

- ``Σ exp(z)`` over the chunk, for the normaliser (``exp`` without a shift when the
  logits allow it, else shifted by the first chunk's row maxima, which the product of
  the later chunks starts from);
- top-k: ``exp(z)`` in place and the maxima of the chunk's blocks (strided sets of
  ``CHUNK / LANES`` entries). Every one of the k largest entries of a row lies in one of
  the k blocks of largest maxima, so the final ``topk`` looks at ``k · CHUNK / LANES``
  entries, not ``V``; their values are ``log exp(z)``. The tail prior's sum over
  positions, which needs each row's normaliser (known after the last chunk), is then
  one batched product over the buffer of ``exp(z)``;
- draws: ``exp(z)`` in place and the blocks' masses. Inverse transform sampling in two
  levels (a block from the blocks' cumulative masses in float64, then an entry of it)
  draws from the same distribution as ``torch.multinomial`` on ``softmax(z / T)``.

Rare cases take slower exact paths: a chunk whose ``exp`` overflows is made again,
shifted by its row maxima; a row whose top-k reaches entries whose ``exp`` is not a
normal float (more than ~87 nats under the shift) has its batch labelled again keeping
the logits.

Results agree with the plain computation to float rounding: the same top-k ids (but for
logits within ~1e-7 of each other, whose order may differ; exact ties come by
increasing id); log-probabilities within ~1e-6 (``log exp`` and a differently ordered
sum for the normaliser; for shifted logits, plus one fp32 subtraction at the logits'
magnitude), and likewise the tail masses and the tail prior.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK = 512  # vocabulary entries per chunk: (1,024 rows × 512) fp32 = 2 MiB, one L2
# A chunk seen as (GROUPS, LANES): block j of a chunk is its column j, i.e. the entries
# j, j + LANES, j + 2·LANES, … (strided blocks: their maxima and sums are one vectorised
# reduction over the rows of that view, as fast as a plain pass over the chunk)
LANES = 32
GROUPS = CHUNK // LANES
MAX_BUFFER = 1 << 28  # bytes of the chunk buffer per row group (256 MiB)


class ChunkedLogits:
    """Buffers for the logits chunks of a batch, kept between batches (allocated once)."""

    def __init__(self):
        self._bufs: dict[str, Tensor] = {}

    def buffer(self, name: str, numel: int) -> Tensor:
        b = self._bufs.get(name)
        if b is None or b.numel() < numel:
            self._bufs.pop(name, None)  # free before allocating the larger one
            b = self._bufs[name] = torch.empty(numel)
        return b[:numel]


def row_groups(rows: int, vocab: int) -> list[tuple[int, int]]:
    """Split ``rows`` so that a group's fp32 logits stay within :data:`MAX_BUFFER`."""
    width = -(-vocab // CHUNK) * CHUNK
    step = max(1, min(rows, MAX_BUFFER // (4 * width)))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


# fill(a, b, out, shift): write z[:, a:b] − shift (shift (R, 1) or None) into out (R, b − a)
Fill = Callable[[int, int, Tensor, Tensor | None], None]

# exp(z) needs no shift while every z ≤ HIGH (fp32 overflows past e^88.7) and each row's
# maximum is ≥ LOW (entries more than ~87 below 0 underflow; with the maximum ≥ −50 their
# share of the row's mass is < V·e^(−37), under fp32 rounding); else logits are shifted
HIGH, LOW = 60.0, -50.0


TINY = 2.0**-125  # exp values at least this large are normal floats: their log is exact


class _Pass:
    """One pass over the vocabulary chunks of ``R`` rows. ``Z (n, R, CHUNK)`` are the
    logits ÷ temperature, minus a per-row shift ``m0`` (0 when the maxima of chunk 0 are
    within [LOW, HIGH], else those maxima, which later chunks take inside the product
    that makes them), padded with −inf past ``V``; per chunk ``c`` a further per-row
    shift ``sh`` (0 unless ``Z_c`` would overflow ``exp``) and the row sums ``s`` of
    ``E_c = exp(Z_c − sh_c)``. ``mode``: ``"sum"`` (draws) and ``"max"`` (top-k) leave
    ``E`` in the buffer in place of ``Z`` with, per block (see :data:`LANES`), the sum
    or the maximum of ``E``; ``"keep"`` (top-k when ``E`` is too small to give back the
    logits by its log) keeps ``Z`` with the blocks' maxima of ``Z``."""

    def __init__(self, fill: Fill, rows: int, vocab: int, temperature: float, mode: str,
                 store: ChunkedLogits):  # fmt: skip
        self.rows, self.vocab, self.temperature, self.fill = rows, vocab, temperature, fill
        self.mode = mode
        topk = mode == "keep"
        self.n = n = -(-vocab // CHUNK)
        self.z = store.buffer("z", n * rows * CHUNK).view(n, rows, CHUNK)
        self.z[-1, :, vocab - (n - 1) * CHUNK :] = -torch.inf
        self.sh = torch.zeros(rows, n)  # (R, n): each chunk's further shift
        self.s = torch.empty(rows, n)  # (R, n): Σ_chunk exp(Z − sh)
        self.blocks = torch.empty(rows, n * LANES)  # (R, nb): block maxima or sums
        scratch = torch.empty(rows, CHUNK) if topk else None
        self.m0: Tensor | None = None  # (R, 1) or None: no shift
        self.shifted: set[int] = set()  # the chunks with a further shift
        self._started = False
        for c in range(n):
            z = self._fill(c)
            bk = self.blocks[:, c * LANES : (c + 1) * LANES]
            if topk:
                torch.amax(z.view(rows, GROUPS, LANES), 1, out=bk)
                torch.sum(torch.exp(z, out=scratch), -1, out=self.s[:, c])
            else:
                self._exp_blocks(z, bk, c)
        if topk:  # chunks with entries > HIGH: their exp again, shifted by their maxima
            high = self.blocks.view(rows, n, LANES).amax(-1)  # (R, n)
            for c in (high > HIGH).any(0).nonzero().flatten().tolist():
                self.sh[:, c] = high[:, c].clamp_min(0.0)
                self.shifted.add(c)
                torch.sum(self.exp(c, scratch), -1, out=self.s[:, c])
        else:  # overflows, seen afterwards: those chunks again, shifted
            if mode == "sum":  # the chunks' sums from their blocks'
                torch.sum(self.blocks.view(rows, n, LANES), -1, out=self.s)
            for c in (~self.s.isfinite()).any(0).nonzero().flatten().tolist():
                z = self._fill(c)
                self.sh[:, c : c + 1] = z.amax(-1, keepdim=True).clamp_min(0.0)
                self.shifted.add(c)
                z.sub_(self.sh[:, c : c + 1])
                self._exp_blocks(z, self.blocks[:, c * LANES : (c + 1) * LANES], c)
        # log Σ_v exp(z_v − m0) per row (float64), from the chunks' sums
        self.log_norm = (self.s.double().log() + self.sh.double()).logsumexp(-1, keepdim=True)

    def _fill(self, c: int) -> Tensor:
        """Chunk ``c`` of ``Z`` (the first call sets the shift ``m0``)."""
        a, b = c * CHUNK, min((c + 1) * CHUNK, self.vocab)
        z = self.z[c]  # (R, CHUNK)
        t = self.temperature
        self.fill(a, b, z[:, : b - a], None if self.m0 is None else t * self.m0)
        if t != 1.0:
            z.div_(t)
        if not self._started:
            self._started = True
            m0 = z.amax(-1, keepdim=True)  # (R, 1)
            if not bool(((m0 >= LOW) & (m0 <= HIGH)).all()):
                self.m0 = torch.where(m0.isfinite(), m0, 0.0)  # a row of −inf here: none
                z.sub_(self.m0)
        return z

    def exp(self, c: int, out: Tensor) -> Tensor:
        """``exp(Z_c − sh_c)`` into ``out (R, CHUNK)``."""
        if c in self.shifted:
            return torch.sub(self.z[c], self.sh[:, c : c + 1], out=out).exp_()
        return torch.exp(self.z[c], out=out)

    def _exp_blocks(self, z: Tensor, bk: Tensor, c: int) -> None:
        """``E_c`` in place of ``Z_c``, its blocks' sums or maxima (and then its row sums)."""
        e = z.exp_().view(self.rows, GROUPS, LANES)
        if self.mode == "sum":
            torch.sum(e, 1, out=bk)
        else:
            torch.amax(e, 1, out=bk)
            torch.sum(z, -1, out=self.s[:, c])

    def topk_from_exp(self, k: int) -> tuple[Tensor, Tensor] | None:
        """As :meth:`topk` from ``E`` (mode ``"max"``): the values are ``log E + sh``,
        the logits but for ~1e-7 of rounding. None when a selected ``E`` is below
        :data:`TINY` (its log would not give the logit back)."""
        if self.shifted:  # blocks of shifted chunks rank by log E + sh
            key = self.blocks.log() + self.sh.repeat_interleave(LANES, -1)
        else:  # exp is monotone: the maxima of E rank the blocks as those of Z would
            key = self.blocks
        blk = key.topk(min(k, key.shape[-1]), -1, sorted=False).indices  # (R, kb)
        cand = self._gather(self.z, blk).flatten(1)  # (R, kb · GROUPS) of E
        if self.shifted:
            cz = cand.log() + self.sh.gather(-1, blk // LANES).repeat_interleave(GROUPS, -1)
            vals, j = cz.topk(k, -1, sorted=False)  # (R, k)
            small = cand.gather(-1, j)
        else:
            small, j = cand.topk(k, -1, sorted=False)
            vals = small.log()
        if bool((small < TINY).any()):
            return None
        return self._sorted(vals, self._ids(blk.gather(-1, j // GROUPS), j % GROUPS))

    @staticmethod
    def _sorted(vals: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """By decreasing value, equal values by increasing id."""
        ids, order = ids.sort(-1)
        vals, order = vals.gather(-1, order).sort(dim=-1, descending=True, stable=True)
        return vals, ids.gather(-1, order)

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` largest entries of ``Z`` per row (values, ids), sorted by decreasing
        value, equal values by increasing id. Each lies in one of the ``k`` blocks of
        largest maxima, so only those blocks are searched."""
        blk = self.blocks.topk(min(k, self.blocks.shape[-1]), -1, sorted=False).indices
        cand = self._gather(self.z, blk)  # (R, kb, GROUPS)
        vals, j = cand.flatten(1).topk(k, -1, sorted=False)  # (R, k)
        return self._sorted(vals, self._ids(blk.gather(-1, j // GROUPS), j % GROUPS))

    def _gather(self, buf: Tensor, blk: Tensor) -> Tensor:
        """The entries of blocks ``blk (R, b)`` (row r's own blocks): ``(R, b, GROUPS)``."""
        rows = torch.arange(self.rows).unsqueeze(-1)
        view = buf.view(self.n, self.rows, GROUPS, LANES)
        return view[blk // LANES, rows, :, blk % LANES]

    @staticmethod
    def _ids(blk: Tensor, i: Tensor) -> Tensor:
        """Vocabulary id of entry ``i`` of block ``blk``."""
        return blk // LANES * CHUNK + i * LANES + blk % LANES

    def flat_index(self, ids: Tensor) -> Tensor:
        """Positions in a flattened buffer of the entries ``ids (R, K)``."""
        rows = torch.arange(self.rows).unsqueeze(-1)
        return (ids // CHUNK * self.rows + rows) * CHUNK + ids % CHUNK


def topk_signals(
    fill: Fill,
    rows: int,
    vocab: int,
    k: int,
    temperature: float,
    tail_weights: Tensor | None,
    store: ChunkedLogits,
) -> dict[str, Tensor]:
    """Top-k of ``softmax(z / temperature)`` per row for logits ``z (R, V)`` produced by
    ``fill`` (see :data:`Fill`).

    Returns ``ids (R, k)`` int64 and ``logprobs (R, k)`` fp32, sorted by decreasing
    probability, ``tail (R,)`` = 1 − Σ top-k probabilities and, when ``tail_weights (R,)``
    is given, ``tail_sum (V,)`` float64 = Σ_r w_r · p_r over the entries outside each
    row's top-k (the tail prior's numerator)."""
    p = _Pass(fill, rows, vocab, temperature, "max", store)
    got = p.topk_from_exp(k)
    if got is None:  # entries of the top-k too small for exp: again, keeping the logits
        p = _Pass(fill, rows, vocab, temperature, "keep", store)
    vals, ids = got or p.topk(k)
    logprobs = vals - p.log_norm.float()
    out = {"ids": ids, "logprobs": logprobs}
    out["tail"] = (1.0 - logprobs.double().exp().sum(-1)).clamp_min(0.0).float()
    if tail_weights is not None:
        # chunk c's row r enters with w_r · exp(sh_rc) / Σ_v exp(z_v − m0)
        a = tail_weights.double().unsqueeze(-1) * (p.sh.double() - p.log_norm).exp()
        a = a.float().T.contiguous()  # (n, R)
        if p.mode == "keep":
            p.z.view(-1)[p.flat_index(ids)] = -torch.inf  # the top-k are not the tail
            scratch, tail = torch.empty(rows, CHUNK), torch.empty(p.n, CHUNK)
            for c in range(p.n):  # exp once more, chunk by chunk
                torch.mm(a[c : c + 1], p.exp(c, scratch), out=tail[c : c + 1])
        else:
            p.z.view(-1)[p.flat_index(ids)] = 0.0  # the top-k are not the tail
            tail = torch.bmm(a.unsqueeze(1), p.z)  # (n, 1, CHUNK)
        out["tail_sum"] = tail.flatten()[:vocab].double()
    return out


def sample_signals(
    fill: Fill,
    rows: int,
    vocab: int,
    k: int,
    temperature: float,
    gen: torch.Generator | None,
    store: ChunkedLogits,
) -> Tensor:
    """``k`` draws with replacement per row from ``softmax(z / temperature)``, for logits
    produced as in :func:`topk_signals`: ``(R, k)`` int64 vocabulary ids, in draw order.

    Two-level inverse transform: ``u ~ U[0, 1)`` picks the block whose cumulative mass
    (float64) first exceeds ``u · Σ``, then the entry of that block likewise. Entries of
    zero mass are never drawn."""
    p = _Pass(fill, rows, vocab, temperature, "sum", store)
    # (R, nb): each block's mass, exp(sh) × its sum of exp(Z − sh)
    mass = p.blocks.double()
    scale = p.sh.double().exp().repeat_interleave(LANES, -1) if p.shifted else None
    cum = (mass if scale is None else mass * scale).cumsum(-1)
    u = torch.rand((rows, k), generator=gen, dtype=torch.float64) * cum[:, -1:]  # (R, k)
    blk = _search(cum, u)  # (R, k)
    before = torch.where(blk > 0, cum.gather(-1, (blk - 1).clamp_min(0)), 0.0)
    rest = u - before  # (R, k), in the block's own scale:
    rest = (rest if scale is None else rest / scale.gather(-1, blk)).float()
    e = p._gather(p.z, blk)  # (R, k, GROUPS)
    i = _search(e.cumsum(-1), rest.unsqueeze(-1)).squeeze(-1)
    return p._ids(blk, i)


def _search(cum: Tensor, u: Tensor) -> Tensor:
    """Per row of ``cum (..., L)`` (cumulative masses): the first index whose cumulative
    mass exceeds ``u (..., m)``. ``u`` is held below the total, so that rounding (``u``
    computed from another sum, or equal to it) never picks past the last entry of
    positive mass."""
    last = cum[..., -1:]
    u = torch.minimum(u, torch.nextafter(last, torch.zeros_like(last)))
    return torch.searchsorted(cum, u, right=True)


def logits_filler(logits: Tensor) -> Fill:
    """``fill`` for logits ``(R, V)`` a teacher returned."""

    def fill(a: int, b: int, out: Tensor, shift: Tensor | None) -> None:
        if shift is None:
            out.copy_(logits[:, a:b])
        else:
            torch.sub(logits[:, a:b], shift, out=out)

    return fill


def head_filler(h: Tensor, head: nn.Linear) -> Fill:
    """``fill`` for the output layer ``head`` applied to its input ``h (R, H)``: the
    product with one slice of its weight at a time, in the layer's dtype; a shift enters
    as the product's initial value."""
    w, bias = head.weight.detach(), head.bias
    bias = None if bias is None else bias.detach()
    fp32 = w.dtype == torch.float32 and h.dtype == torch.float32

    def fill(a: int, b: int, out: Tensor, shift: Tensor | None) -> None:
        if not fp32:
            z = F.linear(h, w[a:b], None if bias is None else bias[a:b])
            if shift is None:
                out.copy_(z)
            else:
                torch.sub(z, shift, out=out)
        elif shift is None and bias is None:
            torch.mm(h, w[a:b].t(), out=out)
        elif shift is None:
            torch.addmm(bias[a:b], h, w[a:b].t(), out=out)
        else:
            out.copy_(shift.neg().expand_as(out))
            if bias is not None:
                out.add_(bias[a:b])
            out.addmm_(h, w[a:b].t())

    return fill
