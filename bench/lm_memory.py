"""Peak memory and step time of one LM training step: plain CE vs distillation.

Pinned setup (CPU, fp32): GPT-2 vocabulary (50,257), sequence 1024, batch 4, teacher
8 layers × 512, student 4 layers × 256 (random weights: memory and time do not depend on
them), real text (TinyShakespeare, GPT-2 BPE). Every measurement runs in a fresh process
(this script calls itself with ``--mode``): peak RSS after one full step (forward,
backward, AdamW update), then the median time of the next steps.

Modes:
  plain_hf        the plain way: model(input_ids).logits → cross-entropy (full logits)
  plain_chunked   CE through darkknowledge's chunked LM head
  kd_chunked      forward KL against the live teacher, chunked (darkknowledge)
  kd_unchunked    the same loss with full [B, T, V] logits of both models
  kd_topk_store   forward KL against top-64 + tail signals read from a signal store
  kd_topk_unchunked  the same from the store, with full student logits

    OMP_NUM_THREADS=1 .venv/bin/python bench/lm_memory.py            # all modes
    OMP_NUM_THREADS=1 .venv/bin/python bench/lm_memory.py --modes plain_chunked,kd_chunked --rounds 3

``--rounds R`` measures every mode R times, interleaved (the mode order reversed every
other round), and reports the medians over rounds; the glibc malloc settings (the
``MALLOC_*`` environment, default: none) are the same for every process and recorded.
    .venv/bin/python bench/lm_memory.py --cuda                          # GPU variant

``--cuda`` (not run here: no GPU on this machine): vocab 151,936, sequence 4096, bf16
weights, peak CUDA memory (torch.cuda.max_memory_allocated) instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODES = [
    "plain_hf",
    "plain_chunked",
    "kd_chunked",
    "kd_unchunked",
    "kd_topk_store",
    "kd_topk_unchunked",
]


def rss_peak_mb() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the process that started it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# (layers, width, heads) of the pinned teacher and student
TEACHER = (8, 512, 8)
STUDENT = (4, 256, 4)


def build_pair(vocab: int, seq: int, teacher=TEACHER, student=STUDENT):
    """The teacher and student GPT-2s (random weights, seeded), fp32 on the CPU."""
    from darkknowledge.hf import io as hfio

    common = dict(vocab_size=vocab, n_positions=seq, bos_token_id=0, eos_token_id=0)
    t, s = (
        hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=seed, n_layer=layers,
                        n_embd=width, n_head=heads, **common)
        for seed, (layers, width, heads) in ((1, teacher), (2, student))
    )  # fmt: skip
    return t, s


def setup(args, teacher=TEACHER, student=STUDENT):
    import torch

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.cuda else torch.float32
    dev = torch.device("cuda" if args.cuda else "cpu")
    teacher, student = build_pair(args.vocab, args.seq, teacher, student)
    teacher = teacher.to(dev, dtype).eval()
    student = student.to(dev, dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = token_block(args)
    return torch, teacher, student, ids.to(dev)


def token_block(args):
    import torch

    from darkknowledge.hf import io as hfio

    n = args.batch * (args.seq + 1)
    if args.vocab == 50257:
        tok = hfio.load_tokenizer(SHARED / "tokenizers" / "gpt2")
        text = (SHARED / "tinyshakespeare" / "input.txt").read_text()[: n * 8]
        ids = torch.tensor(tok(text)["input_ids"][:n])
    else:  # another vocabulary (the CUDA variant): token ids drawn uniformly
        ids = torch.randint(0, args.vocab, (n,), generator=torch.Generator().manual_seed(0))
    return ids.view(args.batch, args.seq + 1)


class _HFTeacher:
    """A signal-store teacher: the model's logits (B, T, V) for token ids."""

    def __init__(self, model):
        self.model = model

    def signals(self, batch):
        import torch

        from darkknowledge.signals import Signals

        with torch.no_grad():
            return Signals(logits=self.model(batch.x).logits.float())

    def modules(self):
        return [self.model]


def prep_store(args) -> None:
    import torch

    from darkknowledge.store.label import LabelSpec, label

    torch.set_num_threads(1)
    _, teacher, _, ids = setup(args)
    x = ids[:, :-1]
    mask = torch.ones_like(x, dtype=torch.bool)
    spec = LabelSpec(signal="topk", k=64, dtype="q8", batch_size=1, shard_size=64)
    label(
        _HFTeacher(teacher), x, torch.arange(len(x)), args.store, spec, mask=mask,
        force=True, progress=False,
    )  # fmt: skip


def one_mode(args) -> dict:
    import torch.nn.functional as F

    torch, teacher, student, ids = setup(args)
    torch.set_num_threads(args.threads)
    from darkknowledge.lm import models as M
    from darkknowledge.lm.losses import (
        HeadTeacher,
        TokenLoss,
        chunked_head_loss,
        unchunked_head_loss,
    )

    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    spec = TokenLoss("forward_kl")
    ce = TokenLoss("forward_kl", kd_weight=0.0, ce_weight=1.0)
    store = None
    if args.mode.startswith("kd_topk"):
        from darkknowledge.store.reader import SignalStore

        store = SignalStore(args.store)
    example_ids = torch.arange(args.batch)

    def step():
        opt.zero_grad(set_to_none=True)
        if args.mode == "plain_hf":
            logits = student(input_ids=x).logits  # (B, T, V): what HF's own loss starts from
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        else:
            h = M.final_hidden(student, x, None).reshape(-1, student.config.n_embd)
            w, b = M.head(student)
            lab = y.reshape(-1)
            if args.mode == "plain_chunked":
                loss = chunked_head_loss(h, w, b, ce, labels=lab, chunk=args.chunk)
            elif args.mode in ("kd_chunked", "kd_unchunked"):
                with torch.no_grad():
                    th = M.final_hidden(teacher, x, None).reshape(-1, teacher.config.n_embd)
                tw, tb = M.head(teacher)
                if args.mode == "kd_chunked":  # as lm.pipeline runs a live teacher
                    loss = chunked_head_loss(
                        h, w, b, spec, chunk=args.chunk, teacher=HeadTeacher([th], [(tw, tb)])
                    )  # fmt: skip
                else:
                    with torch.no_grad():
                        tl = F.linear(th, tw, tb)
                    loss = unchunked_head_loss(h, w, b, spec, teacher_logits=tl)
            else:
                sig = store.get(example_ids)
                k = sig.topk_ids.shape[-1]
                tid = sig.topk_ids.reshape(-1, k).to(h.device)
                tlp = sig.topk_logprobs.reshape(-1, k).to(h.device)
                tail = sig.tail_mass.reshape(-1).to(h.device)
                if args.mode == "kd_topk_store":
                    loss = chunked_head_loss(
                        h, w, b, spec, chunk=args.chunk,
                        teacher=lambda lo, hi: (tid[lo:hi], tlp[lo:hi], tail[lo:hi]),
                    )  # fmt: skip
                else:
                    loss = unchunked_head_loss(h, w, b, spec, teacher_topk=(tid, tlp, tail))
        loss.backward()
        opt.step()
        return float(loss.detach())

    sync = torch.cuda.synchronize if args.cuda else (lambda: None)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_now_mb()
    cuda_before = torch.cuda.memory_allocated() / 2**20 if args.cuda else None
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    out = {
        "mode": args.mode,
        "loss": loss,
        "rss_before_step_mb": before,
        "peak_rss_mb": rss_peak_mb(),
        "first_step_s": first,
    }
    if args.cuda:
        out["cuda_before_step_mb"] = cuda_before
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    times = []
    for _ in range(args.timed_steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out["step_s"] = times
    out["step_s_median"] = statistics.median(times) if times else None
    return out


def _median_row(runs: list[dict]) -> dict:
    """One mode's row over its rounds: the median of each number, and every run."""
    row = dict(runs[0])
    for k in ("loss", "rss_before_step_mb", "peak_rss_mb", "first_step_s", "step_s_median",
              "cuda_before_step_mb", "peak_cuda_mb"):  # fmt: skip
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            row[k] = statistics.median(vals)
    row["step_s"] = [t for r in runs for t in r["step_s"]]
    if len(runs) > 1:
        row["runs"] = runs
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--prep-store", action="store_true")
    ap.add_argument("--store", default=str(ROOT / "bench/.cache/lm_topk_store"))
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.vocab = args.vocab or (151_936 if args.cuda else 50_257)
    args.seq = args.seq or (4096 if args.cuda else 1024)
    if args.prep_store:
        prep_store(args)
        return 0
    if args.mode:
        print(json.dumps(one_mode(args)))
        return 0
    # the driver: a fresh process per measurement
    base = [sys.executable, __file__, "--store", args.store, "--vocab", str(args.vocab)]
    base += ["--seq", str(args.seq), "--batch", str(args.batch), "--chunk", str(args.chunk)]
    base += ["--threads", str(args.threads), "--timed-steps", str(args.timed_steps)]
    base += ["--cuda"] if args.cuda else []
    modes = args.modes.split(",")
    if (
        any(m.startswith("kd_topk") for m in modes)
        and not (Path(args.store) / "manifest.json").exists()
    ):
        subprocess.run([*base, "--prep-store"], check=True)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):  # interleaved: every mode once per round
        for m in modes if r % 2 == 0 else modes[::-1]:
            p = subprocess.run([*base, "--mode", m], check=True, capture_output=True, text=True)
            runs[m].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[m][-1]), flush=True)
    rows = {m: _median_row(rs) for m, rs in runs.items()}
    key = "peak_cuda_mb" if args.cuda else "peak_rss_mb"
    ref = rows.get("plain_hf")
    summary = {
        "command": " ".join(["bench/lm_memory.py", *sys.argv[1:]]),
        "setup": {
            "vocab": args.vocab,
            "seq": args.seq,
            "batch": args.batch,
            "chunk": args.chunk,
            "teacher": "GPT-2 8 layers x 512",
            "student": "GPT-2 4 layers x 256",
            "dtype": "bf16" if args.cuda else "fp32",
            "device": "cuda" if args.cuda else "cpu",
            "threads": args.threads,
            "rounds": args.rounds,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "rows": rows,
    }
    if ref:
        summary["memory_ratio_vs_plain_hf"] = {m: r[key] / ref[key] for m, r in rows.items()}
        if ref.get("step_s_median"):
            summary["time_ratio_vs_plain_hf"] = {
                m: r["step_s_median"] / ref["step_s_median"] for m, r in rows.items()
            }
    for ref_mode in ("plain_chunked",):
        base_row = rows.get(ref_mode)
        if base_row:
            summary[f"memory_ratio_vs_{ref_mode}"] = {
                m: r[key] / base_row[key] for m, r in rows.items()
            }
            if base_row.get("step_s_median"):
                summary[f"time_ratio_vs_{ref_mode}"] = {
                    m: r["step_s_median"] / base_row["step_s_median"] for m, r in rows.items()
                }
    out = args.json or str(
        ROOT / "docs/results" / ("llm_memory_cuda.json" if args.cuda else "llm_memory.json")
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=2))
    for m, r in rows.items():
        if "plain_chunked" in rows:
            print(
                f"{m:>18}: ÷ plain_chunked: peak ×{summary['memory_ratio_vs_plain_chunked'][m]:.3f}"
                + (
                    f"  step ×{summary['time_ratio_vs_plain_chunked'][m]:.3f}"
                    if "time_ratio_vs_plain_chunked" in summary
                    else ""
                )
            )
        print(
            f"{m:>18}: peak {r[key]:8.0f} MB"
            + (f"  ×{summary['memory_ratio_vs_plain_hf'][m]:.2f}" if ref else "")
            + (f"  step {r['step_s_median']:.2f} s" if r.get("step_s_median") else "")
            + (
                f"  ×{summary['time_ratio_vs_plain_hf'][m]:.2f}"
                if "time_ratio_vs_plain_hf" in summary
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
