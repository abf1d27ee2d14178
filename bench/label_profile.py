"""Where labelling time goes, per batch of 16 × 64 tokens of the 8 × 512 GPT teacher of
bench/label_throughput.py (GPT-2 vocabulary, seeded random weights), one thread.

Every part is timed in the same process, the parts interleaved in each round; medians
over rounds. ``plain`` is the computation on the whole logits tensor the labeller did
before (topk over V, one exp pass for the normaliser and the tail prior's product;
softmax + torch.multinomial for draws); ``chunked`` is darkknowledge.store.select, from
the output layer's input (its product included) or from the logits.

    .venv/bin/python bench/label_profile.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def plain_topk(z, k, w):
    """The labeller's top-k before store/select.py: z (R, V) → ids, log-probs, tail, tail sum."""
    vals, idx = z.topk(k, dim=-1)
    top = vals[..., :1]
    e = torch.sub(z, top).exp_()
    s = e.sum(-1, keepdim=True)
    vals = vals - top - s.log()
    tail = (1.0 - vals.double().exp().sum(-1)).clamp_min(0.0).float()
    e.scatter_(-1, idx, 0.0)
    tail_sum = ((s.reciprocal() * w.unsqueeze(-1)).reshape(1, -1) @ e).squeeze(0).double()
    return idx, vals, tail, tail_sum


def plain_draws(z, k, gen):
    """The labeller's draws before store/select.py: softmax, then torch.multinomial."""
    return torch.multinomial(torch.softmax(z, -1), k, replacement=True, generator=gen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "label_profile.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    import lm
    from darkknowledge.store import fingerprint as fp
    from darkknowledge.store import select as S

    torch.manual_seed(0)
    (x, _), _ = lm.splits(64)
    x = x[:16]
    gpt = lm.GPT(d=512, layers=8, heads=8, ctx=64).eval()
    vocab = gpt.head.weight.shape[0]
    rows = x.numel()
    w = torch.ones(rows)
    store = S.ChunkedLogits()
    seen = {}

    def skip(inp):  # the output layer records its input, as the labeller's does
        seen["h"] = inp.reshape(-1, inp.shape[-1])
        return inp.new_zeros((*inp.shape[:-1], 1))

    def layers():
        gpt.head.forward = skip
        try:
            gpt(x)
        finally:
            del gpt.head.forward

    with torch.inference_mode():
        z = gpt(x).float().reshape(rows, vocab)
        layers()
        h = seen["h"]
        parts = {
            "raw forward (full logits)": lambda: gpt(x).float(),
            "layers only (output layer skipped)": layers,
            "output layer product (whole, fresh tensor)": lambda: F.linear(h, gpt.head.weight),
            "plain top-k + normaliser + tail prior, from the logits": lambda: plain_topk(z, 64, w),
            "plain draws (softmax + multinomial), from the logits": lambda: plain_draws(
                z, 16, torch.Generator().manual_seed(0)
            ),
            "chunked top-k + tail prior, from the logits": lambda: S.topk_signals(
                S.logits_filler(z), rows, vocab, 64, 1.0, w, store
            ),
            "chunked draws, from the logits": lambda: S.sample_signals(
                S.logits_filler(z), rows, vocab, 16, 1.0, torch.Generator().manual_seed(0), store
            ),
            "fused top-k + tail prior (output layer product included)": lambda: S.topk_signals(
                S.head_filler(h, gpt.head), rows, vocab, 64, 1.0, w, store
            ),
            "fused draws (output layer product included)": lambda: S.sample_signals(
                S.head_filler(h, gpt.head),
                rows,
                vocab,
                16,
                1.0,
                torch.Generator().manual_seed(0),
                store,
            ),
            "teacher fingerprint (SHA-256 of the weights, once per store)": lambda: (
                fp.modules_digest([gpt])
            ),
        }
        times: dict[str, list[float]] = {p: [] for p in parts}
        for _ in range(a.rounds):
            for name, f in parts.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    med = {p: statistics.median(v) for p, v in times.items()}
    cmd = f"bench/label_profile.py --rounds {a.rounds}"
    res = {"command": cmd, "tokens_per_batch": rows, "vocab": vocab, "rounds": a.rounds,
           "torch_threads": 1, "load_average": os.getloadavg(), "seconds": times,
           "median_s": med}  # fmt: skip
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for p, v in med.items():
        print(f"| {p} | {v:.3f} |")


if __name__ == "__main__":
    main()
