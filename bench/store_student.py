"""Student quality from a top-k store vs a dense store, token-level (≥ 2 seeds).

The small GPT teacher of bench/lm_teacher.py labels a transfer set of tinyshakespeare
windows twice — dense fp16 logits and the default top-k store — with the real labeller.
The same student GPT is then trained from each store with forward KL (T = 1) through
darkknowledge's LossStack (the sparse terms are picked automatically for top-k), and,
for reference, on hard labels alone. Reported: held-out next-token cross-entropy and
KL(teacher ‖ student) per token.

    .venv/bin/python bench/store_student.py --windows 192 --steps 150 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import lm
from darkknowledge.losses import CE, ForwardKL, LossStack
from darkknowledge.store import LabelSpec, label
from darkknowledge.store.fingerprint import files_digest
from darkknowledge.teachers import Batch, ModuleTeacher, StoreTeacher
from lm_teacher import CONFIG
from store_fidelity import load_teacher

CACHE = lm.ROOT / "bench" / ".cache" / "student"
# topk: the default store (k = 64, q8, tail prior) with its prior-shaped tail KL;
# topk_even: the same store with the bucket loss (no prior), the earlier default
# head: the head store (the teacher's last hidden state + its output layer: exact logits)
ARMS = ("dense", "topk", "topk_even", "plain", "head")
STUDENT = {"d": 64, "layers": 2, "heads": 4, "ctx": 64}


@torch.inference_mode()
def evaluate(student, teacher, vx, vy) -> dict:
    ce = kl = 0.0
    n = 0
    for i in range(0, len(vx), 16):
        s = F.log_softmax(student(vx[i : i + 16]).float(), -1)  # (B, T, V)
        t = F.log_softmax(teacher(vx[i : i + 16]).float(), -1)
        ce += float(F.nll_loss(s.flatten(0, 1), vy[i : i + 16].flatten(), reduction="sum"))
        kl += float((t.exp() * (t - s)).sum())
        n += vy[i : i + 16].numel()
    return {"val_ce": ce / n, "val_kl_to_teacher": kl / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=192)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", default="q8")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                    help="arms to (re)run; the others keep their runs in --out")  # fmt: skip
    ap.add_argument("--out", default=str(lm.ROOT / "docs" / "results" / "store_student.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)  # cores shared with other jobs: see bench/kd_overhead.py
    teacher = load_teacher()
    (x, y), (vx, vy) = lm.splits(CONFIG["ctx"])
    x, y, vx, vy = x[: a.windows], y[: a.windows], vx[:128], vy[:128]
    ids, mask = torch.arange(len(x)), torch.ones_like(x, dtype=torch.bool)
    tok = files_digest(lm.GPT2Tokenizer().files)
    stores = {}
    for name, spec in {
        "dense": LabelSpec(signal="dense", k=None, dtype="fp16", shard_size=64, batch_size=16),
        "topk": LabelSpec(signal="topk", k=a.k, dtype=a.dtype, shard_size=64, batch_size=16),
        "head": LabelSpec(signal="head", dtype="fp16", shard_size=64, batch_size=16),
    }.items():
        if name not in a.arms and not (name == "topk" and "topk_even" in a.arms):
            continue
        out = CACHE / name
        shutil.rmtree(out, ignore_errors=True)
        st = label(ModuleTeacher(teacher), x, ids, out, spec, mask=mask, tokenizer=tok,
                   preprocessing={"text": "tinyshakespeare", "seq_len": CONFIG["ctx"]})  # fmt: skip
        stores[name] = StoreTeacher(st)
        print(name, st.nbytes / st.num_positions, "bytes/token", flush=True)
    old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    runs = [r for r in old.get("runs", []) if r["arm"] not in a.arms]
    if "topk" in stores:
        stores["topk_even"] = stores["topk"]
    for arm in a.arms:
        for seed in a.seeds:
            torch.manual_seed(seed)
            student = lm.GPT(**STUDENT)
            if arm == "plain":
                stack = LossStack.of(CE())

                def loss_fn(logits, rows, stack=stack):
                    return stack(logits, None, y[rows])[0]
            else:
                stack, st = LossStack.of(ForwardKL(1.0)), stores[arm]

                def loss_fn(logits, rows, stack=stack, st=st, even=arm == "topk_even"):
                    sig = st.signals(Batch(x[rows], None, ids[rows]))  # (B, T, ·)
                    if even:  # the bucket loss: tail mass only, not where it goes
                        sig.tail_log_prior = None
                    return stack(logits, sig, None, sig.mask)[0]

            t0 = time.perf_counter()
            lm.train_lm(student, x, y, a.steps, a.batch, 3e-3, seed, loss_fn, log_every=a.steps)
            rec = {"arm": arm, "seed": seed, "train_s": time.perf_counter() - t0,
                   **evaluate(student, teacher, vx, vy)}  # fmt: skip
            runs.append(rec)
            print(json.dumps(rec), flush=True)
    summary = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if len(rs) < 2:
            continue
        summary[arm] = {
            m: {"mean": statistics.mean(r[m] for r in rs), "sd": statistics.stdev(r[m] for r in rs)}
            for m in ("val_ce", "val_kl_to_teacher")
        }
    res = {
        "teacher_val_ce": evaluate(teacher, teacher, vx, vy)["val_ce"],
        "transfer_tokens": int(mask.sum()),
        "stores": old.get("stores", {})
        | {
            n: {
                "bytes_per_token": s.store.nbytes / s.store.num_positions,
                "signal": s.store.signal,
                "k": s.store.k,
                "dtype": s.store.dtype,
            }
            for n, s in stores.items()
            if n != "topk_even"
        },
        "student": STUDENT,
        "steps": a.steps,
        "batch": a.batch,
        "runs": runs,
        "summary": summary,
        "commands": [
            *old.get("commands", [old["command"]] if "command" in old else []),
            f"bench/store_student.py --windows {a.windows} --steps {a.steps} "
            f"--seeds {' '.join(map(str, a.seeds))} --k {a.k} --dtype {a.dtype} "
            f"--arms {' '.join(a.arms)}",
        ],
    }
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(CACHE / "dense", ignore_errors=True)


if __name__ == "__main__":
    main()
