"""Two processes on CPU (gloo) give the one-process result: `dk run` under
`accelerate launch`, `dk label` under torchrun, resume of a killed two-process run.

The recipe has jitter (drawn once per global batch, so it is exact across processes)
but no dropout: dropout masks come from a per-process RNG stream, so a recipe with
dropout matches a one-process run in distribution only (docs/distributed.md)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from darkknowledge.config import DigitsData, MLPConfig, TrainConfig
from darkknowledge.data import load_data
from darkknowledge.losses import CE, LossStack
from darkknowledge.pipeline import seeded_model
from darkknowledge.train import fit

RECIPE = {
    "data": {"name": "digits", "limit": 600},
    "teacher": {
        "kind": "module",
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    },
    "student": {"model": {"name": "mlp", "hidden": [24]}},
    "loss": {"hinton_kd": {"temperature": 3.0, "alpha": 0.7}},
    "train": {
        "epochs": 3,
        # 540 examples = 7 × 77 + 1: slices of 39 + 38 (micro-batches 20+19, 19+19), and
        # the last batch of an epoch leaves process 1 (and a micro-batch) empty
        "batch_size": 77,
        "lr": 0.01,
        "augment": "jitter",
        "jitter_px": 1,
        "schedule": "one_cycle",
        "seed": 3,
        "checkpoint_every": 10,
    },
    "eval": {"latency": False, "plain_baseline": False},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every run


def _free_port() -> int:
    # other jobs on the machine may hold torch's default 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dk(*args) -> list[str]:
    return [sys.executable, "-m", "darkknowledge.cli", *args]


def _accelerate(n: int, *args) -> list[str]:
    # --multi_gpu is accelerate's torchrun launcher; without GPUs it runs on CPU with gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", "darkknowledge.cli", *args]  # fmt: skip


def _torchrun(n: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(_free_port()), "-m", "darkknowledge.cli", *args]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _accuracy(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["rows"]["student"]["accuracy"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    _run(_dk("run", str(recipe), "--out", str(tmp / "one")))
    return recipe, tmp / "one"


def test_dk_run_two_processes_equals_one(one_process, tmp_path):
    recipe, one = one_process
    two = tmp_path / "two"
    # two processes, each splitting its slice into two micro-batches (gradient accumulation)
    res = _run(_accelerate(2, "run", str(recipe), "train.grad_accum=2", "--out", str(two)))
    for phase in ("teacher", "student"):
        d = _max_diff(one / phase / "model.safetensors", two / phase / "model.safetensors")
        assert d <= 1e-4, (phase, d)
    assert round(_accuracy(one), 3) == round(_accuracy(two), 3)
    assert res.stdout.count("report:") == 1  # process 0 alone prints and writes
    assert not (two / "student" / "checkpoint.pt").exists()
    logged = [json.loads(x) for x in (two / "student" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["step"] for r in ref]  # one writer, no duplicates
    # the logged loss is the global batch's mean loss, as in one process
    assert abs(logged[-1]["train_loss"] - ref[-1]["train_loss"]) < 1e-4


def test_dk_label_two_processes_byte_identical(one_process, tmp_path):
    recipe, one = one_process
    ov = [f"teacher.checkpoint={one / 'teacher' / 'model.safetensors'}",
          "label.shard_size=100", "label.signal=topk", "label.k=4"]  # fmt: skip
    _run(_dk("label", str(recipe), *ov, "--out", str(tmp_path / "s1")))
    res = _run(_torchrun(2, "label", str(recipe), *ov, "--out", str(tmp_path / "s2")))
    assert res.stdout.count("examples") == 1
    files = sorted(p.relative_to(tmp_path / "s1") for p in (tmp_path / "s1").rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) >= 4  # ≥ 2 per process
    assert files == sorted(p.relative_to(tmp_path / "s2") for p in (tmp_path / "s2").rglob("*"))
    for f in files:
        if (tmp_path / "s1" / f).is_file():
            assert (tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes(), f


@pytest.mark.slow
def test_two_process_error_is_one_line(one_process, tmp_path):
    recipe, one = one_process
    res = subprocess.run(_torchrun(2, "run", str(recipe), "--out", str(one)),
                         capture_output=True, text=True, timeout=900, env=ENV)  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.count("error:") == 1 and "--resume" in res.stderr
    # (torchrun itself prints a traceback of its own when a child fails; none of ours)
    assert not [x for x in res.stderr.splitlines() if 'File "' in x and "darkknowledge" in x]


def test_grad_accum_equals_one_batch():
    """Micro-batches of unequal size, weighted by their share of the batch: one update."""
    data = load_data(DigitsData(name="digits", limit=300))
    mlp = MLPConfig(name="mlp", hidden=[16])
    out = []
    for accum in (1, 3):
        # 270 = 4 × 67 + 2: the last batch splits into micro-batches of 1, 1 and 0
        cfg = TrainConfig(epochs=2, batch_size=67, lr=0.01, seed=1, grad_accum=accum)
        model = seeded_model(mlp, data.train.input_shape, data.train.num_classes, cfg.seed)
        out.append(fit(model, data.train, cfg, LossStack.of(CE())).model.state_dict())
    assert max(float((out[0][k] - out[1][k]).abs().max()) for k in out[0]) <= 1e-5


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun's workers run in their own session)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    os.kill(pid, signal.SIGKILL)
    for k in kids:
        _kill_tree(k)


def _kill_after(cmd: list[str], ckpt: Path) -> None:
    """Start ``cmd`` (a launcher), SIGKILL it and its workers once ``ckpt`` exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "run ended before it could be killed"
    _kill_tree(proc.pid)
    proc.wait()
    time.sleep(0.5)
    assert ckpt.exists()


def _kill_then_resume(launch, args: list[str], out: Path, ckpt: Path, done: Path) -> None:
    """``launch(*args)`` into ``out``, SIGKILLed once ``ckpt`` exists (before ``done``,
    a file of the finished run, is written), then the same command with ``--resume``."""
    _kill_after(launch(*args, "--out", str(out)), ckpt)
    assert not done.exists()
    _run(launch(*args, "--out", str(out), "--resume"))


def _one_resume(metrics: Path, processes: int = 2) -> None:
    """The log of a resumed run: one resume event, no duplicated steps after the cut."""
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["processes"] == processes and resumes[0]["step"] > 0
    steps = [e["step"] for e in events if "loss" in e]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_killed_two_process_run_resumes(one_process, tmp_path):
    """SIGKILL a two-process run after a checkpoint; resuming it (with two processes)
    gives the uninterrupted one-process weights."""
    recipe, one = one_process
    ov = [f"teacher.checkpoint={one / 'teacher' / 'model.safetensors'}", "train.epochs=25"]
    _run(_dk("run", str(recipe), *ov, "--out", str(tmp_path / "clean")))
    killed = tmp_path / "killed"
    ckpt = killed / "student" / "checkpoint.pt"
    done = killed / "student" / "model.safetensors"
    _kill_then_resume(partial(_torchrun, 2), ["run", str(recipe), *ov], killed, ckpt, done)
    _one_resume(killed / "student" / "metrics.jsonl")
    final = "student/model.safetensors"
    assert _max_diff(tmp_path / "clean" / final, killed / final) <= 1e-4
    assert round(_accuracy(tmp_path / "clean"), 3) == round(_accuracy(killed), 3)


@pytest.mark.slow
def test_fsdp_two_processes_equals_one(one_process, tmp_path):
    """FSDP2 (fully_shard) over 2 CPU processes: same student as one process."""
    recipe, one = one_process
    cmd = _accelerate(2, "run", str(recipe), "--out", str(tmp_path / "fsdp"))
    cmd.insert(cmd.index("--multi_gpu"), "--use_fsdp")
    cmd.remove("--multi_gpu")
    _run(cmd)
    final = "student/model.safetensors"
    assert _max_diff(one / final, tmp_path / "fsdp" / final) <= 1e-4
    assert round(_accuracy(one), 3) == round(_accuracy(tmp_path / "fsdp"), 3)
