"""torchdistill 1.1.5 side of bench/kd_overhead.py; runs in bench/.venv-peers.

    bench/.venv-peers/bin/python bench/kd_overhead_torchdistill.py online --steps 211

Same inputs, teacher weights, student architecture, optimizer (AdamW 1e-3), batch 256
and number of steps as darkknowledge's measurement; the loop is torchdistill's own
(TrainingBox / DistillationBox: forward_process + post_forward_process). Its KDLoss
weighs CE by ``alpha``, so darkknowledge's α = 0.9 (KD weight) is its alpha = 0.1.
"""

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import RandomSampler, TensorDataset
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box

ROOT = Path(__file__).resolve().parents[1]
logging.disable(logging.WARNING)

# darkknowledge's model definitions (a torch-only file), so the networks are identical
_spec = importlib.util.spec_from_file_location(
    "dkvision", ROOT / "src/darkknowledge/models/vision.py"
)
vision = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vision)


class Ensemble(nn.Module):
    """log of the mean of the members' probabilities (darkknowledge's prob_mean)."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        logp = torch.stack([m(x).log_softmax(-1) for m in self.members])  # (M, B, V)
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(self.members))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["plain", "online"])
    ap.add_argument("--steps", type=int, default=211)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    inp = torch.load(ROOT / "bench/.cache/kd/peer_inputs.pt", weights_only=True)
    x, y = inp["x"], inp["y"]
    torch.manual_seed(0)
    student = vision.MLP(tuple(x.shape[1:]), 10, hidden=[800, 800])
    loader = {
        "dataset_id": "train",
        "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
        "kwargs": {"batch_size": 256, "num_workers": 0, "drop_last": False},
    }
    optim = {"key": "AdamW", "kwargs": {"lr": 1e-3}}
    io = {"student_module_path": ".", "student_module_io": "output"}
    cpu = torch.device("cpu")
    if a.mode == "plain":
        ce = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {}},
              "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                  "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                  "target": {"uses_label": True}}},
              "weight": 1.0}  # fmt: skip
        cfg = {"num_epochs": 1000, "train_data_loader": loader, "model": {"forward_proc": "forward_batch_only"}, "optimizer": optim,
               "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": ce}}}}  # fmt: skip
        box = get_training_box(student, {"train": TensorDataset(x, y)}, cfg, cpu, None, False, 1)
    else:
        members = []
        for sd in inp["members"]:
            m = vision.SmallCNN(tuple(x.shape[1:]), 10, width=inp["width"])
            m.load_state_dict(sd)
            members.append(m.eval())
        teacher = Ensemble(members).eval()
        kd = {"criterion": {"key": "KDLoss", "kwargs": {
                  **io, "teacher_module_path": ".", "teacher_module_io": "output",
                  "temperature": 4.0, "alpha": 0.1, "reduction": "batchmean"}},
              "weight": 1.0}  # fmt: skip
        cfg = {"num_epochs": 1000, "train_data_loader": loader, "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
            "student": {"forward_proc": "forward_batch_only"},
               "optimizer": optim,
               "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": kd}}}}  # fmt: skip
        box = get_distillation_box(
            teacher, student, {"train": TensorDataset(x, y)}, cfg, cpu, None, False, 1
        )
    steps, epoch = 0, 0
    t0 = time.perf_counter()
    while steps < a.steps:
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss)
            steps += 1
            if steps >= a.steps:
                break
        epoch += 1
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": "td_" + a.mode, "steps": steps, "wall_s": wall,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))  # fmt: skip


if __name__ == "__main__":
    main()
