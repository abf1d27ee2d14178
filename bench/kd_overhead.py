"""KD overhead: training time of distillation ÷ plain training, same student and steps.

Pinned setup (issue 4): Fashion-MNIST, teacher = ensemble of 3 small CNNs, student =
2×800 MLP, batch 256. Each measurement runs in a fresh process; rounds interleave the
modes so machine load hits them alike; the medians are compared.

    .venv/bin/python bench/kd_overhead.py prepare          # teachers + store (once)
    .venv/bin/python bench/kd_overhead.py run --steps 211 --online-steps 40 --rounds 3 --peers

Modes: ``plain`` (CE only), ``store`` (Hinton KD from a dense fp16 store),
``online`` (Hinton KD, the 3 CNNs run every step), and with ``--peers`` torchdistill
1.1.5's ``td_plain`` (TrainingBox-style loop) and ``td_online`` (DistillationBox with
its KDLoss), run by bench/.venv-peers/bin/python on the same data, weights and steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "kd"
FASHION = Path("/usr/share/datasets/fashion-mnist")
PEER_PY = ROOT / "bench" / ".venv-peers" / "bin" / "python"
RECIPE = {
    "name": "cnn-ensemble_to_mlp800_fashion",
    "data": {"name": "idx", "path": str(FASHION), "val_fraction": 0.1},
    "teacher": {
        "kind": "ensemble",
        "combine": "prob_mean",
        # shortened for 2 shared CPU cores: 1 epoch per member (the Fashion recipe of
        # the time trained three width-64 CNNs for 15; docs/results/store.md); this
        # changes the teacher's quality, not what a step costs.
        "members": [
            {
                "model": {"name": "small_cnn", "width": 32},
                "train": {"epochs": 1, "batch_size": 128, "lr": 3.0e-3},
                "seed": s,
            }
            for s in range(3)
        ],
    },
    "student": {"model": {"name": "mlp", "hidden": [800, 800]}},
    "loss": {"hinton_kd": {"temperature": 4.0, "alpha": 0.9}},
    "train": {"epochs": 1, "batch_size": 256, "lr": 1.0e-3, "schedule": "constant"},
    "label": {"signal": "dense", "dtype": "fp16"},
}


def prepare() -> None:
    from darkknowledge.pipeline import label_recipe
    from darkknowledge.recipe_io import validate_recipe

    store = label_recipe(validate_recipe(RECIPE), CACHE / "store")
    print(json.dumps(store.info()["bytes"]))


def measure(mode: str, steps: int, threads: int) -> dict:
    """One fresh-process measurement with darkknowledge's own loop (`fit`)."""
    import torch

    torch.set_num_threads(threads)

    from darkknowledge.config import TrainConfig
    from darkknowledge.data import load_data
    from darkknowledge.losses import CE, HintonKD, LossStack
    from darkknowledge.pipeline import build_teacher, open_store_teacher, seeded_model
    from darkknowledge.recipe_io import validate_recipe
    from darkknowledge.train import fit

    recipe = validate_recipe(RECIPE)
    data = load_data(recipe.data)
    cfg = TrainConfig(**{**RECIPE["train"], "max_steps": steps, "epochs": 1})
    student = seeded_model(recipe.student.model, data.train.input_shape, 10, 0)
    if mode == "plain":
        teacher, loss = None, LossStack.of(CE())
    elif mode == "store":
        store_recipe = validate_recipe(
            {**RECIPE, "teacher": {"kind": "store", "path": str(CACHE / "store")}}
        )
        teacher, loss = open_store_teacher(store_recipe, data), LossStack.of(HintonKD(4.0, 0.9))
    else:
        teacher = build_teacher(recipe, data, CACHE / "store", resume=True)
        loss = LossStack.of(HintonKD(4.0, 0.9))
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(student, data.transfer, cfg, loss, teacher, None, None, desc=mode)
    # wall time, and the CPU time of this process: on shared cores the second is far less
    # disturbed by other jobs (time-slicing adds wall time, not this process's CPU time)
    return {"mode": mode, "steps": res.steps, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "threads": torch.get_num_threads()}  # fmt: skip


def export_for_peers() -> None:
    """Teacher weights and data as plain tensors the peer's environment can read."""
    import torch

    from darkknowledge.data import load_data
    from darkknowledge.pipeline import build_teacher
    from darkknowledge.recipe_io import validate_recipe

    recipe = validate_recipe(RECIPE)
    data = load_data(recipe.data)
    teacher = build_teacher(recipe, data, CACHE / "store", resume=True)
    torch.save(
        {
            "x": data.transfer.x,
            "y": data.transfer.y,
            "members": [m.state_dict() for m in teacher.modules()],
            "width": 32,
        },
        CACHE / "peer_inputs.pt",
    )


def run(steps: int, online_steps: int, rounds: int, peers: bool, threads: int, out: Path) -> None:
    modes = ["plain", "store", "online"] + (["td_plain", "td_online"] if peers else [])
    if peers and not (CACHE / "peer_inputs.pt").exists():
        export_for_peers()
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    # The online teacher costs ~20x a student step on these 2 cores, so online modes
    # run fewer steps; everything is compared per step (an epoch is 211 steps).
    n_steps = {m: online_steps if "online" in m else steps for m in modes}
    for r in range(rounds):
        for m in modes:
            if m.startswith("td_"):
                cmd = [str(PEER_PY), str(ROOT / "bench" / "kd_overhead_torchdistill.py"),
                       m[3:], "--steps", str(n_steps[m]), "--threads", str(threads)]  # fmt: skip
            else:
                cmd = [sys.executable, __file__, "measure", m, "--steps", str(n_steps[m]),
                       "--threads", str(threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            times[m].append(rec["wall_s"] / rec["steps"])
            if "cpu_s" in rec:
                cpu[m].append(rec["cpu_s"] / rec["steps"])
            print(f"round {r} {m}: {rec['wall_s']:.2f} s / {rec['steps']} steps", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    cmed = {m: statistics.median(v) for m, v in cpu.items() if v}
    result = {
        "setup": "Fashion-MNIST transfer set 54,000; teacher 3× small_cnn(width 32) prob_mean; "
        "student MLP 2×800; batch 256; Hinton KD T=4 α=0.9",
        "steps_per_measurement": n_steps,
        "torch_threads": threads,
        "rounds": rounds,
        "s_per_step": times,
        "median_s_per_step": med,
        "cpu_s_per_step": cpu,
        "median_cpu_s_per_step": cmed,
        # each round's store ÷ plain (adjacent fresh processes), then the median: robust
        # to load that drifts over the run, which shifts both of a round's measurements
        "paired_round_ratios": {
            "dk_store_over_plain": statistics.median(
                st / pl for st, pl in zip(times["store"], times["plain"], strict=True)
            ),
            "dk_store_over_plain_cpu": statistics.median(
                st / pl for st, pl in zip(cpu["store"], cpu["plain"], strict=True)
            ),
        },
        "cpu_ratios": {
            "dk_store_over_plain": cmed["store"] / cmed["plain"],
            "dk_online_over_plain": cmed["online"] / cmed["plain"],
        },
        "epoch_s_from_median": {m: 211 * v for m, v in med.items()},
        "ratios": {
            "dk_store_over_plain": med["store"] / med["plain"],
            "dk_online_over_plain": med["online"] / med["plain"],
            **(
                {
                    "td_online_over_plain": med["td_online"] / med["td_plain"],
                    "td_plain_over_dk_plain": med["td_plain"] / med["plain"],
                }
                if peers
                else {}
            ),
        },
        "command": " ".join(
            [
                "bench/kd_overhead.py",
                "run",
                "--steps",
                str(steps),
                "--online-steps",
                str(online_steps),
                "--rounds",
                str(rounds),
                "--threads",
                str(threads),
            ]
            + (["--peers"] if peers else [])
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    m = sub.add_parser("measure")
    m.add_argument("mode", choices=["plain", "store", "online"])
    m.add_argument("--steps", type=int, default=211)
    m.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=211)
    r.add_argument("--online-steps", type=int, default=40)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--peers", action="store_true")
    # 1 intra-op thread: on cores shared with other jobs, 2 OpenMP threads make every
    # small op wait at a barrier for a descheduled thread (see docs/results/store.md)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default=str(ROOT / "docs" / "results" / "kd_overhead.json"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare()
    elif a.cmd == "measure":
        print(json.dumps(measure(a.mode, a.steps, a.threads)))
    else:
        run(a.steps, a.online_steps, a.rounds, a.peers, a.threads, Path(a.out))


if __name__ == "__main__":
    main()
