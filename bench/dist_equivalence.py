"""One process vs two (CPU, gloo): how close the students are, and whether the stores
are the same bytes. Writes docs/results/distributed_cpu.json.

    .venv/bin/python bench/dist_equivalence.py

Each run is a fresh `dk` command line: `dk run` alone, under `accelerate launch
--multi_gpu --num_processes 2` (DDP, train.grad_accum=2: 2 processes × 2 micro-batches),
under `accelerate launch --use_fsdp --num_processes 2` (FSDP2), and `dk label` alone
and under `torchrun --nproc_per_node 2`. The recipe is the one of
tests/test_distributed.py with more epochs (digits, 600 examples, jitter, no dropout).
Wall times are on a shared 2-core machine and only say that it ran: two processes on
two busy cores are not expected to be faster than one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".cache" / "dist_equivalence"
OUT = ROOT / "docs" / "results" / "distributed_cpu.json"
sys.path.insert(0, str(ROOT / "tests"))
from test_distributed import RECIPE  # noqa: E402

RECIPE = {**RECIPE, "train": {**RECIPE["train"], "epochs": 10}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(kind: str) -> list[str]:
    py = [sys.executable, "-m"]
    if kind == "one":
        return [*py, "darkknowledge.cli"]
    if kind == "torchrun2":
        return [*py, "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                _port(), "-m", "darkknowledge.cli"]  # fmt: skip
    mode = "--multi_gpu" if kind == "ddp2" else "--use_fsdp"
    return [*py, "accelerate.commands.launch", mode, "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", _port(), "-m", "darkknowledge.cli"]  # fmt: skip


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def _diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _acc(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["rows"]["student"]["accuracy"]


def main() -> None:
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    recipe = WORK / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out: dict = {"recipe": RECIPE, "runs": {}}
    runs = {
        "one": ("one", []),
        "ddp2_accum2": ("ddp2", ["train.grad_accum=2"]),
        "fsdp2": ("fsdp2", []),
    }
    for name, (kind, ov) in runs.items():
        cmd = [*_launch(kind), "run", str(recipe), *ov, "--out", str(WORK / name)]
        wall = _run(cmd)
        rec = {"command": " ".join(cmd[2:]).replace(str(WORK), "$WORK"), "wall_s": wall}
        rec["test_accuracy"] = _acc(WORK / name)
        if name != "one":
            for phase in ("teacher", "student"):
                f = f"{phase}/model.safetensors"
                rec[f"max_abs_diff_{phase}"] = _diff(WORK / "one" / f, WORK / name / f)
        out["runs"][name] = rec
        print(name, rec)
    teacher = WORK / "one" / "teacher" / "model.safetensors"
    ov = [f"teacher.checkpoint={teacher}", "label.shard_size=100", "label.signal=topk"]
    ov += ["label.k=4"]
    stores = {}
    for name, kind in (("label_one", "one"), ("label_torchrun2", "torchrun2")):
        cmd = [*_launch(kind), "label", str(recipe), *ov, "--out", str(WORK / name)]
        stores[name] = {
            "command": " ".join(cmd[2:]).replace(str(WORK), "$WORK"),
            "wall_s": _run(cmd),
        }
    a, b = WORK / "label_one", WORK / "label_torchrun2"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    same = all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    same = same and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    out["label"] = stores | {"files": len(files), "byte_identical": same}
    print(out["label"])
    OUT.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
