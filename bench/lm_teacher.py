"""Train the small GPT teacher for the token-level store benchmarks (writes bench/.cache/).

.venv/bin/python bench/lm_teacher.py --steps 300
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import lm

CONFIG = {"d": 96, "layers": 2, "heads": 4, "ctx": 64}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(lm.ROOT / "bench" / ".cache" / "lm_teacher"))
    a = ap.parse_args()
    (x, y), (vx, vy) = lm.splits(CONFIG["ctx"])
    torch.manual_seed(0)
    model = lm.GPT(**CONFIG)
    t0 = time.perf_counter()
    log = lm.train_lm(model, x, y, a.steps, a.batch, 3e-3, seed=0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.weights(), str(out / "model.safetensors"))
    res = {"config": CONFIG, "steps": a.steps, "batch": a.batch, "train_s": time.perf_counter() - t0,
           "val_ce": lm.val_ce(model, vx[:128], vy[:128]), "log": log}  # fmt: skip
    (out / "train.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "log"}))


if __name__ == "__main__":
    main()
