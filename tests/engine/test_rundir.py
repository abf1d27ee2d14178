"""--force deletes only what this tool made, and only once the new run has a checkpoint."""

from __future__ import annotations

from pathlib import Path

import yaml

from darkknowledge.cli import main

RECIPE = {
    "data": {"name": "digits", "limit": 200},
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "train": {"steps": 6, "batch_size": 32, "checkpoint_every": 3},
    "eval": {"latency": False},
}


def _recipe(tmp: Path, **over) -> Path:
    f = tmp / "r.yaml"
    f.write_text(yaml.safe_dump(RECIPE | over))
    return f


def test_force_refuses_a_folder_this_tool_did_not_make(tmp_path: Path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    (out / "config.yaml").write_text("not ours either")
    assert main(["run", str(_recipe(tmp_path)), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a darkknowledge run folder" in err
    assert (out / "chapter1.tex").read_text() == "years of work"


def test_force_with_bad_input_puts_the_old_run_back(tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path)), "--out", str(out)]) == 0
    model = (out / "student" / "model.safetensors").read_bytes()
    empty = tmp_path / "empty_idx"
    empty.mkdir()  # exists (the recipe validates) but holds no IDX files
    bad = _recipe(tmp_path, data={"name": "idx", "path": str(empty)})
    capsys.readouterr()
    assert main(["run", str(bad), "--out", str(out), "--force"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (out / "student" / "model.safetensors").read_bytes() == model  # untouched
    assert not list(tmp_path.glob(".run.replaced*"))
    # a good replacement: the old run is gone once the new one has a checkpoint / ends
    assert (
        main(["run", str(_recipe(tmp_path, train={"steps": 4})), "--out", str(out), "--force"]) == 0
    )
    assert not list(tmp_path.glob(".run.replaced*"))
    assert "steps: 4" in (out / "config.yaml").read_text()


def test_force_replaces_a_run_made_before_the_marker(tmp_path: Path):
    out = tmp_path / "old"
    (out / "student").mkdir(parents=True)
    (out / "config.yaml").write_text("data: {name: digits}\n")
    (out / "report.json").write_text("{}")
    assert main(["run", str(_recipe(tmp_path)), "--out", str(out), "--force"]) == 0
    assert (out / "run.json").exists() and (out / "student" / "model.safetensors").exists()


def test_force_never_moves_the_working_folder_aside(tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path)), "--out", str(out)]) == 0
    (out / "student" / "sub").mkdir()
    for here, arg in ((out, "."), (out / "student" / "sub", str(out))):
        monkeypatch.chdir(here)
        capsys.readouterr()
        assert main(["run", str(_recipe(tmp_path)), "--out", arg, "--force"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the folder you are working in" in err, err
        assert (out / "run.json").exists() and not list(tmp_path.glob(".run.replaced*"))
