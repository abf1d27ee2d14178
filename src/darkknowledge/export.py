"""Save a trained network as safetensors plus a JSON description, and load it back."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DKError

FORMAT = "darkknowledge.model/v1"


def save_model(
    model: nn.Module,
    model_cfg,
    input_shape,
    num_classes: int,
    folder: str | Path,
    name: str = "model",
) -> Path:
    """Write ``<name>.safetensors`` (weights) and ``<name>.json`` (how to rebuild it)
    into ``folder``, each atomically. Returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "model": model_cfg.model_dump(mode="json"),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    _atomic_json(folder / f"{name}.json", meta)
    weights = folder / f"{name}.safetensors"
    tmp = weights.with_suffix(".tmp")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, weights)
    return weights


def load_weights(model: nn.Module, path: str | Path, what: str = "checkpoint") -> nn.Module:
    """Load safetensors weights into ``model``, with a clear error on any mismatch."""
    path = Path(path)
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise DKError(f"{what}: {path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise DKError(
            f"{what}: {path} does not fit the configured model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): check the model section"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise DKError(
                f"{what}: {path}: tensor {k} has shape {tuple(v.shape)} but the configured "
                f"model needs {tuple(own[k].shape)}: check the model section"
            )
        if v.dtype.is_floating_point != own[k].dtype.is_floating_point:
            raise DKError(
                f"{what}: {path}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, the "
                f"model's is {str(own[k].dtype).removeprefix('torch.')}: not this model's weights"
            )
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            raise DKError(
                f"{what}: {path}: tensor {k} holds NaN or infinite values; a model trained "
                "into NaN cannot teach (retrain it, or use an earlier checkpoint)"
            )
    model.load_state_dict(sd)
    return model


def load_model(folder: str | Path, name: str = "model") -> nn.Module:
    """Rebuild a network saved by :func:`save_model` (e.g. a run's ``student/``)."""
    from pydantic import TypeAdapter

    from .config import ModelConfig
    from .registry import build_model

    folder = Path(folder)
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DKError(f"{folder / (name + '.json')}: cannot read model description ({e})") from None
    cfg = TypeAdapter(ModelConfig).validate_python(meta["model"])
    model = build_model(cfg, tuple(meta["input_shape"]), int(meta["num_classes"]))
    return load_weights(model, folder / f"{name}.safetensors").eval()


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------- dk export

EXPORT_FORMATS = ("torch.export", "onnx")
EXPORT_FORMAT = "darkknowledge.export/v1"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip


def _student_folder(path: Path) -> tuple[Path, Path | None]:
    """(folder holding model.json + model.safetensors, the run folder or None)."""
    if (path / "model.json").exists():
        run = path.parent if (path.parent / "config.yaml").exists() else None
        return path, run
    if (path / "student" / "model.json").exists():
        return path / "student", path
    fam = None
    if (path / "run.json").exists():
        try:
            fam = json.loads((path / "run.json").read_text()).get("family")
        except (OSError, json.JSONDecodeError, AttributeError):
            fam = None
    if fam in ("text", "causal_lm"):
        raise DKError(
            f"{path}: a {fam} run; its students are saved as transformers folders "
            "(save_pretrained + tokenizer, loadable as they are); dk export takes image "
            "(classify) students"
        )
    seeds = sorted(p.name for p in path.glob("seed_*") if (p / "student").is_dir())
    if seeds:
        raise DKError(
            f"{path}: a run of several seeds; export one of them, e.g. dk export {path / seeds[0]}"
        )
    if not path.is_dir():
        raise DKError(f"{path}: no such run directory")
    raise DKError(f"{path}: no student (student/model.json) in this folder")


def _preprocessing(run: Path | None, num_classes: int) -> tuple[dict, list[str]]:
    """How raw images become the model's input, and the class names, from the run's
    recipe (config.yaml); unknown without one."""
    import yaml

    data = {}
    if run is not None:
        try:
            data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
        except (OSError, yaml.YAMLError) as e:
            raise DKError(f"{run / 'config.yaml'}: cannot read the run's recipe ({e})") from None
    names = [str(i) for i in range(num_classes)]
    if data.get("name") == "digits":
        pre = {
            "source": "scikit-learn digits, 8×8 grey levels 0..16",
            "scale": 1 / 16,
        }
    elif data.get("name") == "idx":
        pre = {"source": f"IDX images {data.get('path')}, uint8 0..255", "scale": 1 / 255}
        if "fashion" in str(data.get("path", "")).lower() and num_classes == 10:
            names = list(FASHION_CLASSES)
    else:
        pre = {"source": "unknown (no run recipe beside the student)", "scale": None}
    pre.update(
        mean=[0.0],
        std=[1.0],
        formula="x = (pixel * scale - mean) / std, per channel",
        layout="NCHW",
        dtype="float32",
    )
    return pre, names


@contextlib.contextmanager
def _quiet():
    """The exporters' chatter (torch.onnx's notes on optional torchvision operators,
    deprecation warnings) stays off the terminal; errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.export.pt2_archive")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def export_student(
    path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """``dk export``: an image (classify) student as ``student.pt2`` (``torch.export``) or
    ``student.onnx``, with ``student.pt2.json`` / ``student.onnx.json`` beside it (input
    shape, preprocessing, class names). ``path`` is a run folder or its ``student/`` folder; ``out`` defaults to
    ``RUN/export``. Returns the model file's path."""
    import torch

    if fmt not in EXPORT_FORMATS:
        raise DKError(f"--format {fmt}: one of {', '.join(EXPORT_FORMATS)}")
    folder, run = _student_folder(Path(path))
    model = load_model(folder)  # a bad model.json / weights file: one line
    meta = json.loads((folder / "model.json").read_text())
    shape = [int(s) for s in meta["input_shape"]]
    nc = int(meta["num_classes"])
    pre, names = _preprocessing(run, nc)
    if class_names is not None:
        if len(class_names) != nc:
            raise DKError(f"--class-names: {len(class_names)} names but the model has {nc} classes")
        names = list(class_names)
    dest = Path(out) if out is not None else (run or folder) / "export"
    dest.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    suffix = ".pt2" if fmt == "torch.export" else ".onnx"
    target = dest / f"student{suffix}"
    tmp = dest / f"student.tmp{suffix}"
    with _quiet():
        if fmt == "torch.export":
            prog = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
            torch.export.save(prog, str(tmp))
        else:
            try:
                import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
            except ModuleNotFoundError:
                raise DKError(
                    "--format onnx needs onnx and onnxscript: pip install 'darkknowledge[export]'"
                ) from None
            torch.onnx.export(
                model, (x,), str(tmp), input_names=["pixels"], output_names=["logits"],
                dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
            )  # fmt: skip
    os.replace(tmp, target)
    _atomic_json(
        dest / f"student{suffix}.json",
        {
            "format": EXPORT_FORMAT,
            "file": target.name,
            "exported_as": fmt,
            "model": meta["model"],
            "input": {"name": "pixels", "shape": ["batch", *shape], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", nc], "softmax": "not applied"},
            "preprocessing": pre,
            "class_names": names,
            "weights": str(folder / "model.safetensors"),
        },
    )
    return target


# ---------------------------------------------------------------- model cards
# A short README.md beside a saved transformers student (text, causal_lm): what it was
# distilled from, by which recipe, on which data, and how well it did. The YAML header is
# the one the Hugging Face hub reads (library, pipeline tag, tags).


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("darkknowledge")
    except PackageNotFoundError:
        return "(version unknown)"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, separators=(", ", ": ")) + "`"
    return str(v)


def write_card(
    folder: str | os.PathLike,
    *,
    pipeline_tag: str,
    recipe: str,
    family: str,
    teacher: str,
    data: str,
    facts: dict | None = None,
    metrics: dict | None = None,
    notes: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write ``folder/README.md`` (atomically); returns its path. ``metrics`` and
    ``facts`` are name → value rows; ``notes`` are sentences listed under *Use*."""
    folder = Path(folder)
    rows = [("recipe", recipe), ("family", family), ("teacher", teacher), ("data", data)]
    rows += list((facts or {}).items())
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags: [darkknowledge, knowledge-distillation]",
        "---",
        "",
        f"# {recipe}: distilled student",
        "",
        f"A student model distilled by darkknowledge {_version()} (`dk run`, family `{family}`).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {_value(v)} |" for k, v in rows),
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items() if v is not None]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("{pipeline_tag}", model="path/to/this/folder")',
        "```",
        "",
        *(f"- {n}" for n in notes),
    ]
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
