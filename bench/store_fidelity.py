"""Size vs fidelity of a token-level store: bytes per token against the mean
KL(dense ‖ top-k + tail reconstruction) per token.

Teacher: the small GPT of bench/lm_teacher.py (GPT-2 vocabulary, 50,257 tokens) on
held-out tinyshakespeare windows. Every setting is written with the real labeller
(`darkknowledge.store.label`) and read back through the store; bytes are the shard
files on disk (headers included) ÷ stored tokens.

    .venv/bin/python bench/store_fidelity.py --windows 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import lm
from darkknowledge.losses import reconstruct
from darkknowledge.store import LabelSpec, label
from darkknowledge.store.fingerprint import files_digest
from darkknowledge.teachers import ModuleTeacher
from lm_teacher import CONFIG

CACHE = lm.ROOT / "bench" / ".cache"
SETTINGS = (
    [("dense", None, "fp16")]
    + [("topk", k, dt) for dt in ("fp16", "q8") for k in (8, 16, 32, 64, 96)]
    + [("head", None, dt) for dt in ("fp16", "bf16")]
)
BIG_STORE = 1_000_000  # tokens: the one-off bytes (prior, output layer) spread over a big store


def load_teacher() -> lm.GPT:
    m = lm.GPT(**CONFIG)
    m.load_weights(load_file(str(CACHE / "lm_teacher" / "model.safetensors")))
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--out", default=str(lm.ROOT / "docs" / "results" / "store_size_fidelity.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher = load_teacher()
    _, (vx, _vy) = lm.splits(CONFIG["ctx"])
    x = vx[: a.windows]
    ids = torch.arange(len(x))
    mask = torch.ones_like(x, dtype=torch.bool)
    with torch.inference_mode():
        dense = torch.cat([teacher(x[i : i + 16]) for i in range(0, len(x), 16)])  # (N, T, V)
    p_log = F.log_softmax(dense.float(), -1)
    tok = files_digest(lm.GPT2Tokenizer().files)
    corpus_tokens = len(lm.shakespeare_tokens())  # all of tinyshakespeare, GPT-2 BPE
    rows = []
    for signal, k, dtype in SETTINGS:
        out = CACHE / "fidelity" / f"{signal}{k or ''}_{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        spec = LabelSpec(signal=signal, k=k, dtype=dtype, shard_size=32, batch_size=16)
        t0 = time.perf_counter()
        store = label(ModuleTeacher(teacher), x, ids, out, spec, mask=mask, tokenizer=tok,
                      preprocessing={"text": "tinyshakespeare", "seq_len": CONFIG["ctx"]},
                      progress=False)  # fmt: skip
        label_s = time.perf_counter() - t0
        sig = store.get(ids)
        kl_even = None
        if signal == "dense":
            q_log = F.log_softmax(sig.logits, -1)
            tail = torch.zeros(())
        elif signal == "head":  # the logits recomputed through the stored output layer
            q_log = F.log_softmax(sig.logits, -1)
            tail = torch.zeros(())
        else:
            args = (sig.topk_ids, sig.topk_logprobs, sig.tail_mass, dense.shape[-1])
            q_log = reconstruct(*args, sig.tail_log_prior)  # the store's reconstruction
            q_even = reconstruct(*args)  # the tail spread evenly (no prior)
            kl_even = float((p_log.exp() * (p_log - q_even)).sum(-1).mean())
            del q_even
            tail = sig.tail_mass
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # (N, T)
        once = store.manifest.get("tail_prior") or store.manifest.get("head") or {}
        prior_bytes = once.get("bytes", 0)
        per_token = (store.nbytes - prior_bytes) / store.num_positions
        row = {
            "signal": signal,
            "k": k,
            "dtype": dtype,
            "bytes_per_token": store.nbytes / store.num_positions,
            # the prior (one (V,) fp16 vector) or the output layer ((V, H) once) is stored
            # once per store: per token it shrinks as the store grows
            "prior_bytes": prior_bytes,
            "bytes_per_token_without_prior": per_token,
            "bytes_per_token_at_1M_tokens": per_token + prior_bytes / BIG_STORE,
            "bytes_per_token_at_corpus": per_token + prior_bytes / corpus_tokens,
            "mean_kl_nats_per_token": float(kl.mean()),
            "mean_kl_even_tail": kl_even,
            "median_kl": float(kl.median()),
            "mean_tail_mass": float(tail.float().mean()),
            "label_s": label_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out)
    ent = float(-(p_log.exp() * p_log).sum(-1).mean())
    res = {
        "teacher": {**CONFIG, **json.loads((CACHE / "lm_teacher" / "train.json").read_text())}
        | {"log": None},
        "tokens": int(mask.sum()),
        "corpus_tokens": corpus_tokens,
        "teacher_mean_entropy_nats": ent,
        "rows": rows,
        "command": f"bench/store_fidelity.py --windows {a.windows}",
    }
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    plot(res, Path(a.out).with_suffix(".png"))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dt, mk in (("fp16", "o-"), ("q8", "s-")):
        rs = [r for r in res["rows"] if r["signal"] == "topk" and r["dtype"] == dt]
        ax.plot([r["bytes_per_token"] for r in rs], [r["mean_kl_nats_per_token"] for r in rs], mk,
                label=f"top-k + prior-shaped tail, {dt}")  # fmt: skip
        if dt == "q8":
            ax.plot([r["bytes_per_token_without_prior"] for r in rs],
                    [r["mean_kl_even_tail"] for r in rs], "x:", color="gray",
                    label="top-k + even tail, q8 (no prior)")  # fmt: skip
        for r in rs:
            ax.annotate(
                f"k={r['k']}", (r["bytes_per_token"], r["mean_kl_nats_per_token"]), fontsize=7
            )
    d = next(r for r in res["rows"] if r["signal"] == "dense")
    ax.plot(
        [d["bytes_per_token"]], [max(d["mean_kl_nats_per_token"], 1e-6)], "k*", label="dense fp16"
    )
    for r, mk in zip([r for r in res["rows"] if r["signal"] == "head"], "Dv", strict=False):
        ax.plot([r["bytes_per_token_at_1M_tokens"]], [max(r["mean_kl_nats_per_token"], 1e-9)],
                mk, label=f"last hidden state + output layer, {r['dtype']} (1M-token store)")  # fmt: skip
    ax.axvline(300, color="gray", ls="--", lw=0.8)
    ax.axhline(0.01, color="gray", ls=":", lw=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="bytes per token",
        ylabel="mean KL(dense ‖ stored), nats/token",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
