"""Metrics for a classifier: quality (accuracy, errors, NLL, calibration, agreement with
the teacher), size (parameters, bytes on disk) and CPU speed."""

from __future__ import annotations

import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.vision import ArrayDataset
from .teachers import Batch, Teacher


@torch.inference_mode()
def predict_logits(model: nn.Module | Teacher, ds: ArrayDataset, batch_size: int = 1024) -> Tensor:
    """Logits ``(N, V)`` of a model or a teacher over a dataset."""
    outs = []
    for i in range(0, len(ds), batch_size):
        x = ds.x[i : i + batch_size]
        if isinstance(model, nn.Module):
            model.eval()
            outs.append(model(x).float())
        else:
            outs.append(model.signals(Batch(x, None, ds.ids[i : i + batch_size])).logits.float())
    return torch.cat(outs)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017). probs (N, V), labels (N,)."""
    n = len(labels)
    return sum(
        b["count"] / n * abs(b["confidence"] - b["accuracy"])
        for b in reliability_bins(probs, labels, bins)
    )


def reliability_bins(probs: Tensor, labels: Tensor, bins: int = 15) -> list[dict]:
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            out.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "count": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                }
            )
    return out


def quality(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None, bins: int = 15
) -> dict:
    """Accuracy, error count, NLL, ECE (and top-1 agreement with the teacher)."""
    probs = F.softmax(logits.float(), -1)
    pred = probs.argmax(-1)
    out = {
        "accuracy": float((pred == labels).float().mean()),
        "errors": int((pred != labels).sum()),
        "n": len(labels),
        "nll": float(F.cross_entropy(logits.float(), labels)),
        "ece": expected_calibration_error(probs, labels, bins),
        "reliability": reliability_bins(probs, labels, bins),
        "errors_by_class": torch.bincount(
            labels[pred != labels], minlength=logits.shape[-1]
        ).tolist(),
    }
    if teacher_logits is not None:
        out["teacher_agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
    return out


def param_count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def bytes_on_disk(modules: list[nn.Module]) -> int:
    """Size of the weights as safetensors (what ``export`` writes)."""
    from safetensors.torch import save

    total = 0
    for m in modules:
        sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
        total += len(save(sd))
    return total


@torch.inference_mode()
def speed(
    model: nn.Module | Teacher,
    input_shape: tuple[int, ...],
    runs: int = 50,
    throughput_batch: int = 256,
) -> dict:
    """CPU latency at batch 1 (median ms over ``runs``) and throughput at batch 256
    (examples per second, median of a few runs)."""

    def call(x: Tensor):
        if isinstance(model, nn.Module):
            model.eval()
            return model(x)
        return model.signals(Batch(x, None, torch.zeros(len(x), dtype=torch.long)))

    x1 = torch.rand(1, *input_shape)
    xb = torch.rand(throughput_batch, *input_shape)
    for _ in range(5):
        call(x1)
    lat = []
    for _ in range(runs):
        t = time.perf_counter()
        call(x1)
        lat.append(time.perf_counter() - t)
    call(xb)
    tp = []
    for _ in range(max(3, runs // 10)):
        t = time.perf_counter()
        call(xb)
        tp.append(throughput_batch / (time.perf_counter() - t))
    return {
        "latency_ms_b1": 1000 * statistics.median(lat),
        "throughput_b256": statistics.median(tp),
    }
