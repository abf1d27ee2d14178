"""dk export: an image student as torch.export (.pt2) and ONNX files that reproduce the
PyTorch model's logits, with input shape, preprocessing and class names beside them;
dk --version and python -m darkknowledge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from darkknowledge.cli import main
from darkknowledge.config import ModelConfig
from darkknowledge.export import load_model, save_model
from darkknowledge.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A classify run folder as dk run leaves it: config.yaml and student/ (a small CNN
    with batch norm, its running statistics not the initial ones)."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text("name: t\ndata: {name: digits, test_fraction: 0.3}\n")
    cfg = TypeAdapter(ModelConfig).validate_python({"name": "small_cnn", "width": 8})
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8), 10)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8) * 3)  # move the batch-norm statistics off 0/1
    save_model(model.eval(), cfg, (1, 8, 8), 10, run / "student")
    return run


def _x() -> torch.Tensor:
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # batch ≠ 2


def test_torch_export_file_reproduces_the_student(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "torch.export"]) == 0
    pt2 = run_dir / "export" / "student.pt2"
    assert str(pt2) in capsys.readouterr().out
    ref = load_model(run_dir / "student")
    got = torch.export.load(str(pt2)).module()(_x())
    with torch.no_grad():
        want = ref(_x())
    assert got.shape == (5, 10) and torch.allclose(got, want, atol=1e-5, rtol=0)
    meta = json.loads((run_dir / "export" / "student.pt2.json").read_text())
    assert meta["file"] == "student.pt2" and meta["input"]["shape"] == ["batch", 1, 8, 8]
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["preprocessing"]["scale"] == 1 / 16 and meta["preprocessing"]["std"] == [1.0]


def test_onnx_file_reproduces_the_student_in_onnxruntime(run_dir, tmp_path):
    import onnxruntime as ort  # the export extra: missing fails, never skips
    import onnxscript  # noqa: F401

    out = tmp_path / "onnx"
    args = ["export", str(run_dir / "student"), "--format", "onnx", "--out", str(out)]
    assert main([*args, "--class-names", ",".join("abcdefghij")]) == 0
    sess = ort.InferenceSession(str(out / "student.onnx"))
    (got,) = sess.run(None, {"pixels": _x().numpy()})
    with torch.no_grad():
        want = load_model(run_dir / "student")(_x())
    assert got.shape == (5, 10) and torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=0)
    meta = json.loads((out / "student.onnx.json").read_text())
    assert meta["class_names"] == list("abcdefghij") and meta["exported_as"] == "onnx"


def test_bad_export_arguments_are_one_line(run_dir, capsys):
    assert main(["export", str(run_dir), "--class-names", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "2 names but the model has 10 classes" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_export_refuses_text_runs_and_missing_folders(tmp_path, capsys):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "run.json").write_text('{"family": "causal_lm"}')
    assert main(["export", str(tmp_path / "lm")]) == 2
    assert "transformers folders" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_version_and_python_dash_m(capsys):
    from darkknowledge import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"darkknowledge {__version__}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "darkknowledge", "validate", "-q",
         str(ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr
