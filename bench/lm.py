"""A token-level task for the store benchmarks: tinyshakespeare, GPT-2 BPE, a small GPT.

The tokenizer reads the GPT-2 ``vocab.json`` / ``merges.txt`` and applies byte-level BPE
(Radford et al. 2019). Python's ``re`` has no ``\\p{L}``, so letters are matched as
``[^\\W\\d_]``: identical to GPT-2's pre-tokenizer on this ASCII text.
The model is a minimal causal transformer in the nanoGPT mould, head tied to the
token embedding, so the teacher's output distribution spans all 50,257 tokens.
"""

from __future__ import annotations

import json
import math
import re
import time
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOK_DIR = SHARED / "tokenizers" / "gpt2"
TEXT = SHARED / "tinyshakespeare" / "input.txt"
GSM8K = SHARED / "gsm8k"

_PAT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class GPT2Tokenizer:
    def __init__(self, folder: Path = TOK_DIR):
        self.encoder = json.loads((folder / "vocab.json").read_text())
        merges = (folder / "merges.txt").read_text().splitlines()[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges) if m}
        self.byte_enc = _bytes_to_unicode()
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.byte_dec = {v: k for k, v in self.byte_enc.items()}
        self.files = [folder / "vocab.json", folder / "merges.txt"]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @cache  # noqa: B019 - one tokenizer per process
    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = tuple(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = tuple(out)
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in _PAT.findall(text):
            word = "".join(self.byte_enc[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(self.byte_dec[c] for i in ids for c in self.decoder[i]).decode(
            "utf-8", "replace"
        )


def shakespeare_tokens(cache: Path = ROOT / "bench" / ".cache" / "shakespeare_gpt2.pt") -> Tensor:
    if cache.exists():
        return torch.load(cache)
    tok = GPT2Tokenizer()
    ids = torch.tensor(tok.encode(TEXT.read_text()), dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, cache)
    return ids


def gsm8k_tokens(split: str = "train") -> Tensor:
    """GSM8K's worked solutions (the ``answer`` field, each followed by a blank line),
    concatenated in file order, GPT-2 BPE; cached under bench/.cache/."""
    cache = ROOT / "bench" / ".cache" / f"gsm8k_{split}_gpt2.pt"
    if cache.exists():
        return torch.load(cache)
    tok = GPT2Tokenizer()
    ids: list[int] = []
    for line in (GSM8K / f"{split}.jsonl").read_text().splitlines():
        ids.extend(tok.encode(json.loads(line)["answer"] + "\n\n"))
    out = torch.tensor(ids, dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def windows(tokens: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows: inputs (N, T) and next-token targets (N, T)."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


def splits(seq_len: int = 64):
    """90/10 train/val by position in the text (val is the last 10%)."""
    x, y = windows(shakespeare_tokens(), seq_len)
    cut = int(0.9 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)  # (B, T, D) each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(
        self, vocab: int = 50257, d: int = 128, layers: int = 3, heads: int = 4, ctx: int = 64
    ):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)  # the output layer, tied to tok
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t))  # (B, T, D)
        h = self.ln_f(self.blocks(h))  # (B, T, D)
        return self.head(h)  # (B, T, V)

    def weights(self) -> dict[str, Tensor]:
        """The state dict without the tied head (safetensors refuses shared tensors)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if k != "head.weight"}

    def load_weights(self, sd: dict[str, Tensor]) -> GPT:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if unexpected or missing != ["head.weight"]:
            raise KeyError(f"GPT weights: missing {missing}, unexpected {unexpected}")
        return self


def train_lm(model: GPT, x: Tensor, y: Tensor, steps: int, batch: int, lr: float, seed: int,
             loss_fn=None, log_every: int = 50) -> list[dict]:  # fmt: skip
    """AdamW with cosine decay. ``loss_fn(logits, batch_rows) -> scalar`` (default: CE)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    log, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        rows = torch.randint(0, len(x), (batch,), generator=g)
        logits = model(x[rows])  # (B, T, V)
        if loss_fn is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y[rows].flatten())
        else:
            loss = loss_fn(logits, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append(
                {"step": step + 1, "loss": float(loss.detach()), "s": time.perf_counter() - t0}
            )
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    return log


@torch.inference_mode()
def val_ce(model: GPT, x: Tensor, y: Tensor, batch: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) on (x, y)."""
    tot, n = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        tot += float(
            F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum")
        )
        n += y[i : i + batch].numel()
    return tot / n
