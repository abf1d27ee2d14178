"""Teacher-signal stores at matched bytes, on a peaked teacher: dense, head, top-k + tail
(k = 8…128), sampled (k = 4…64 draws). Per store: bytes/token, labelling speed and its
fidelity to the teacher on the labelled positions; per store and seed, a student trained
from it (same init, batches and steps for every store at a seed): held-out CE, KL(teacher
‖ student) and ECE of its next-token probabilities.

Teacher: bench/peaked_teacher.py (GPT 4 × 256, GPT-2 vocabulary), which labels the
GSM8K solution windows it was trained on; held-out = 128 windows of GSM8K's test
solutions. Every store is written by the real labeller and read back through
``SignalStore``; students train through ``LossStack`` with forward KL at T = 1 (top-k:
the KL to the prior-shaped reconstruction; sampled: the importance-weighted estimate).

Resumable: every finished unit (the teacher's numbers, a store's measurements, one
student run) is written to ``--out`` at once; a rerun with the same settings skips them
(the stores stay under ``--cache``). ``--smoke``: a random 1-layer teacher, 4 windows,
2 steps, a few stores (seconds; a check that the pipeline runs, not a measurement).

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python bench/store_matched.py
    .venv/bin/python bench/store_matched.py --table     # the markdown table from --out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import lm
import peaked_teacher
from darkknowledge.losses import CE, ForwardKL, LossStack, reconstruct
from darkknowledge.store import LabelSpec, label
from darkknowledge.store.fingerprint import files_digest
from darkknowledge.teachers import Batch, ModuleTeacher, StoreTeacher

RESULTS = lm.ROOT / "docs" / "results"
STORES = {  # name: (signal, k, dtype)
    "dense": ("dense", None, "fp16"),
    "head": ("head", None, "fp16"),
    **{f"topk{k}": ("topk", k, "q8") for k in (8, 16, 32, 64, 96, 128)},
    **{f"sampled{k}": ("sampled", k, "fp16") for k in (4, 8, 16, 32, 64)},
}
ARMS = (*STORES, "plain")  # plain: hard labels only, no teacher
STUDENT = {"d": 64, "layers": 2, "heads": 4, "ctx": 64}
SMOKE_STORES = ("dense", "head", "topk8", "sampled4")


def ece(conf, correct, bins: int = 15) -> float:
    """Expected calibration error: |accuracy − confidence| over equal-width bins of the
    max next-token probability, weighted by the share of positions in each bin."""
    edges = torch.linspace(0, 1, bins + 1)
    b = torch.bucketize(conf, edges[1:-1])  # (n,) bin of each position
    n = torch.bincount(b, minlength=bins).clamp_min(1)
    acc = torch.bincount(b, correct.float(), minlength=bins) / n
    cf = torch.bincount(b, conf, minlength=bins) / n
    w = torch.bincount(b, minlength=bins) / len(conf)
    return float((w * (acc - cf).abs()).sum())


@torch.inference_mode()
def evaluate(student, teacher, vx, vy, batch: int = 16) -> dict:
    """Held-out CE (nats/token), KL(teacher ‖ student) and ECE of the student."""
    ce = kl = 0.0
    confs, right = [], []
    for i in range(0, len(vx), batch):
        s = F.log_softmax(student(vx[i : i + batch]).float(), -1)  # (B, T, V)
        t = F.log_softmax(teacher(vx[i : i + batch]).float(), -1)
        y = vy[i : i + batch]
        ce += float(F.nll_loss(s.flatten(0, 1), y.flatten(), reduction="sum"))
        kl += float((t.exp() * (t - s)).sum())
        top = s.max(-1)
        confs.append(top.values.exp().flatten())
        right.append((top.indices == y).flatten())
    n = vy.numel()
    return {"val_ce": ce / n, "val_kl": kl / n, "val_ece": ece(torch.cat(confs), torch.cat(right))}


@torch.inference_mode()
def fidelity(stores: dict, teacher, x, ids, batch: int = 16) -> dict:
    """Per store, over the labelled positions: mean KL(teacher ‖ stored distribution),
    total variation to it, and the teacher's mass on the ids the store keeps."""
    acc = {n: {"kl": 0.0, "kl_even": 0.0, "tv": 0.0, "kept_mass": 0.0} for n in stores}
    npos = 0
    for i in range(0, len(x), batch):
        p_log = F.log_softmax(teacher(x[i : i + batch]).float(), -1)  # (B, T, V)
        p = p_log.exp()
        npos += p.shape[0] * p.shape[1]
        for name, st in stores.items():
            sig, a = st.get(ids[i : i + batch]), acc[name]
            if st.signal in ("dense", "head"):
                q_log = F.log_softmax(sig.logits, -1)
                a["kept_mass"] += p.shape[0] * p.shape[1]
            elif st.signal == "topk":
                args = (sig.topk_ids, sig.topk_logprobs, sig.tail_mass, p.shape[-1])
                q_even = reconstruct(*args)  # the tail spread evenly (the bucket loss's view)
                a["kl_even"] += float((p * (p_log - q_even)).sum())
                del q_even
                q_log = reconstruct(*args, sig.tail_log_prior)  # what the student trains on
                a["kept_mass"] += float(p.gather(-1, sig.topk_ids).sum())
            else:  # sampled: the empirical distribution of the draws, counts / k
                q = torch.zeros_like(p).scatter_add_(-1, sig.sampled_ids, sig.sampled_weights)
                a["tv"] += float(0.5 * (p - q).abs().sum())
                drawn = q > 0
                a["kept_mass"] += float((p * drawn).sum())
                # KL(teacher ‖ counts/k) is infinite wherever the teacher has mass off the
                # drawn ids, i.e. at every position here: reported as None
                a["kl"] = None
                continue
            a["kl"] += float((p * (p_log - q_log)).sum())
            a["tv"] += float(0.5 * (p - q_log.exp()).abs().sum())
    out = {}
    for name, a in acc.items():
        out[name] = {
            "mean_kl_teacher_stored": None if a["kl"] is None else a["kl"] / npos,
            "mean_kl_even_tail": a["kl_even"] / npos if stores[name].signal == "topk" else None,
            "mean_tv": a["tv"] / npos,
            "mean_teacher_mass_kept": a["kept_mass"] / npos,
        }
    return out


def write(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes may share --out
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)


@torch.inference_mode()
def raw_seconds(teacher, x, batch: int = 16) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        teacher(x[i : i + batch])
    return time.perf_counter() - t0


def make_store(name, teacher, x, ids, mask, folder: Path, tok: str) -> tuple[StoreTeacher, dict]:
    signal, k, dtype = STORES[name]
    spec = LabelSpec(signal=signal, k=k, dtype=dtype, shard_size=64, batch_size=16)
    out = folder / name
    n_raw = min(len(x), 128)  # the teacher's forward alone on the first windows, just before
    raw_tps = x[:n_raw].numel() / raw_seconds(teacher, x[:n_raw])
    t0 = time.perf_counter()
    st = label(ModuleTeacher(teacher), x, ids, out, spec, mask=mask, tokenizer=tok,
               preprocessing={"text": "gsm8k train solutions", "seq_len": x.shape[1]},
               progress=False)  # fmt: skip
    label_s = time.perf_counter() - t0
    once = (st.manifest.get("tail_prior") or st.manifest.get("head") or {}).get("bytes", 0)
    rec = {
        "signal": signal,
        "k": k,
        "dtype": dtype,
        "bytes_per_token": st.nbytes / st.num_positions,
        "bytes_once": once,  # the tail prior or the output layer, stored once per store
        "bytes_per_token_without_once": (st.nbytes - once) / st.num_positions,
        "label_s": label_s,
        "raw_tokens_per_s": raw_tps,
        "label_tokens_per_s": st.num_positions / label_s,
        "label_vs_raw_throughput": st.num_positions / label_s / raw_tps,
    }
    return StoreTeacher(st), rec


def train_student(arm, seed, st, x, y, ids, steps, batch, lr) -> lm.GPT:
    torch.manual_seed(seed)
    student = peaked_teacher.gpt(**STUDENT)
    if arm == "plain":
        stack = LossStack.of(CE())

        def loss_fn(logits, rows):
            return stack(logits, None, y[rows])[0]
    else:
        stack = LossStack.of(ForwardKL(1.0))

        def loss_fn(logits, rows):
            sig = st.signals(Batch(x[rows], None, ids[rows]))  # (B, T, ·)
            return stack(logits, sig, None, sig.mask)[0]

    lm.train_lm(student, x, y, steps, batch, lr, seed, loss_fn, log_every=steps)
    return student


def load_runs(folder: Path, settings: dict) -> dict:
    """The finished student runs under ``folder`` (one JSON file each) with ``settings``."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        if r.pop("settings", None) == settings:
            out[f"{r['arm']}/{r['seed']}"] = r
    return out


def summarise(res: dict) -> dict:
    """Mean ± sd per arm, and each arm's paired difference to the dense arm (same seed)."""
    out = {}
    by = {}
    for r in res["runs"].values():
        by.setdefault(r["arm"], {})[r["seed"]] = r
    dense = by.get("dense", {})
    for arm in ARMS:
        rs = by.get(arm, {})
        if not rs:
            continue
        row = {"seeds": sorted(rs)}
        for m in ("val_ce", "val_kl", "val_ece"):
            v = [rs[s][m] for s in sorted(rs)]
            row[m] = {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0}
            paired = [rs[s][m] - dense[s][m] for s in sorted(rs) if s in dense]
            if paired and arm != "dense":
                row[f"{m}_minus_dense"] = {
                    "mean": statistics.mean(paired),
                    "sd": statistics.stdev(paired) if len(paired) > 1 else 0.0,
                    "n": len(paired),
                }
        out[arm] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128, help="labelled 64-token windows")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--fid-windows",
        type=int,
        default=128,
        help="labelled windows the fidelity to the teacher is measured on",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument(
        "--out", default=None, help="results JSON (default docs/results/store_matched.json)"
    )
    ap.add_argument("--cache", default=None, help="store folder (default bench/.cache/matched)")
    ap.add_argument("--phase", choices=("all", "stores", "students"), default="all",
                    help="stores: label and measure the stores only; students: train from "
                         "stores labelled before (several such processes may share --out)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="seconds: random tiny teacher, 2 steps")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # cores shared with other jobs
    if a.smoke:
        a.windows, a.steps, a.seeds = 4, 2, a.seeds[:2]
        a.arms = [x for x in a.arms if x in SMOKE_STORES or x == "plain"]
        a.cache = a.cache or str(lm.ROOT / "bench" / ".cache" / "matched_smoke")
        a.out = a.out or str(Path(a.cache) / "store_matched.json")
    out = Path(a.out or RESULTS / "store_matched.json")
    cache = Path(a.cache or lm.ROOT / "bench" / ".cache" / "matched")
    if a.table:
        if not out.exists():
            print(f"store_matched: {out} does not exist; run the benchmark first", file=sys.stderr)
            return 2
        print(table(json.loads(out.read_text())))
        return 0
    if a.steps < 1 or a.batch < 1 or a.windows < 1:
        print("store_matched: --steps, --batch and --windows must be ≥ 1", file=sys.stderr)
        return 2
    settings = {"windows": a.windows, "fid_windows": a.fid_windows, "steps": a.steps, "batch": a.batch, "lr": a.lr,
                "student": STUDENT, "smoke": a.smoke}  # fmt: skip
    res = json.loads(out.read_text()) if out.exists() else {}
    if res and res.get("settings") != settings:
        print(f"store_matched: {out} holds runs with other settings ({res.get('settings')}); "
              "pass another --out or delete it", file=sys.stderr)  # fmt: skip
        return 2
    res = {"settings": settings, "teacher": {}, "stores": {}, "runs": {}, "commands": []} | res
    cmd = "bench/store_matched.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if cmd.strip() not in res["commands"]:
        res["commands"].append(cmd.strip())

    if a.smoke:
        torch.manual_seed(0)
        teacher = lm.GPT(d=32, layers=1, heads=2, ctx=64).eval()
        (x, y), (vx, vy) = peaked_teacher.gsm8k_splits(a.windows)
        vx, vy = vx[:4], vy[:4]
    else:
        teacher = peaked_teacher.load_teacher()
        (x, y), (vx, vy) = peaked_teacher.gsm8k_splits(a.windows)
    ids, mask = torch.arange(len(x)), torch.ones_like(x, dtype=torch.bool)
    if not res["teacher"]:
        info = {}
        tj = peaked_teacher.OUT / "train.json"
        if not a.smoke and tj.exists():
            info = {k: v for k, v in json.loads(tj.read_text()).items() if k != "log"}
        res["teacher"] = info | {
            "labelled": peaked_teacher.peakedness(teacher, x, y),
            "held_out": peaked_teacher.peakedness(teacher, vx, vy),
            "labelled_tokens": int(mask.sum()),
            "held_out_tokens": vy.numel(),
        }
        write(res, out)
    print("teacher", json.dumps(res["teacher"]["labelled"]), flush=True)

    tok = files_digest(lm.GPT2Tokenizer().files)
    stores: dict[str, StoreTeacher] = {}
    new = []
    for name in [n for n in a.arms if n in STORES]:
        if name in res["stores"] and (cache / name / "manifest.json").exists():
            stores[name] = StoreTeacher(cache / name)
            continue
        if a.phase == "students":
            print(f"store_matched: no {name} store in {cache}; label it first with "
                  "--phase stores", file=sys.stderr)  # fmt: skip
            return 2
        shutil.rmtree(cache / name, ignore_errors=True)
        stores[name], rec = make_store(name, teacher, x, ids, mask, cache, tok)
        res["stores"][name] = rec
        new.append(name)
        print(name, json.dumps(rec), flush=True)
        write(res, out)
    todo = [n for n in stores if "mean_tv" not in res["stores"][n]]
    if todo:
        nf = min(a.fid_windows, len(x))
        fid = fidelity({n: stores[n].store for n in todo}, teacher, x[:nf], ids[:nf])
        res["fidelity_tokens"] = int(mask[:nf].sum())
        for n in todo:
            res["stores"][n] |= fid[n]
            print(n, json.dumps(fid[n]), flush=True)
        write(res, out)

    runs_dir = cache / "runs"  # one JSON file per finished student run
    runs_dir.mkdir(parents=True, exist_ok=True)

    def update():  # the file as other processes left it, with every finished run
        nonlocal res
        res = json.loads(out.read_text()) | {"runs": load_runs(runs_dir, settings)}
        res["summary"] = summarise(res)
        write(res, out)

    for seed in a.seeds if a.phase != "stores" else []:  # seed outermost: a partial grid is paired
        for arm in a.arms:
            key = f"{arm}/{seed}"
            if key in load_runs(runs_dir, settings):
                continue
            t0 = time.perf_counter()
            student = train_student(arm, seed, stores.get(arm), x, y, ids, a.steps, a.batch, a.lr)
            rec = {"arm": arm, "seed": seed, "train_s": time.perf_counter() - t0,
                   **evaluate(student, teacher, vx, vy)}  # fmt: skip
            f = runs_dir / f"{arm}_{seed}.json"
            f.with_suffix(".tmp").write_text(json.dumps({"settings": settings, **rec}))
            f.with_suffix(".tmp").replace(f)
            update()
            print(json.dumps(rec), flush=True)
    update()
    if not a.smoke:
        plot(res, out.with_suffix(".png"))
    print(table(res))
    return 0


def _fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def table(res: dict) -> str:
    t = res["teacher"]
    lines = [
        f"Teacher: labelled positions ({t['labelled_tokens']:,} tokens) entropy "
        f"{t['labelled']['entropy']:.3f} nats, mass outside top-64 "
        f"{100 * t['labelled']['tail_mass_top64']:.2f} %, CE {t['labelled']['ce']:.3f}; held-out "
        f"({t['held_out_tokens']:,} tokens) CE {t['held_out']['ce']:.3f}, entropy "
        f"{t['held_out']['entropy']:.3f}, tail {100 * t['held_out']['tail_mass_top64']:.2f} %.",
        "",
        "| store | bytes/token | KL(teacher ‖ stored) | TV | teacher mass kept | label tok/s (÷ raw) "
        "| student held-out CE | − dense (paired) | KL(teacher ‖ student) | ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summ = res.get("summary", {})
    for arm in ARMS:
        s = res["stores"].get(arm)
        r = summ.get(arm)
        if s is None and r is None:
            continue
        if s is None:
            store_cols = "— | — | — | — | —"
        else:
            kl = s.get("mean_kl_teacher_stored")
            kl_txt = "∞ (support)" if s["signal"] == "sampled" else f"{kl:.3g}" if kl else "—"
            store_cols = (f"{s['bytes_per_token']:,.1f} | {kl_txt} | {_fmt(s.get('mean_tv'))} | "
                          f"{_fmt(s.get('mean_teacher_mass_kept'))} | "
                          f"{s['label_tokens_per_s']:,.0f} ({s['label_vs_raw_throughput']:.2f})")  # fmt: skip
        if r is None:
            stud = "— | — | — | —"
        else:
            d = r.get("val_ce_minus_dense")
            d_txt = "—" if d is None else f"{d['mean']:+.4f} ± {d['sd']:.4f}"
            stud = (f"{r['val_ce']['mean']:.4f} ± {r['val_ce']['sd']:.4f} | "
                    f"{d_txt} | "
                    f"{r['val_kl']['mean']:.4f} ± {r['val_kl']['sd']:.4f} | "
                    f"{r['val_ece']['mean']:.4f} ± {r['val_ece']['sd']:.4f}")  # fmt: skip
        lines.append(f"| {arm} | {store_cols} | {stud} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res.get("summary", {})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (m, lab) in zip(axes, (("val_ce", "student held-out CE (nats/token)"),
                                   ("val_kl", "KL(teacher ‖ student), held-out"),
                                   ("val_ece", "student ECE (15 bins)")), strict=True):  # fmt: skip
        for fam, mk in (("topk", "o-"), ("sampled", "s-")):
            arms = [n for n in STORES if n.startswith(fam) and n in summ and n in res["stores"]]
            if not arms:
                continue
            xs = [res["stores"][n]["bytes_per_token"] for n in arms]
            ys = [summ[n][m]["mean"] for n in arms]
            es = [summ[n][m]["sd"] for n in arms]
            ax.errorbar(xs, ys, es, fmt=mk, capsize=2,
                        label="top-k + tail prior (q8)" if fam == "topk" else "sampled (counts)")  # fmt: skip
            for n, xx, yy in zip(arms, xs, ys, strict=True):
                ax.annotate(n.removeprefix(fam), (xx, yy), fontsize=7)
        for n, mk in (("dense", "k*"), ("head", "D")):
            if n in summ and n in res["stores"]:
                ax.errorbar([res["stores"][n]["bytes_per_token"]], [summ[n][m]["mean"]],
                            [summ[n][m]["sd"]], fmt=mk, capsize=2, label=f"{n} fp16")  # fmt: skip
        if "plain" in summ:
            ax.axhline(
                summ["plain"][m]["mean"], color="gray", ls=":", lw=1, label="hard labels only"
            )
        ax.axvline(300, color="gray", ls="--", lw=0.8)
        ax.set(xscale="log", xlabel="store bytes per token", ylabel=lab)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
