"""Bad input: every category gets one line naming the key or file, a non-zero exit and
no traceback. Most cases run in-process (fast); a sample runs as real `dk` processes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

GOOD = {
    "data": {"name": "digits"},
    "teacher": {
        "kind": "ensemble",
        "members": [{"model": {"name": "mlp", "hidden": [16]}, "train": {"epochs": 1}}],
    },
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "loss": {"hinton_kd": {"temperature": 4.0, "alpha": 0.9}},
    "train": {"epochs": 1},
}


def with_(path: str, value):
    """GOOD with one key set (dotted path; numbers index lists); value DEL deletes."""
    import copy

    d = copy.deepcopy(GOOD)
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is DEL:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


DEL = object()

# (id, recipe as dict or raw text, overrides, text the message must contain)
CASES = [
    # unknown keys
    ("unknown-top", with_("optimiser", "adam"), [], "optimiser"),
    ("unknown-train", with_("train.epoch", 3), [], "train.epoch"),
    ("unknown-loss-term", with_("loss.hinton", {"temperature": 2}), [], "loss.hinton"),
    ("unknown-loss-param", with_("loss.hinton_kd.temp", 2), [], "loss.hinton_kd.temp"),
    ("unknown-model-param", with_("student.model.widths", [3]), [], "student.model.widths"),
    ("unknown-member-key", with_("teacher.members.0.ckpt", "x"), [], "teacher.members.0.ckpt"),
    ("unknown-data-key", with_("data.folder", "x"), [], "data.folder"),
    ("unknown-eval-key", with_("eval.latncy", True), [], "eval.latncy"),
    ("unknown-via-override", GOOD, ["train.lrate=0.1"], "train.lrate"),
    ("unknown-transfer-key", with_("data.transfer", {"omit": [3]}), [], "data.transfer.omit"),
    # wrong types
    ("type-epochs-str", with_("train.epochs", "many"), [], "train.epochs"),
    ("type-lr-list", with_("train.lr", [1, 2]), [], "train.lr"),
    ("type-hidden-str", with_("student.model.hidden", "big"), [], "student.model.hidden"),
    ("type-hidden-item", with_("student.model.hidden", [8, "x"]), [], "student.model.hidden.1"),
    ("type-members-dict", with_("teacher.members", {"a": 1}), [], "teacher.members"),
    ("type-loss-list", with_("loss", ["hinton_kd"]), [], "loss"),
    ("type-train-str", with_("train", "fast"), [], "train"),
    ("type-seed-float", with_("train.seed", 1.5), [], "train.seed"),
    ("type-plain-baseline", with_("eval.plain_baseline", "perhaps"), [], "eval.plain_baseline"),
    ("type-override-epochs", GOOD, ["train.epochs=[1,2]"], "train.epochs"),
    # out of range
    ("temp-zero", with_("loss.hinton_kd.temperature", 0), [], "loss.hinton_kd.temperature"),
    ("temp-negative", with_("loss.hinton_kd.temperature", -1), [], "loss.hinton_kd.temperature"),
    ("alpha-above-1", with_("loss.hinton_kd.alpha", 1.5), [], "loss.hinton_kd.alpha"),
    ("alpha-negative", with_("loss.hinton_kd.alpha", -0.1), [], "loss.hinton_kd.alpha"),
    ("alpha-override", GOOD, ["loss.hinton_kd.alpha=2"], "loss.hinton_kd.alpha"),
    ("temp-override", GOOD, ["loss.hinton_kd.temperature=-3"], "loss.hinton_kd.temperature"),
    ("jsd-beta", with_("loss", {"jsd": {"beta": 1.2}}), [], "loss.jsd.beta"),
    ("epochs-zero", with_("train.epochs", 0), [], "train.epochs"),
    ("lr-negative", with_("train.lr", -0.001), [], "train.lr"),
    ("batch-zero", with_("train.batch_size", 0), [], "train.batch_size"),
    ("dropout-one", with_("student.model.dropout", 1.0), [], "student.model.dropout"),
    ("val-fraction", with_("data.val_fraction", 1.0), [], "data.val_fraction"),
    ("jitter-px", with_("train.jitter_px", 40), [], "train.jitter_px"),
    ("weights-count", with_("teacher.weights", [1, 2]), [], "weights has 2 entries"),
    ("members-empty", with_("teacher.members", []), [], "teacher.members"),
    # missing or unreadable files / required keys
    ("missing-data-path", with_("data", {"name": "idx", "path": "no/such/dir"}), [], "data.path"),
    (
        "missing-checkpoint",
        with_("teacher.members.0.checkpoint", "nope.safetensors"),
        [],
        "teacher.members.0.checkpoint",
    ),
    ("missing-student", with_("student", DEL), [], "student"),
    ("missing-data", with_("data", DEL), [], "data"),
    ("missing-members", with_("teacher.members", DEL), [], "teacher.members"),
    ("missing-idx-path", with_("data", {"name": "idx"}), [], "data.path"),
    # malformed YAML and wrong top-level type
    ("yaml-indent", "data:\n  name: digits\n student: {}\n", [], "malformed YAML"),
    ("yaml-unclosed", "data: {name: digits\nstudent: x\n", [], "malformed YAML"),
    ("yaml-tab", "data:\n\tname: digits\n", [], "malformed YAML"),
    ("yaml-empty", "", [], "empty"),
    ("top-list", "- data\n- student\n", [], "top level must be a mapping"),
    ("top-scalar", "just a string\n", [], "top level must be a mapping"),
    ("top-number", "42\n", [], "top level must be a mapping"),
    # unknown registry names
    ("unknown-model", with_("student.model.name", "transformer9000"), [], "student.model"),
    (
        "unknown-teacher-model",
        with_("teacher.members.0.model.name", "vgg"),
        [],
        "teacher.members.0.model",
    ),
    ("unknown-teacher-kind", with_("teacher.kind", "api"), [], "teacher"),
    ("unknown-dataset", with_("data.name", "imagenet"), [], "data"),
    (
        "import-path-model",
        with_("student.model.name", "torchvision.models.resnet18"),
        [],
        "student.model",
    ),
    ("unknown-optimizer", with_("train.optimizer", "lamb"), [], "train.optimizer"),
    ("unknown-schedule", with_("train.schedule", "step"), [], "train.schedule"),
    ("unknown-combine", with_("teacher.combine", "vote"), [], "teacher.combine"),
    # bad override syntax
    ("override-no-equals", GOOD, ["train.epochs"], "train.epochs"),
    ("override-empty-key", GOOD, ["=3"], "override"),
    ("override-double-dot", GOOD, ["train..epochs=3"], "train..epochs"),
    ("override-bad-chars", GOOD, ["train.ep-ochs=3"], "train.ep-ochs"),
    ("override-list-index", GOOD, ["teacher.members.5.seed=1"], "teacher.members.5"),
    ("override-into-value", GOOD, ["train.epochs.x=1"], "train.epochs"),
    ("override-bad-yaml", GOOD, ["train.lr=[1,"], "train.lr"),
    # cross-field rules
    ("kd-without-teacher", with_("teacher", DEL), [], "need a teacher"),
    ("no-loss-term", with_("loss", {}), [], "loss"),
]


def _write(tmp_path: Path, recipe) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return p


def test_there_are_at_least_50_cases():
    assert len(CASES) >= 50
    assert len({c[0] for c in CASES}) == len(CASES)


def test_good_recipe_is_valid(tmp_path, capsys):
    assert main(["validate", "-q", str(_write(tmp_path, GOOD))]) == 0
    assert capsys.readouterr().out.strip() == "OK"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_named_key(case, tmp_path, capsys):
    _, recipe, overrides, needle = case
    path = _write(tmp_path, recipe)
    rc = main(["validate", str(path), *overrides])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["validate", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
        (["validate", "."], "is a folder"),
        (["run", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
        (["report", "no/such/run"], "no/such/run"),
    ],
)
def test_missing_files(args, needle, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_binary_recipe_file(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    assert main(["validate", str(p)]) != 0
    assert "not a text file" in capsys.readouterr().err


def test_corrupt_idx_data_names_the_file(tmp_path, capsys):
    d = tmp_path / "idx"
    d.mkdir()
    for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):  # fmt: skip
        (d / n).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    recipe = with_("data", {"name": "idx", "path": str(d)})
    rc = main(["run", str(_write(tmp_path, recipe)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0 and "train-images-idx3-ubyte" in err and "Traceback" not in err


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, capsys):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    recipe = with_("teacher.members.0.checkpoint", "../weights.safetensors")
    p = sub / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(p)]) == 0
    assert str(tmp_path / "weights.safetensors") in capsys.readouterr().out.replace(
        "recipes/../", ""
    )


@pytest.mark.parametrize("i", [0, 20, 42, 49, 57])
def test_real_process_exits_cleanly(i, tmp_path):
    """A sample of the cases as real `dk` processes: exit 2, one line, no traceback."""
    _, recipe, overrides, needle = CASES[i]
    path = _write(tmp_path, recipe)
    proc = subprocess.run(
        [sys.executable, "-m", "darkknowledge.cli", "validate", str(path), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
