"""A peaked GPT-2-vocabulary teacher for the matched-bytes store table.

"Peaked" means, on the positions that will be labelled: mean teacher entropy ≤ 2 nats
and mean probability mass outside its top 64 tokens ≤ 5 %. A small GPT on CPU cannot
get there on held-out text, so the labelled positions are the teacher's own training
text (distillation on the teacher's distribution over the text it was fitted to): the
first ``--windows`` 64-token windows of GSM8K's worked solutions, a low-entropy corpus.
Held-out: the first 128 windows of GSM8K's test solutions.

Resumable: a checkpoint (model, optimizer, schedule, RNG) every ``--every`` steps in
``--out``; a rerun continues from the last one. Each checkpoint logs the peakedness on
the training windows and the held-out CE.

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python bench/peaked_teacher.py --until-peaked

With ``--until-peaked`` the schedule is still the one of ``--steps`` (cosine over 1,000
steps); training stops at the first checkpoint (every 100 steps) where the probe windows
meet both conditions, and the model of that step is the teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import lm

CONFIG = {"d": 192, "layers": 4, "heads": 4, "ctx": 64}
OUT = lm.ROOT / "bench" / ".cache" / "peaked_teacher"


def gsm8k_splits(windows: int, seq_len: int = 64):
    """(x, y) training windows (the labelled positions) and 128 held-out test windows."""
    x, y = lm.windows(lm.gsm8k_tokens("train"), seq_len)
    vx, vy = lm.windows(lm.gsm8k_tokens("test"), seq_len)
    return (x[:windows], y[:windows]), (vx[:128], vy[:128])


@torch.inference_mode()
def peakedness(model, x, y, batch: int = 16, top: int = 64) -> dict:
    """Mean entropy, mass outside the top ``top`` and CE (nats/token) on (x, y)."""
    ent = tail = ce = 0.0
    for i in range(0, len(x), batch):
        lp = F.log_softmax(model(x[i : i + batch]).float(), -1)  # (B, T, V)
        p = lp.exp()
        ent += float(-(p * lp).sum())
        tail += float((1 - p.topk(top, -1).values.sum(-1)).sum())
        ce += float(F.nll_loss(lp.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"))
    n = y.numel()
    return {"entropy": ent / n, "tail_mass_top64": tail / n, "ce": ce / n}


def gpt(**config) -> lm.GPT:
    """``lm.GPT`` with its position table drawn like its token table, N(0, 0.02), as in
    nanoGPT: ``nn.Embedding``'s default N(0, 1) makes the positions 50× louder than the
    tokens at the first layer, and a teacher so initialised stalled at 4.4 nats on its own
    800 training steps (the bigram level) instead of fitting them."""
    m = lm.GPT(**config)
    torch.nn.init.normal_(m.pos.weight, std=0.02)
    return m


def load_teacher(path: Path = OUT) -> lm.GPT:
    m = lm.GPT(**CONFIG)
    m.load_weights(load_file(str(path / "model.safetensors")))
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--until-peaked", action="store_true",
                    help="stop at the first checkpoint whose probe windows are peaked (mean "
                         "entropy ≤ 2 nats and mass outside the top 64 ≤ 5 %%)")  # fmt: skip
    a = ap.parse_args()
    torch.set_num_threads(1)  # cores shared with other jobs
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "train.json"
    if done.exists() and json.loads(done.read_text())["steps"] == a.steps:
        print(f"{out}: trained already ({a.steps} steps)")
        return
    (x, y), (vx, vy) = gsm8k_splits(a.windows, CONFIG["ctx"])
    probe = slice(0, 64)  # the peakedness check during training: 64 of the windows
    torch.manual_seed(0)
    model = gpt(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / a.steps))
    )
    g = torch.Generator().manual_seed(0)
    step, log, train_s = 0, [], 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        c = torch.load(ckpt, weights_only=False)
        model.load_state_dict(c["model"])
        opt.load_state_dict(c["opt"])
        sched.load_state_dict(c["sched"])
        g.set_state(c["rng"])
        step, log, train_s = c["step"], c["log"], c["train_s"]
        print(f"resumed at step {step}", flush=True)
    model.train()
    t0 = time.perf_counter()

    def peaked() -> bool:
        p = log[-1]["probe"] if log else None
        return bool(p) and p["entropy"] <= 2.0 and p["tail_mass_top64"] <= 0.05

    while step < a.steps and not (a.until_peaked and peaked()):
        rows = torch.randint(0, len(x), (a.batch,), generator=g)
        loss = F.cross_entropy(model(x[rows]).flatten(0, 1), y[rows].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % a.every == 0 or step == a.steps:
            model.eval()
            train_s += time.perf_counter() - t0
            rec = {"step": step, "loss": float(loss.detach()), "train_s": train_s,
                   "probe": peakedness(model, x[probe], y[probe]),
                   "val_ce": peakedness(model, vx[:32], vy[:32])["ce"]}  # fmt: skip
            log.append(rec)
            print(json.dumps(rec), flush=True)
            state = {"model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "rng": g.get_state(), "step": step,
                     "log": log, "train_s": train_s}  # fmt: skip
            torch.save(state, out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt)
            model.train()
            t0 = time.perf_counter()
    model.eval()
    save_file(model.weights(), str(out / "model.safetensors"))
    res = {"config": CONFIG, "corpus": "gsm8k train solutions", "windows": a.windows,
           "tokens": x.numel(), "steps": a.steps, "stopped_at": step, "batch": a.batch,
           "lr": a.lr,
           "train_s": train_s, "labelled": peakedness(model, x, y),
           "held_out": peakedness(model, vx, vy), "log": log,
           "command": f"bench/peaked_teacher.py --windows {a.windows} --steps {a.steps} "
                      f"--batch {a.batch} --lr {a.lr}" + " --until-peaked" * a.until_peaked}  # fmt: skip
    (out / "train.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "log"}))


if __name__ == "__main__":
    main()
