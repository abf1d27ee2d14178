"""`dk label` and `dk store info` as a user runs them: recipes, SIGKILL mid-labelling,
training from a store, and one-line refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from darkknowledge.cli import main
from darkknowledge.store import open_store


def _dk(*args) -> list[str]:
    return [sys.executable, "-m", "darkknowledge.cli", *args]


def label_recipe(mnist: Path) -> dict:
    # A real teacher (a CNN trained for a few steps inside `dk label`) over 5,400 MNIST
    # images in 54 shards: slow enough to be killed part-way, fast enough for CI.
    return {
        "data": {"name": "idx", "path": str(mnist), "limit": 6000},
        "teacher": {
            "kind": "module",
            "model": {"name": "small_cnn", "width": 32},
            "train": {"max_steps": 3, "batch_size": 64},
        },
        "student": {"model": {"name": "mlp", "hidden": [32]}},
        "label": {"signal": "topk", "k": 4, "shard_size": 100, "batch_size": 50},
    }


def _kill_after(recipe: Path, out: Path, shards: int) -> int:
    """Start `dk label`, SIGKILL it once ``shards`` shards exist; return how many did."""
    folder = out / "shards"
    proc = subprocess.Popen(_dk("label", str(recipe), "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if folder.exists() and len(list(folder.glob("*.safetensors"))) >= shards:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "labelling ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(folder.glob("*.safetensors")))


def test_sigkill_twice_then_rerun_is_byte_identical(tmp_path, mnist_dir):
    recipe = tmp_path / "label.yaml"
    recipe.write_text(yaml.safe_dump(label_recipe(mnist_dir)))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    first = _kill_after(recipe, killed, 3)
    second = _kill_after(recipe, killed, first + 15)
    assert 3 <= first < second < 54
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    res = subprocess.run(_dk("label", str(recipe), "--out", str(killed)),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = subprocess.run(_dk("label", str(recipe), "--out", str(clean)),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr

    def files(root: Path) -> dict[str, bytes]:
        paths = [root / "manifest.json", *sorted((root / "shards").iterdir())]
        return {p.name: p.read_bytes() for p in paths}

    a, b = files(killed), files(clean)
    assert list(a) == list(b) and len(a) == 55  # manifest + 54 shards, no leftovers
    assert a == b
    store = open_store(killed)
    ids = store.ids
    assert len(ids) == 5400 and len(set(ids.tolist())) == 5400  # every example exactly once


def test_label_train_from_store_and_refusals(tmp_path, capsys):
    teacher = {"kind": "module", "model": {"name": "mlp", "hidden": [32]},
               "train": {"epochs": 3, "batch_size": 64}}  # fmt: skip
    base = {
        "data": {"name": "digits"},
        "student": {"model": {"name": "mlp", "hidden": [24]}},
        "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}},
        "train": {"epochs": 3, "batch_size": 32},
        "eval": {"latency": False},
    }
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump(base | {"teacher": teacher, "label": {"signal": "topk", "k": 3, "temperature": 2.0}}))  # fmt: skip
    store = tmp_path / "store"
    assert main(["label", str(lab), "--out", str(store)]) == 0
    assert "top-3 + tail at temperature 2" in capsys.readouterr().out
    assert main(["store", "info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["examples"] == 1132 and info["bytes"] > 0 and info["bytes_per_example"] > 0

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(base | {"teacher": {"kind": "store", "path": str(store)}}))
    assert main(["run", str(run), "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(rep["rows"]) == {"student"} and rep["rows"]["student"]["accuracy"] > 0.5
    capsys.readouterr()

    cases = [
        (["run", str(run), "train.augment=jitter"], "cannot be used with a teacher store"),
        (["run", str(run), "train.augment=hflip"], "cannot be used with a teacher store"),
        (["run", str(run), "loss.hinton_kd.temperature=4"], "field 'temperature' differs"),
        (["run", str(run), "data.limit=900"], "field 'data' differs"),
        (["run", str(run), "data.name=digits", "data.split_seed=3"], "field 'data' differs"),
        (["run", str(run), "teacher.expect.teacher=abc"], "field 'teacher' differs"),
        (["run", str(run), "teacher.path=nowhere"], "path does not exist"),
        (["label", str(lab), "label.k=3", "label.dtype=fp32", "--out", str(store)], "'dtype' differs"),
        (["label", str(lab), "label.signal=topk", "label.k=10", "--out", str(tmp_path / "x")], "label.k=10"),
        (["label", str(run)], "already trains from a store"),
        (["store", "info", str(tmp_path)], "not a signal store"),
        (["store", "info", str(tmp_path / "nope")], "no such store folder"),
    ]  # fmt: skip
    elsewhere = ["--out", str(tmp_path / "r2"), "--force"]
    for argv, msg in cases:
        # -q: label.k is checked against the teacher once it is trained, after the
        # teacher's progress lines; the refusal itself is the one line left
        assert main([*argv, "-q", *(elsewhere if argv[0] == "run" else [])]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)


def test_label_into_a_store_of_another_teacher_or_data_is_refused(tmp_path, capsys):
    """`dk label` reuses `teacher/` and a finished store only for the same recipe teacher
    and data sections; anything else is refused naming the key (as `dk run --resume`)."""
    recipe = {
        "data": {"name": "digits"},
        "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [16]},
                    "train": {"max_steps": 3, "batch_size": 64}},
        "student": {"model": {"name": "mlp", "hidden": [16]}},
        "label": {"shard_size": 400},
    }  # fmt: skip
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "store"
    assert main(["label", str(lab), "--out", str(out)]) == 0
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in [out / "manifest.json", *(out / "shards").iterdir()]}
    teacher_fp = json.loads((out / "manifest.json").read_text())["fingerprint"]["teacher"]

    cases = [
        (["teacher.seed=1"], "teacher.seed differs"),
        (["teacher.train.max_steps=6"], "teacher.train.steps differs"),
        (["teacher.train.epochs=2"], "teacher.train.epochs differs"),
        (["teacher.model.hidden=[24]"], "teacher.model.hidden differs"),
        (["data.split_seed=3"], "data.split_seed differs"),
    ]
    for over, msg in cases:
        assert main(["label", str(lab), "--out", str(out), *over]) == 2, over
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was made from a different recipe" in err, err
        assert msg in err, (over, err)
    # the same recipe: the finished store is returned as it is
    assert main(["label", str(lab), "--out", str(out)]) == 0
    again = {p.name: p.read_bytes() for p in [out / "manifest.json", *(out / "shards").iterdir()]}
    assert again == first

    # killed while the teacher trained (no manifest yet): its folder is not reused either
    shutil.rmtree(out / "shards")
    (out / "manifest.json").unlink()
    assert main(["label", str(lab), "--out", str(out), "teacher.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "its trained teacher was made from a different recipe: teacher.seed differs" in err

    # --force relabels with the new teacher, trained again
    assert main(["label", str(lab), "--out", str(out), "teacher.seed=1", "--force"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["fingerprint"]["teacher"] != teacher_fp and m["recipe"]["teacher"]["seed"] == 1
    assert main(["label", str(lab), "--out", str(out), "teacher.seed=1"]) == 0
    capsys.readouterr()
    assert main(["label", str(lab), "--out", str(out)]) == 2
    assert "teacher.seed differs" in capsys.readouterr().err
