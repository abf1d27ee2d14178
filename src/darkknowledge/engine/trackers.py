"""``train.report_to``: experiment trackers that mirror ``metrics.jsonl``.

Every number of every line the engine writes to ``metrics.jsonl`` (nested keys joined by
``/``) goes to each tracker at that line's step; event lines (``{"event": "resume"}``)
do not. Each tracker writes into the model's run folder:

* ``tensorboard``: ``FOLDER/tb/`` (``tensorboard --logdir RUN`` shows every model);
* ``mlflow``: ``FOLDER/mlruns`` unless ``MLFLOW_TRACKING_URI`` says where;
* ``wandb``: a run in project ``WANDB_PROJECT`` (default ``darkknowledge``), its files
  under ``FOLDER/wandb``;
* ``trackio``: a run in project ``TRACKIO_PROJECT`` (default ``darkknowledge``).

A tracker whose package is missing is refused when the recipe is read (one line naming
the package), never mid-run."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import TRACKERS  # noqa: F401  (re-exported)
from ..config import tracker_missing as missing


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics line (nested dicts as ``a/b``), without its step."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if not prefix and k == "step":
            continue
        if isinstance(v, dict):
            out |= scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


class _TensorBoard:
    def __init__(self, folder: Path, name: str, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: what a killed run logged after its checkpoint is dropped on resume
        self.w = SummaryWriter(str(folder / "tb"), purge_step=resumed_from or None, flush_secs=10)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, folder: Path, name: str, resumed_from: int):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, folder: Path, name: str, resumed_from: int):
        import wandb

        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "darkknowledge"),
            name=name,
            dir=str(folder),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, folder: Path, name: str, resumed_from: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "darkknowledge"), name=name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb, "trackio": _Trackio}


class Trackers:
    """The trackers of one training run (none: every call does nothing)."""

    def __init__(self, names, folder: Path | None, name: str, resumed_from: int = 0):
        self.open = []
        if folder is None:
            return
        from ..errors import DKError

        for n in names:
            why = missing(n)
            if why is not None:
                raise DKError(f"train.report_to: {why}")
            self.open.append(_CLASSES[n](folder, name, resumed_from))

    def write(self, rec: dict) -> None:
        if not self.open or "event" in rec or not isinstance(rec.get("step"), int):
            return
        values = scalars(rec)
        for t in self.open:
            t.log(values, rec["step"])

    def close(self) -> None:
        for t in self.open:
            t.close()
        self.open = []
