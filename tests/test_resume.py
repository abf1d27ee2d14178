"""Kill a run with SIGKILL after a checkpoint, resume it, and get the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# Dropout and jitter make the run depend on both RNG streams; the teacher is trained
# inside the run, so resuming also has to skip the finished teacher phase.
RECIPE = {
    "data": {"name": "digits"},
    "teacher": {
        "kind": "module",
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 64},
    },
    "student": {"model": {"name": "mlp", "hidden": [24], "dropout": 0.2}},
    "loss": {"hinton_kd": {"temperature": 3.0, "alpha": 0.7}},
    "train": {
        "epochs": 40,
        "batch_size": 16,
        "augment": "jitter",
        "jitter_px": 1,
        "schedule": "one_cycle",
        "checkpoint_every": 25,
        "seed": 3,
    },
    "eval": {"latency": False},
}


def _dk(*args) -> list[str]:
    return [sys.executable, "-m", "darkknowledge.cli", *args]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    ckpt = killed / "student" / "checkpoint.pt"
    final = killed / "student" / "model.safetensors"

    proc = subprocess.Popen(_dk("run", str(recipe), "--out", str(killed)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # let it train past the checkpoint
    assert proc.poll() is None, "run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not final.exists()

    res = subprocess.run(_dk("run", str(recipe), "--out", str(killed), "--resume"),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    events = [
        json.loads(x) for x in (killed / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] > 0
    # the log has no duplicated steps after the cut
    steps = [e["step"] for e in events if "loss" in e]
    assert steps == sorted(set(steps))

    res = subprocess.run(_dk("run", str(recipe), "--out", str(clean)),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr
    a = load_file(str(final))
    b = load_file(str(clean / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((killed / "report.json").read_text())["rows"]["student"]["accuracy"]
    rb = json.loads((clean / "report.json").read_text())["rows"]["student"]["accuracy"]
    assert ra == rb


def test_existing_run_dir_needs_resume_or_force(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    small = dict(RECIPE, train={"epochs": 1, "batch_size": 256})
    recipe.write_text(yaml.safe_dump(small))
    out = tmp_path / "run"
    assert (
        subprocess.run(_dk("run", str(recipe), "--out", str(out)), capture_output=True).returncode
        == 0
    )
    again = subprocess.run(
        _dk("run", str(recipe), "--out", str(out)), capture_output=True, text=True
    )
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    # resuming a finished run recomputes nothing and succeeds
    assert subprocess.run(_dk("run", str(recipe), "--out", str(out), "--resume"),
                          capture_output=True).returncode == 0  # fmt: skip
    # resuming with a different recipe is refused, naming the key
    diff = subprocess.run(_dk("run", str(recipe), "train.lr=0.5", "--out", str(out), "--resume"),
                          capture_output=True, text=True)  # fmt: skip
    assert diff.returncode == 2 and "train.lr" in diff.stderr
