"""What `dk` says while it works: progress lines off a terminal (step/total, loss, rate,
ETA, and one at each evaluation), -q and -v, train.report_to trackers, --help defaults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

TINY = {  # digits, one-epoch teacher and student: 9 steps each
    "data": {"name": "digits"},
    "teacher": {
        "kind": "ensemble",
        "members": [{"model": {"name": "mlp", "hidden": [16]}, "train": {"epochs": 1}}],
    },
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "loss": {"hinton_kd": {"temperature": 4.0, "alpha": 0.9}},
    "train": {"epochs": 1},
    "eval": {"latency": False},
}
STEP = re.compile(r"^\[\d\d:\d\d:\d\d\] distil: step (\d+)/9, loss [\d.]+, .*steps/s, ETA \S+$")


@pytest.fixture
def recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


@pytest.fixture
def every_step(monkeypatch):
    monkeypatch.setenv("DK_PROGRESS_EVERY_S", "0")


def test_run_prints_step_lines_with_eta_to_a_file(recipe, tmp_path):
    """`dk run` with stderr a file (not a terminal): a step line per step here
    (DK_PROGRESS_EVERY_S=0) with loss, rate and ETA, and one line per evaluation."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "darkknowledge.cli", "run", str(recipe), "--out",
             str(tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=f, text=True, timeout=120,
            env=os.environ | {"DK_PROGRESS_EVERY_S": "0"},
        )  # fmt: skip
    assert proc.returncode == 0
    assert "report:" in proc.stdout and "student" in proc.stdout
    lines = err.read_text().splitlines()
    steps = [int(m.group(1)) for line in lines if (m := STEP.match(line))]
    assert steps == list(range(1, 10)), lines
    evals = [line for line in lines if "val_acc" in line]
    assert len(evals) == 2  # the teacher member's and the student's
    assert all("train_loss" in e and "ETA 0s" in e for e in evals)
    assert any(line.startswith("[") and "teacher member_0: step 9/9" in line for line in lines)


def test_quiet_prints_only_the_result_and_errors(recipe, tmp_path, every_step, capsys):
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "report:" in out
    # after the subcommand, among the overrides
    assert main(["run", str(recipe), "-q", "train.seed=1", "--out", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "report:" in out
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]["seed"] == 1
    assert main(["-q", "run", str(tmp_path / "none.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ")


def test_verbose_shows_debug_lines(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), "-v", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"debug darkknowledge\.engine\.loop: distil: steps 0-9", err), err


def test_report_to_tensorboard_mirrors_metrics(recipe, tmp_path, capsys):
    import tensorboard  # noqa: F401  (the `track` extra: a missing one fails, never skips)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    # the teacher member trains by its own train: section, which gets its own report_to
    args = ["run", str(recipe), "--out", str(run), "train.report_to=[tensorboard]",
            "teacher.members.0.train.report_to=tensorboard"]  # fmt: skip
    assert main([*args, "train.log_every=2"]) == 0
    metrics = [json.loads(x) for x in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(run / "student" / "tb"))
    ea.Reload()
    tb = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    want: dict[str, dict[int, float]] = {}
    for rec in metrics:
        for k, v in rec.items():
            if k != "step":
                want.setdefault(k, {})[rec["step"]] = v
    assert set(want) <= set(tb) and {"loss", "val_acc", "train_loss", "lr"} <= set(want)
    assert sorted(want["loss"]) == [2, 4, 6, 8, 9]
    for k, series in want.items():
        assert tb[k] == pytest.approx(series, rel=1e-6), k
    assert list((run / "teacher" / "member_0" / "tb").glob("events.out.tfevents.*"))


def test_report_to_wandb_calls_its_api(recipe, tmp_path, monkeypatch, capsys):
    """wandb through a stand-in module (the real one is not a dependency): one run per
    model, every metrics line's numbers logged at its step, finished at the end."""
    import importlib.machinery
    import types

    runs = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: Run(**kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "r"
    assert main(["run", str(recipe), "--out", str(run), "train.report_to=wandb"]) == 0
    (student,) = runs  # the teacher member's train: section has no report_to
    assert student.finished and student.kw["name"] == "r/student"
    assert student.kw["dir"] == str(run / "student")
    lines = [json.loads(x) for x in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in student.logged] == [rec["step"] for rec in lines]
    assert student.logged[-1][1]["val_acc"] == pytest.approx(lines[-1]["val_acc"])


def test_unavailable_tracker_is_one_line(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    run = tmp_path / "r"
    assert main(["run", str(recipe), "--out", str(run), "train.report_to=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.report_to" in err and "pip install wandb" in err
    assert not run.exists()


def test_label_prints_progress_lines(recipe, tmp_path, every_step, capsys):
    data = yaml.safe_load(recipe.read_text()) | {"label": {"shard_size": 500}}
    recipe.write_text(yaml.safe_dump(data))
    assert main(["label", str(recipe), "--out", str(tmp_path / "store")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "label store: example" in x]
    assert len(lines) == 3 and "example 1132/1132" in lines[-1], lines  # the train split
    assert all(re.search(r"examples/s, ETA \S+$", x) for x in lines)


def test_bad_progress_interval_is_one_line(recipe, monkeypatch, capsys):
    monkeypatch.setenv("DK_PROGRESS_EVERY_S", "soon")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DK_PROGRESS_EVERY_S=soon" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0)" in out  # --seed: no help text of its own
    assert "(default gsm8k)" in out and "(default: gsm8k)" not in out  # said once
    assert "-q, --quiet" in out and "-v, --verbose" in out
    with pytest.raises(SystemExit):
        main(["serve-teacher", "--help"])
    assert "(default: 8001)" in capsys.readouterr().out
