"""Save a trained network as safetensors plus a JSON description, and load it back."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
