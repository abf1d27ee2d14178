"""End to end: a recipe run writes everything a user reads; the Python API; the demo."""

import json

import torch

import darkknowledge as dk
from darkknowledge.cli import main
from darkknowledge.data import load_digits_split, split_train_val
from darkknowledge.evaluate import predict_logits
from darkknowledge.models import MLP
from darkknowledge.recipe_io import validate_recipe

TINY = {
    "data": {"name": "digits"},
    "teacher": {
        "kind": "ensemble",
        "combine": "prob_mean",
        "members": [
            {"model": {"name": "small_cnn", "width": 4}, "train": {"epochs": 2}, "seed": 0},
            {"model": {"name": "mlp", "hidden": [32]}, "train": {"epochs": 3}, "seed": 1},
        ],
    },
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}},
    "train": {"epochs": 3, "batch_size": 64},
    "eval": {"plain_baseline": True, "latency_runs": 5},
}


def test_run_dir_holds_everything(tmp_path, capsys):
    out = tmp_path / "run"
    res = dk.run_recipe(validate_recipe(TINY), out)
    for name in ["config.yaml", "report.json", "report.md", "accuracy_vs_size.png",
                 "reliability.png", "student/model.safetensors", "student/model.json",
                 "student/metrics.jsonl", "plain/model.safetensors",
                 "teacher/member_0/model.safetensors", "teacher/member_1/model.safetensors"]:  # fmt: skip
        assert (out / name).exists(), name
    assert not (out / "student" / "checkpoint.pt").exists()
    rows = res.report["rows"]
    assert set(rows) == {"teacher", "plain", "student"}
    for r in rows.values():
        for k in ["accuracy", "errors", "nll", "ece", "params", "bytes", "latency_ms_b1",
                  "throughput_b256", "speedup_vs_teacher"]:  # fmt: skip
            assert k in r, k
        assert r["errors"] == round((1 - r["accuracy"]) * r["n"])
    assert rows["student"]["params"] < rows["teacher"]["params"]
    assert 0.0 <= rows["student"]["teacher_agreement"] <= 1.0
    # the exported student reloads and gives the recorded accuracy
    student = dk.load_model(out / "student")
    _, test = load_digits_split()
    acc = float((predict_logits(student, test).argmax(-1) == test.y).float().mean())
    assert acc == rows["student"]["accuracy"]
    # metrics.jsonl has per-epoch validation lines
    lines = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "val_acc" in x] == [1, 2, 3]
    # dk report re-renders and prints the table
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "student" in capsys.readouterr().out and (out / "report.md").exists()


def test_plain_recipe_without_teacher(tmp_path):
    recipe = validate_recipe({"data": {"name": "digits"}, "student": {"model": {"name": "mlp", "hidden": [32]}},
                              "train": {"epochs": 5, "batch_size": 32, "lr": 3e-3}, "eval": {"latency": False}})  # fmt: skip
    res = dk.run_recipe(recipe, tmp_path / "plain")
    assert set(res.report["rows"]) == {"model"}
    assert res.report["rows"]["model"]["accuracy"] > 0.85


def test_python_api_distill():
    train, test = load_digits_split()
    train, val = split_train_val(train, 0.1, 0)
    torch.manual_seed(0)
    teacher = MLP(train.input_shape, 10, hidden=[64])
    dk.distill(None, teacher, train, val, epochs=5, batch_size=32, lr=3e-3)
    student = MLP(train.input_shape, 10, hidden=[16])
    res = dk.distill(teacher, student, train, val, test_set=test,
                     loss=dk.losses.HintonKD(temperature=4.0, alpha=0.9), epochs=5, batch_size=32, lr=3e-3)  # fmt: skip
    assert res.report.rows["student"]["accuracy"] > 0.8
    assert "teacher" in res.report.table() and len(res.history) == 5


def test_demo_distilled_beats_plain_by_two_pooled_sd(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` uses
    assert main(["demo", "--out", "demo"]) == 0
    out = capsys.readouterr().out
    assert "distilled student" in out and "plain student" in out
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["seeds"] == [0, 1, 2]
    assert s["gain_points"] > 2 * s["pooled_sd"], s
    assert (tmp_path / "demo" / "report.md").exists()


def test_seeds_from_a_store(tmp_path):
    """`dk run --seeds` with a store teacher: every seed reads the same store (seed 0 used
    to be fine and seed 1 failed looking for ensemble members to reuse)."""
    import yaml

    from darkknowledge.pipeline import label_recipe, run_seeds

    tiny = {**TINY, "eval": {"latency": False}, "train": {"epochs": 2, "batch_size": 64}}
    label_recipe(validate_recipe(tiny), tmp_path / "store")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny))
    store = f"teacher={{kind: store, path: '{tmp_path / 'store'}'}}"
    s = run_seeds(recipe, [store], [0, 1], tmp_path / "runs")
    assert s["seeds"] == [0, 1] and set(s["rows"]) == {"student"}
    a, b = (
        json.loads((tmp_path / "runs" / f"seed_{i}" / "report.json").read_text()) for i in (0, 1)
    )
    assert a["rows"]["student"]["errors"] == s["rows"]["student"]["errors"][0]
    assert s["rows"]["student"]["errors"] == [
        a["rows"]["student"]["errors"],
        b["rows"]["student"]["errors"],
    ]


def test_seed_list_spreads_a_study_over_processes(tmp_path, capsys):
    """`--seeds 1,` runs seed 1 alone (another process can run seed 0 at the same time);
    `--seeds 0,1 --resume` then runs only what is missing and sums up both seeds."""
    import yaml

    from darkknowledge.pipeline import label_recipe

    tiny = {**TINY, "eval": {"latency": False}, "train": {"epochs": 1, "batch_size": 64}}
    label_recipe(validate_recipe(tiny), tmp_path / "store")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny))
    store = f"teacher={{kind: store, path: '{tmp_path / 'store'}'}}"
    out = tmp_path / "runs"
    args = ["run", str(recipe), store, "--out", str(out)]
    assert main([*args, "--seeds", "1,"]) == 0
    assert not (out / "seed_0").exists()
    s1 = (out / "seed_1" / "report.json").read_text()
    assert main([*args, "--seeds", "0,1", "--resume"]) == 0
    assert (out / "seed_1" / "report.json").read_text() == s1  # finished: not rerun
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [0, 1]
    assert s["rows"]["student"]["errors"][1] == json.loads(s1)["rows"]["student"]["errors"]
    capsys.readouterr()
    for bad in ("0", "x", "1,x", "1,1", "1,-2", "²", "1,²"):
        assert main([*args, "--seeds", bad]) != 0, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --seeds"), (bad, err)


def test_store_of_an_augmented_transfer_set(tmp_path):
    """Augmented copies of the transfer set are labelled once into a store; a student
    distils from it, and the plain baseline trains on the same images for as many steps."""
    from darkknowledge.pipeline import label_recipe, run_recipe

    tiny = {
        **TINY,
        "data": {"name": "digits", "transfer": {"augment": "jitter", "copies": 1}},
        "eval": {"latency": False, "plain_baseline": True},
        "train": {"epochs": 1, "batch_size": 64},
    }
    store = label_recipe(validate_recipe(tiny), tmp_path / "store")
    rep = run_recipe(
        validate_recipe({**tiny, "teacher": {"kind": "store", "path": str(tmp_path / "store")}}),
        tmp_path / "run",
    ).report
    n_train = rep["sizes"]["train"]
    assert rep["sizes"]["transfer"] == len(store) == 2 * n_train
    rows = rep["rows"]
    assert rows["student"]["train"]["steps"] == rows["plain"]["train"]["steps"]
    assert rows["student"]["train"]["steps"] == -(-2 * n_train // 64)
