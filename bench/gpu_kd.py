"""KD on a GPU at bf16: darkknowledge's chunked losses beside TRL's and Liger's, the
labeller's tokens/s, and students from sampled vs top-k stores of equal size.

The pinned set-up is the one of ``bench/lm_memory.py --cuda`` (its builders are used):
vocabulary 151,936, sequence 4096, batch 4, teacher GPT-2 8 layers × 512, student GPT-2
4 layers × 256, random weights, bf16 weights, AdamW, peak ``torch.cuda.max_memory_allocated``.

Sections (all in one run, one JSON):

- ``step``: one training step of the student (forward, loss, backward, AdamW), a fresh
  process per row; first-step seconds, median of the timed steps, peak CUDA memory.
  Rows: ``dk_ce`` (darkknowledge's chunked LM head, cross-entropy, no teacher);
  ``dk_fkl`` / ``dk_jsd`` (the same head with a live teacher: forward KL, JSD β = 0.5;
  ``darkknowledge.lm.losses.chunked_head_loss``); ``trl_fkl`` / ``trl_jsd`` (TRL 1.16's
  ``trl.trainer.distillation_trainer._chunked_divergence_loss``, the loss that
  ``DistillationTrainer._compute_loss`` calls, through
  ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``; β = 0 / 0.5);
  ``liger_fkl`` / ``liger_jsd`` (Liger-Kernel's ``liger_kernel.transformers.
  LigerFusedLinearJSD``, ``jsd_beta`` 0 / 0.5; Triton, so GPU only).
- ``agree``: the same quantities on the same fp32 inputs (hidden states and heads), at
  β = 0, 0.5, 0.25 and 1 (reverse KL): loss values and gradients, darkknowledge against
  TRL (and Liger on a GPU).
- ``label``: darkknowledge's labeller (``darkknowledge.store.label.label``: fingerprint,
  encode, atomic shards, manifest) into a top-k store (k 64, q8, tail prior) and a sampled
  store (16 draws) vs the raw teacher forward over the same token blocks; tokens/s,
  interleaved rounds, medians.
- ``quality``: a teacher GPT-2 trained on TinyShakespeare (GPT-2 BPE) labels a transfer
  set into a top-k store (k 16, q8, no tail prior: the loss does not read it) and a sampled
  store with as many draws as fit in the same bytes; the same student is trained from each (forward KL through the chunked head), from
  the live teacher and on hard labels alone; held-out next-token CE and KL(teacher ‖ student).

Run (GPU machine; ``prepare`` first, here, where the package registries are reachable)::

    python bench/gpu_kd.py prepare          # wheels + tokens into bench/.gpubench (ignored)
    python3 bench/gpu_kd.py --out "$OUT"    # on the GPU machine; installs the wheels itself
    python bench/gpu_kd.py --smoke          # CPU, fp32, tiny sizes, one process: every code
                                            # path, numbers mean nothing (tests run this)

See bench/README.md for the device command (carry list, time limit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CARRY = BENCH / ".gpubench"  # ignored; carried to the GPU machine
WHEELS = CARRY / "wheels"
TOKENS = CARRY / "tinyshakespeare_gpt2.npy"
LOCK = BENCH / "gpu_wheels.txt"
IMAGE = BENCH / "gpu_image_packages.txt"
SITE = Path(tempfile.gettempdir()) / "dk-gpu-kd-site"  # where the wheels go on the GPU
SHARED = ROOT.parent / "shared" / "data"
# the GPU machine's interpreter (its image): the wheels are chosen for it
WHEEL_PY = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")

MODES = {
    "dk_ce": "darkknowledge chunked head, cross-entropy (no teacher)",
    "dk_fkl": "darkknowledge chunked head, forward KL, live teacher",
    "dk_jsd": "darkknowledge chunked head, JSD beta 0.5, live teacher",
    "trl_fkl": "trl.trainer.distillation_trainer._chunked_divergence_loss, beta 0",
    "trl_jsd": "trl.trainer.distillation_trainer._chunked_divergence_loss, beta 0.5",
    "liger_fkl": "liger_kernel.transformers.LigerFusedLinearJSD, jsd_beta 0",
    "liger_jsd": "liger_kernel.transformers.LigerFusedLinearJSD, jsd_beta 0.5",
}
# β of the generalised JSD (0: forward KL, 1: reverse KL); jsd25 and rkl are checked in
# the agreement section only (β = 0.5 is symmetric, so it cannot tell β from 1 − β)
BETA = {"fkl": 0.0, "jsd": 0.5, "jsd25": 0.25, "rkl": 1.0}
SECTIONS = ("step", "agree", "label", "quality")
LIGER_CPU = "liger: not run on CPU (Triton kernels need a GPU)"


# ---------------------------------------------------------------------------- sizes


def sizes(a) -> dict:
    """Every size of a run: the pinned GPU set-up, or the tiny CPU smoke one."""
    import lm_memory  # the pinned teacher and student

    if a.smoke:
        return dict(
            device="cpu", dtype="fp32", vocab=512, seq=32, batch=2, chunk=16, timed=2,
            teacher=(2, 64, 2), student=(1, 32, 2),
            agree_n=48, agree_v=512, agree_h=(32, 64),
            label_seqs=4, label_batch=2, label_rounds=1, label_topk=16, label_draws=8,
            q_seq=32, q_windows=24, q_val=8, q_teacher_steps=15, q_steps=6, q_batch=4,
            q_k=4, q_lr=3e-3, q_teacher=(2, 64, 2), q_student=(1, 32, 2),
        )  # fmt: skip
    return dict(
        device="cuda", dtype="bf16", vocab=151_936, seq=4096, batch=4, chunk=1024,
        timed=a.timed_steps, teacher=lm_memory.TEACHER, student=lm_memory.STUDENT,
        agree_n=512, agree_v=151_936, agree_h=(256, 512),
        label_seqs=a.label_seqs, label_batch=1, label_rounds=a.label_rounds, label_topk=64,
        label_draws=16,
        q_seq=256, q_windows=512, q_val=128, q_teacher_steps=a.teacher_steps,
        q_steps=a.quality_steps, q_batch=16, q_k=16, q_lr=1e-3,
        q_teacher=lm_memory.TEACHER, q_student=lm_memory.STUDENT,
    )  # fmt: skip


def _ns(z: dict):
    """lm_memory's setup() reads these fields."""
    return argparse.Namespace(
        cuda=z["device"] == "cuda", vocab=z["vocab"], seq=z["seq"], batch=z["batch"]
    )


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


# ---------------------------------------------------------------------- the peers


def trl_loss():
    """TRL's chunked distillation loss: what DistillationTrainer._compute_loss calls."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


def liger_jsd(beta: float):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "liger-kernel", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def head_loss(mode: str, h, w, b, th, tw, tb, labels, chunk: int):
    """The loss of one step for ``mode``: student rows ``h (N, H)`` through head ``w (V, H)``
    / ``b``, teacher rows ``th (N, Ht)`` through ``tw`` / ``tb``, next tokens ``labels (N,)``.
    Every form is a mean over the N tokens."""
    import torch
    import torch.nn.functional as F

    from darkknowledge.lm.losses import TokenLoss, chunked_head_loss

    family, kind = mode.split("_")
    if mode == "dk_ce":
        spec = TokenLoss("forward_kl", kd_weight=0.0, ce_weight=1.0)
        return chunked_head_loss(h, w, b, spec, labels=labels, chunk=chunk)
    beta = BETA[kind]
    if family == "dk":
        spec = TokenLoss("forward_kl") if beta == 0.0 else TokenLoss("jsd", beta=beta)
        return chunked_head_loss(
            h, w, b, spec, chunk=chunk, teacher=lambda lo, hi: F.linear(th[lo:hi], tw, tb)
        )
    if family == "trl":
        mask = torch.ones(1, h.shape[0], dtype=torch.long, device=h.device)
        loss, _entropy, _n = trl_loss()(
            h[None], th[None], w, tw, mask, beta,
            student_lm_head_bias=b, teacher_lm_head_bias=tb,
        )  # fmt: skip
        return loss
    if family == "liger":
        if b is not None or tb is not None:
            raise ValueError("LigerFusedLinearJSD takes heads without bias")
        return liger_jsd(beta)(h, w, th, tw, None)
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------ section: step


def one_step_mode(z: dict, mode: str) -> dict:
    """One row of the step section: the pinned models, ``z['timed']`` timed steps."""
    import lm_memory
    from darkknowledge.lm import models as M

    if mode.startswith("liger") and z["device"] == "cpu":
        return {"mode": mode, "status": LIGER_CPU}
    torch, teacher, student, ids = lm_memory.setup(_ns(z), z["teacher"], z["student"])
    dev = ids.device
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    w, b = M.head(student)
    tw, tb = M.head(teacher)
    H, Ht = student.config.n_embd, teacher.config.n_embd

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        h = M.final_hidden(student, x, None).reshape(-1, H)  # (N, H)
        th = None
        if mode != "dk_ce":
            with torch.no_grad():
                th = M.final_hidden(teacher, x, None).reshape(-1, Ht)  # (N, Ht)
        loss = head_loss(mode, h, w, b, th, tw, tb, y.reshape(-1), z["chunk"])
        loss.backward()
        opt.step()
        return float(loss.detach())

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else None
    t0 = time.perf_counter()
    loss = step()
    _sync(dev)
    first = time.perf_counter() - t0
    times = []
    for _ in range(z["timed"]):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    out = {
        "mode": mode,
        "what": MODES[mode],
        "loss": loss,
        "first_step_s": first,
        "step_s": times,
        "step_s_median": statistics.median(times),
        "tokens_per_s": x.numel() / statistics.median(times),
    }
    if cuda:
        out["cuda_before_step_mb"] = before
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # in-process smoke: the process's peak so far, not this row's alone
        out["peak_rss_mb"] = lm_memory.rss_peak_mb()
    return out


def step_section(a, z: dict, modes: list[str]) -> dict:
    rows = {}
    for m in modes:
        if a.in_process:
            try:
                rows[m] = one_step_mode(z, m)
            except Exception as e:  # one failed row (an OOM, a peer's error) is recorded
                rows[m] = {"mode": m, "error": _err(e)}
        else:
            cmd = [sys.executable, __file__, "--one-step", m, *a.passthrough]
            r = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
            if r.returncode:
                tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                rows[m] = {"mode": m, "error": (tail[-1] if tail else f"exit {r.returncode}")}
            else:
                rows[m] = json.loads(r.stdout.strip().splitlines()[-1])
        print("step", json.dumps(rows[m]), flush=True)
    key = "peak_cuda_mb" if z["device"] == "cuda" else None
    ref = rows.get("dk_ce", {})
    out = {"rows": rows}
    if key and key in ref:
        out["memory_ratio_vs_dk_ce"] = {m: r[key] / ref[key] for m, r in rows.items() if key in r}
    if "step_s_median" in ref:
        out["time_ratio_vs_dk_ce"] = {
            m: r["step_s_median"] / ref["step_s_median"]
            for m, r in rows.items()
            if "step_s_median" in r
        }
    return out


# ----------------------------------------------------------------- section: agree


def agree_section(z: dict) -> dict:
    """The same divergence from darkknowledge, TRL and Liger on the same fp32 inputs:
    loss value and the gradients of student hidden states and head."""
    import torch

    dev = torch.device(z["device"])
    g = torch.Generator().manual_seed(0)
    n, v = z["agree_n"], z["agree_v"]
    hs, ht = z["agree_h"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    h, th = rnd(n, hs), rnd(n, ht)
    w, tw = rnd(v, hs, scale=2.0 / hs**0.5), rnd(v, ht, scale=3.0 / ht**0.5)
    out: dict = {"tokens": n, "vocab": v, "hidden": [hs, ht], "dtype": "fp32"}
    for kind in BETA:
        got = {}
        for fam in ("dk", "trl", "liger"):
            if fam == "liger" and dev.type == "cpu":
                got[fam] = {"status": LIGER_CPU}
                continue
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            try:
                loss = head_loss(f"{fam}_{kind}", hh, ww, None, th, tw, None, None, 64)
                loss.backward()
                got[fam] = {"loss": float(loss.detach()), "gh": hh.grad, "gw": ww.grad}
            except Exception as e:
                got[fam] = {"error": _err(e)}
        row = {"beta": BETA[kind], "dk_loss": got["dk"].get("loss")}
        for fam in ("trl", "liger"):
            o = got[fam]
            if "loss" not in o or "loss" not in got["dk"]:
                row[fam] = {k: val for k, val in o.items() if k in ("status", "error")}
                continue
            row[fam] = {
                "loss": o["loss"],
                "abs_diff": abs(o["loss"] - got["dk"]["loss"]),
                "grad_hidden_max_abs_diff": float((o["gh"] - got["dk"]["gh"]).abs().max()),
                "grad_head_max_abs_diff": float((o["gw"] - got["dk"]["gw"]).abs().max()),
            }
        out[kind] = row
    return out


# ----------------------------------------------------------------- section: label


class DeviceTeacher:
    """The teacher for the labeller: token ids (on the CPU) → the model's logits (B, T, V)
    in fp32 on the model's device (lm_memory's teacher, the ids moved first)."""

    def __init__(self, model, dev):
        import lm_memory

        self.inner = lm_memory._HFTeacher(model)
        self.dev = dev

    def signals(self, batch):
        batch.x = batch.x.to(self.dev)
        return self.inner.signals(batch)

    def modules(self):
        return self.inner.modules()


def label_section(z: dict, work: Path) -> dict:
    """Tokens/s of the labeller (top-k and sampled stores) vs the raw teacher forward."""
    import torch

    import lm_memory
    from darkknowledge.store.label import LabelSpec, label

    dev = torch.device(z["device"])
    dtype = torch.bfloat16 if z["dtype"] == "bf16" else torch.float32
    teacher, _ = lm_memory.build_pair(z["vocab"], z["seq"], z["teacher"], z["student"])
    teacher = teacher.to(dev, dtype).eval()
    n, bs = z["label_seqs"], z["label_batch"]
    x = torch.randint(0, z["vocab"], (n, z["seq"]), generator=torch.Generator().manual_seed(3))
    ids, mask = torch.arange(n), torch.ones(n, z["seq"], dtype=torch.bool)
    tokens = n * z["seq"]
    specs = {
        "topk": LabelSpec(signal="topk", k=z["label_topk"], dtype="q8", batch_size=bs,
                          shard_size=n),
        "sampled": LabelSpec(signal="sampled", k=z["label_draws"], batch_size=bs, shard_size=n),
    }  # fmt: skip

    def raw() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, bs):
                teacher(x[i : i + bs].to(dev))
        _sync(dev)
        return time.perf_counter() - t0

    def lab(name: str) -> tuple[float, int]:
        out = work / f"label_{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        st = label(DeviceTeacher(teacher, dev), x, ids, out, specs[name], mask=mask,
                   force=True, progress=False)  # fmt: skip
        _sync(dev)
        return time.perf_counter() - t0, st.nbytes

    raw()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"raw": [], "topk": [], "sampled": []}
    nbytes = {}
    for _ in range(z["label_rounds"]):  # interleaved rounds
        times["raw"].append(raw())
        for name in specs:
            t, nbytes[name] = lab(name)
            times[name].append(t)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"seconds": ts, "tokens_per_s": tokens / med}
        if name in nbytes:
            s = specs[name]
            rows[name] |= {"k": s.k, "bytes_per_token": nbytes[name] / tokens}
    for name in specs:
        rows[name]["ratio_vs_raw"] = rows[name]["tokens_per_s"] / rows["raw"]["tokens_per_s"]
    return {
        "tokens": tokens,
        "sequences": n,
        "seq": z["seq"],
        "batch": bs,
        "vocab": z["vocab"],
        "note": "label times include the teacher fingerprint, encoding, shard writes "
        "(fsync) and the manifest; the sampled draws run on the CPU",
        "rows": rows,
    }


# --------------------------------------------------------------- section: quality


def quality_tokens(smoke: bool):
    """(token ids (N,), vocab): GPT-2 BPE of TinyShakespeare (prepared file), or in the
    smoke run the bytes of its first 64 KiB (vocab 256)."""
    import numpy as np
    import torch

    if smoke:
        for d in (SHARED, ROOT / "shared" / "data"):
            f = d / "tinyshakespeare" / "input.txt"
            if f.exists():
                return torch.tensor(list(f.read_bytes()[: 64 * 1024])), 256
        raise SystemExit("error: no tinyshakespeare/input.txt under ../shared/data")
    if not TOKENS.exists():
        raise SystemExit(
            f"error: {TOKENS.relative_to(ROOT)} missing: run `bench/gpu_kd.py prepare`"
        )
    return torch.from_numpy(np.load(TOKENS).astype(np.int64)), 50257


def quality_section(z: dict, work: Path, smoke: bool) -> dict:
    """Students from a top-k store and a sampled store of (at most) the same bytes, from
    the live teacher and from hard labels; held-out CE and KL(teacher ‖ student)."""
    import torch
    import torch.nn.functional as F

    import lm_memory
    from darkknowledge.lm import models as M
    from darkknowledge.lm.losses import TokenLoss, chunked_head_loss
    from darkknowledge.losses.sampled import SampledTarget
    from darkknowledge.store.label import LabelSpec, _id_dtype, label

    dev = torch.device(z["device"])
    amp = dev.type == "cuda"  # fp32 weights, bf16 autocast on the GPU
    tokens, vocab = quality_tokens(smoke)
    T = z["q_seq"]
    n_val = len(tokens) // 10
    train_tok, val_tok = tokens[:-n_val], tokens[-n_val:]

    def windows(tok, n, seed):
        g = torch.Generator().manual_seed(seed)
        off = torch.randint(0, len(tok) - T - 1, (n,), generator=g)
        return torch.stack([tok[o : o + T + 1] for o in off.tolist()])  # (n, T+1)

    val = windows(val_tok, z["q_val"], 1)
    transfer = windows(train_tok, z["q_windows"], 2)
    teacher, student0 = lm_memory.build_pair(vocab, T, z["q_teacher"], z["q_student"])
    teacher, student0 = teacher.to(dev), student0.to(dev)

    def hidden(model, x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            return M.final_hidden(model, x, None).float()

    # 1. the teacher: hard labels on random windows of the training text
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(teacher.parameters(), lr=z["q_lr"])
    tw_, tb_ = M.head(teacher)
    ce_spec = TokenLoss("forward_kl", kd_weight=0.0, ce_weight=1.0)
    for s in range(z["q_teacher_steps"]):
        b = windows(train_tok, z["q_batch"], 100 + s).to(dev)
        opt.zero_grad(set_to_none=True)
        h = hidden(teacher, b[:, :-1]).reshape(-1, teacher.config.n_embd)
        chunked_head_loss(h, tw_, tb_, ce_spec, labels=b[:, 1:].reshape(-1), chunk=4096).backward()
        opt.step()
    teacher.eval().requires_grad_(False)
    teacher_s = time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(model) -> dict:
        ce = kl = 0.0
        n = 0
        for i in range(0, len(val), 8):
            b = val[i : i + 8].to(dev)
            s = F.log_softmax(F.linear(hidden(model, b[:, :-1]), *M.head(model)).float(), -1)
            t = F.log_softmax(F.linear(hidden(teacher, b[:, :-1]), *M.head(teacher)).float(), -1)
            ce += float(F.nll_loss(s.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
            kl += float((t.exp() * (t - s)).sum())
            n += b[:, 1:].numel()
        return {"val_ce": ce / n, "val_kl_to_teacher": kl / n}

    # 2. the stores: top-k (q8), then as many draws as fit in its bytes
    x = transfer[:, :-1]
    ids, mask = torch.arange(len(x)), torch.ones_like(x, dtype=torch.bool)
    n_pos = int(mask.sum())
    teach = DeviceTeacher(teacher, dev)
    common = dict(batch_size=8, shard_size=len(x))

    def store(name, spec):
        out = work / f"quality_{name}"
        shutil.rmtree(out, ignore_errors=True)
        return label(teach, x, ids, out, spec, mask=mask, force=True, progress=False)

    # no tail prior: the chunked head's top-k loss does not read it (100 kB at V = 50,257)
    topk = store(
        "topk", LabelSpec(signal="topk", k=z["q_k"], dtype="q8", tail_prior=False, **common)
    )
    topk_bpt = topk.nbytes / n_pos
    # sampled bytes per position: k ids + k counts (uint8) + the mask byte
    per_draw = _id_dtype(vocab).itemsize + 1
    draws = max(1, int((topk_bpt - 1) // per_draw))
    sampled = store("sampled", LabelSpec(signal="sampled", k=draws, **common))
    while sampled.nbytes > topk.nbytes and draws > 1:  # never more bytes than top-k
        draws -= 1
        sampled = store("sampled", LabelSpec(signal="sampled", k=draws, **common))

    # 3. the students: the same initial weights and batches for every arm
    kd = TokenLoss("forward_kl")

    def train(arm: str) -> dict:
        student = lm_memory.build_pair(vocab, T, z["q_teacher"], z["q_student"])[1].to(dev)
        student.load_state_dict(student0.state_dict())
        opt = torch.optim.AdamW(student.parameters(), lr=z["q_lr"])
        w, b = M.head(student)
        st = {"topk": topk, "sampled": sampled}.get(arm)
        g = torch.Generator().manual_seed(7)
        t0 = time.perf_counter()
        for _ in range(z["q_steps"]):
            rows = torch.randint(0, len(x), (z["q_batch"],), generator=g)
            xb, yb = transfer[rows, :-1].to(dev), transfer[rows, 1:].to(dev)
            opt.zero_grad(set_to_none=True)
            h = hidden(student, xb).reshape(-1, student.config.n_embd)  # (N, H)
            if arm == "plain":
                loss = chunked_head_loss(h, w, b, ce_spec, labels=yb.reshape(-1), chunk=4096)
            elif arm == "live":
                th = hidden(teacher, xb).reshape(-1, teacher.config.n_embd)
                loss = chunked_head_loss(
                    h, w, b, kd, chunk=4096,
                    teacher=lambda lo, hi, th=th: F.linear(th[lo:hi], *M.head(teacher)),
                )  # fmt: skip
            else:
                sig = st.get(rows)
                if arm == "sampled":
                    sid = sig.sampled_ids.reshape(-1, draws).to(dev)  # (N, k)
                    sw = sig.sampled_weights.reshape(-1, draws).to(dev)

                    def target(lo, hi, sid=sid, sw=sw):
                        return SampledTarget(sid[lo:hi], sw[lo:hi])
                else:
                    k = sig.topk_ids.shape[-1]
                    tid = sig.topk_ids.reshape(-1, k).to(dev)  # (N, K)
                    tlp = sig.topk_logprobs.reshape(-1, k).to(dev)
                    tail = sig.tail_mass.reshape(-1).to(dev)  # (N,)

                    def target(lo, hi, tid=tid, tlp=tlp, tail=tail):
                        return tid[lo:hi], tlp[lo:hi], tail[lo:hi]

                loss = chunked_head_loss(h, w, b, kd, chunk=4096, teacher=target)
            loss.backward()
            opt.step()
        _sync(dev)
        rec = {"train_s": time.perf_counter() - t0, **evaluate(student)}
        if st is not None:
            rec |= {"k": st.k, "bytes_per_token": st.nbytes / n_pos}
        return rec

    arms = {}
    for arm in ("topk", "sampled", "live", "plain"):
        arms[arm] = train(arm)
        print("quality", arm, json.dumps(arms[arm]), flush=True)
    return {
        "vocab": vocab,
        "tokens": "GPT-2 BPE of TinyShakespeare" if not smoke else "bytes of TinyShakespeare",
        "teacher": "GPT-2 {} layers x {}".format(*z["q_teacher"][:2]),
        "student": "GPT-2 {} layers x {}".format(*z["q_student"][:2]),
        "seq": T,
        "transfer_tokens": n_pos,
        "teacher_steps": z["q_teacher_steps"],
        "teacher_train_s": teacher_s,
        "student_steps": z["q_steps"],
        "batch": z["q_batch"],
        "lr": z["q_lr"],
        "teacher_val_ce": evaluate(teacher)["val_ce"],
        "equal_bytes": "sampled draws: as many as fit in the top-k store's bytes",
        "arms": arms,
    }


# ------------------------------------------------------------------- the wheels


def read_lock() -> list[dict]:
    """The lock file's rows: name==version, sha256, wheel file name."""
    rows = []
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req, _, comment = line.partition("#")
        spec, _, h = req.partition("--hash=sha256:")
        name, _, ver = spec.strip().partition("==")
        rows.append({"name": name, "version": ver, "sha256": h.strip(), "file": comment.strip()})
    return rows


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(reqs: list[str], dest: Path, hashes: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", WHEEL_PY, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["--require-hashes", "-r", str(LOCK)] if hashes else reqs
    subprocess.run(cmd, check=True)


def prepare(a) -> int:
    """Here, with the package registries: the locked wheels and the token file into
    bench/.gpubench, then the import check."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    if a.relock:  # new pins: download them, then write the hashes into the lock file
        pins = a.relock.split(",")
        tmp = Path(tempfile.mkdtemp())
        _pip_download(pins, tmp, hashes=False)
        head = [ln for ln in LOCK.read_text().splitlines() if ln.startswith("#")]
        lines = []
        for f in sorted(tmp.glob("*.whl")):
            name = f.name.split("-")[0].replace("_", "-").lower()
            ver = f.name.split("-")[1]
            mb = f.stat().st_size / 1e6
            lines.append(f"{name}=={ver} --hash=sha256:{_sha256(f)}  # {f.name} {mb:.2f} MB")
        LOCK.write_text("\n".join([*head, *lines]) + "\n")
        shutil.rmtree(tmp)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    _pip_download([], WHEELS, hashes=True)
    files = sorted(WHEELS.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.name:70s} {f.stat().st_size / 1e6:6.2f} MB")
    print(f"{len(files)} wheels, {total / 2**20:.2f} MiB in {WHEELS.relative_to(ROOT)}")
    if total >= 64 * 2**20:
        raise SystemExit("error: the wheels are over 64 MiB")
    write_tokens()
    return check_imports()


def write_tokens() -> None:
    """TinyShakespeare in GPT-2 BPE, as uint16 (the GPU machine has no ../shared)."""
    import numpy as np

    from darkknowledge.hf import io as hfio

    tok = hfio.load_tokenizer(SHARED / "tokenizers" / "gpt2")
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    ids = np.asarray(tok(text)["input_ids"], dtype=np.uint16)
    np.save(TOKENS, ids)
    print(f"{TOKENS.relative_to(ROOT)}: {len(ids)} tokens, {TOKENS.stat().st_size / 1e6:.2f} MB")


# The modules a GPU run imports (Liger is left out: it needs Triton to import at all; its
# wheel asks for torch and triton alone, both in the image).
GPU_IMPORTS = [
    "darkknowledge.lm.losses",
    "darkknowledge.lm.models",
    "darkknowledge.store.label",
    "darkknowledge.store.reader",
    "darkknowledge.hf.io",
    "trl.trainer.distillation_trainer",
    "transformers.models.gpt2.modeling_gpt2",
]

_IMPORT_CHECK = r"""
import importlib, importlib.metadata as md, json, re, sys
image, carried, mods = (json.loads(x) for x in sys.argv[1:4])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
image, carried = {norm(d) for d in image}, {norm(d) for d in carried} | {"darkknowledge"}
owners = md.packages_distributions()  # top-level module -> the distributions that ship it
refused, needs = set(), set()
def dists_of(root):
    return {norm(d) for d in owners.get(root, [])}
def importer():  # the top-level package of the module whose import statement runs
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")):
            return name.split(".")[0]
        f = f.f_back
    return ""
class Gate:  # every finder answers 'not installed' for a package the GPU run lacks
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        root = name.split(".")[0]
        dists = dists_of(root)
        ok = not dists or root in sys.stdlib_module_names or bool(dists & (image | carried))
        ok = ok or (root in sys.modules and name != root)  # a let-in package's own modules
        # an image package importing its own needs (or theirs): its version there brings them
        if not ok and (dists_of(importer()) & image or importer() in needs):
            needs.add(root)
        elif not ok:
            refused.add(root)
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [Gate(f) for f in sys.meta_path]
failed = {}
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        failed[m] = f"{type(e).__name__}: {e}"
print(json.dumps({"failed": failed, "refused": sorted(refused), "image_needs": sorted(needs)}))
"""


def check_imports() -> int:
    """Import what a GPU run imports, here, with every package refused that is neither in
    the GPU machine's image (bench/gpu_image_packages.txt) nor among the locked wheels."""
    image = [ln.strip() for ln in IMAGE.read_text().splitlines() if ln.strip()[:1] not in "#"]
    carried = [r["name"] for r in read_lock()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCH)])}
    args = [json.dumps(image), json.dumps(carried), json.dumps(GPU_IMPORTS)]
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, *args],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if r.returncode:
        sys.stderr.write(r.stderr[-2000:])
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print("import check:", json.dumps(res))
    if res["failed"]:
        print("error: a GPU run would fail to import: " + "; ".join(res["failed"]), file=sys.stderr)
        return 1
    return 0


def ensure_wheels() -> dict:
    """On the GPU machine: install the carried wheels (no network) unless TRL and Liger
    import already; checks every wheel's SHA-256 against the lock file."""
    import importlib.util

    have = {m: importlib.util.find_spec(m) is not None for m in ("trl", "liger_kernel")}
    if all(have.values()):
        return {"installed": False, "reason": "trl and liger_kernel already importable"}
    if not WHEELS.is_dir():
        return {"installed": False, "reason": f"no {WHEELS.relative_to(ROOT)}: run prepare"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade",
           "--find-links", str(WHEELS), "--target", str(SITE), "--require-hashes",
           "-r", str(LOCK)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = r.stderr.strip().splitlines()
        return {"installed": False, "reason": "pip: " + (tail[-1] if tail else "failed")}
    return {"installed": True, "target": str(SITE), "wheels": [r["file"] for r in read_lock()]}


def _paths() -> list[str]:
    out = [str(BENCH)]
    if SITE.is_dir():
        out.insert(0, str(SITE))
    import importlib.util

    if importlib.util.find_spec("darkknowledge") is None:  # not installed: this checkout's
        out.append(str(ROOT / "src"))
    return out


def _child_env() -> dict:
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(_paths() + ([old] if old else []))}


# ---------------------------------------------------------------------- driver


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["run", "prepare", "check-imports"], default="run")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny sizes, one process")
    ap.add_argument(
        "--out", default=None, help="output folder (default: $OUT, else bench/.cache/gpu_kd)"
    )
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timed-steps", type=int, default=5)
    ap.add_argument("--label-seqs", type=int, default=4)
    ap.add_argument("--label-rounds", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--quality-steps", type=int, default=300)
    ap.add_argument("--in-process", action="store_true", help="step rows in this process")
    ap.add_argument(
        "--fresh-processes",
        action="store_true",
        help="step rows each in a fresh process with --smoke too (the GPU default)",
    )
    ap.add_argument("--relock", default=None, help="prepare: new pins, comma-separated")
    ap.add_argument("--one-step", choices=list(MODES), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.passthrough = ["--timed-steps", str(a.timed_steps)] + (["--smoke"] if a.smoke else [])
    a.in_process = a.in_process or (a.smoke and not a.fresh_processes)
    return a


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    a = parse(argv)
    if a.what == "prepare":
        return prepare(a)
    if a.what == "check-imports":
        return check_imports()
    sections = [s for s in a.sections.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    bad = [s for s in sections if s not in SECTIONS] + [m for m in modes if m not in MODES]
    if bad:
        return fail(f"unknown section or mode {bad[0]!r} (sections: {', '.join(SECTIONS)}; "
                    f"modes: {', '.join(MODES)})")  # fmt: skip
    if min(a.timed_steps, a.label_seqs, a.label_rounds, a.teacher_steps, a.quality_steps) < 1:
        return fail("--timed-steps, --label-seqs, --label-rounds, --teacher-steps and "
                    "--quality-steps must be ≥ 1")  # fmt: skip
    if not a.smoke and not (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        return fail("no CUDA GPU here; --smoke runs the CPU check")
    wheels = None
    if not a.smoke and not a.one_step:
        wheels = ensure_wheels()  # before torch: a carried package may be newer than the image's
    sys.path[:0] = [p for p in _paths() if p not in sys.path]
    os.environ["PYTHONPATH"] = _child_env()["PYTHONPATH"]
    import torch

    z = sizes(a)
    if z["device"] == "cuda" and not torch.cuda.is_available():
        return fail("no CUDA GPU here; --smoke runs the CPU check")
    if a.smoke:
        torch.set_num_threads(1)
    if a.one_step:
        print(json.dumps(one_step_mode(z, a.one_step)))
        return 0
    out_dir = Path(a.out or os.environ.get("OUT") or BENCH / ".cache" / "gpu_kd")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {
        "bench": "bench/gpu_kd.py",
        "command": "python bench/gpu_kd.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": a.smoke,
        "shortened": (
            "smoke: CPU, fp32, tiny models and sizes; the numbers check the code paths only"
            if a.smoke
            else None
        ),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in z.items()},
        "versions": peer_versions(),
        "device_name": torch.cuda.get_device_name() if z["device"] == "cuda" else "cpu",
        "wheels": wheels,
    }
    name = "gpu_kd_smoke.json" if a.smoke else "gpu_kd.json"
    with tempfile.TemporaryDirectory(prefix="gpu_kd_") as tmp:
        work = Path(tmp)
        runners = {
            "step": lambda: step_section(a, z, modes),
            "agree": lambda: agree_section(z),
            "label": lambda: label_section(z, work),
            "quality": lambda: quality_section(z, work, a.smoke),
        }
        for s in sections:
            t0 = time.perf_counter()
            try:
                res[s] = runners[s]()
            except Exception as e:  # a failed section is recorded; the others still run
                res[s] = {"error": _err(e)}
            res[s]["section_s"] = time.perf_counter() - t0
            if s != "step":
                print(s, json.dumps(res[s])[:2000], flush=True)
            res["wall_s"] = time.perf_counter() - t_start
            res["complete"] = s == sections[-1]
            # after every section: a run stopped by its time limit keeps what it measured
            (out_dir / name).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(res))
    print(f"wrote {out_dir / name}")
    return 0


def summary(res: dict) -> str:
    """A short markdown table of the run."""
    mem = "peak_cuda_mb" if res["sizes"]["device"] == "cuda" else "peak_rss_mb"
    lines = [
        f"| row | loss | step s (median) | tokens/s | peak MB ({mem}) |",
        "|---|---|---|---|---|",
    ]
    for m, r in res.get("step", {}).get("rows", {}).items():
        if "step_s_median" in r:
            lines.append(f"| {m} | {r['loss']:.4f} | {r['step_s_median']:.4f} | "
                         f"{r['tokens_per_s']:.0f} | {r.get(mem, float('nan')):.0f} |")  # fmt: skip
        else:
            lines.append(f"| {m} | {r.get('status') or r.get('error')} | | | |")
    for name, r in res.get("label", {}).get("rows", {}).items():
        lines.append(f"| label {name} | | | {r['tokens_per_s']:.0f} | |")
    for arm, r in res.get("quality", {}).get("arms", {}).items():
        lines.append(f"| student {arm}: val CE {r['val_ce']:.3f}, KL {r['val_kl_to_teacher']:.3f}"
                     f", {r.get('bytes_per_token', 0):.1f} B/token | | | | |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
