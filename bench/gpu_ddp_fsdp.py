"""Step time and peak GPU memory of a distillation run under DDP and FSDP (one GPU).

Run by ``bench/gpu_ddp_fsdp.sh``, which launches this file once per configuration, each
in a fresh process group (``torchrun`` for DDP, ``accelerate launch --use_fsdp`` for
FSDP). Every launch runs the real ``dk run`` pipeline (``run_recipe``) on the Hinton
MNIST recipe with a wide student, and process 0 appends one JSON record to ``--json``:
student steps, wall seconds, seconds per step (overall, and over the last epoch alone,
which leaves out start-up; both include that epoch's validation pass), peak CUDA memory (allocated and
reserved), test accuracy, the launch configuration and the device.

    bench/gpu_ddp_fsdp.sh              # on a GPU machine: writes docs/results/gpu_ddp_fsdp.json
    bench/gpu_ddp_fsdp.sh --smoke      # CPU, digits, tiny models: checks the plumbing only

``prepare`` trains the teacher once (so that every measured run distils from the same
teacher and measures the student phase only); ``measure`` is one configuration.

``lm-prepare`` / ``lm-measure`` do the same for a ``causal_lm`` recipe (token-level
forward KL, GPT-2 BPE vocabulary on TinyShakespeare, the LM head applied chunk by
chunk): the student under DDP (``train.dtype`` bf16 or fp32), and with two or more GPUs
the teacher sharded over the processes (``teacher.placement=shard``). FSDP is not a
configuration there: a ``causal_lm`` student trains with DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "hinton2015" / "mlp1200_to_mlp800_mnist.yaml"

# Shortened: 2 teacher epochs, 2 student epochs, a 3×4096 student (~30 M parameters,
# large enough that the optimizer state shows in the memory figures).
FULL = [
    "teacher.train.epochs=2",
    "student.model.hidden=[4096,4096,4096]",
    "train.epochs=2",
    "train.batch_size=512",
    "eval.plain_baseline=false",
    "eval.latency=false",
]
# CPU smoke test: the digits set and tiny models; numbers mean nothing.
SMOKE = [
    "data={name: digits}",
    "teacher.model.hidden=[32]",
    "teacher.model.dropout=0.0",
    "teacher.model.input_dropout=0.0",
    "teacher.model.max_norm=null",
    "teacher.train.epochs=1",
    "teacher.train.augment=none",
    "student.model.hidden=[64]",
    "train.epochs=2",
    "train.batch_size=64",
    "eval.plain_baseline=false",
    "eval.latency=false",
]


LM_RECIPE = ROOT / "recipes" / "lm" / "shakespeare_gpt2_bpe.yaml"
# Shortened: 300 teacher steps, 200 student steps; a 6 × 512 teacher and a 4 × 256
# student (GPT-2 vocabulary), 32 blocks of 256 tokens per step.
LM_FULL = [
    "data.block_size=256",
    "teacher.model.config={n_layer: 6, n_head: 8, n_embd: 512, n_positions: 256}",
    "teacher.train.steps=300",
    "teacher.train.batch_size=32",
    "student.model.config={n_layer: 4, n_head: 4, n_embd: 256, n_positions: 256}",
    "train.steps=200",
    "train.batch_size=32",
    "train.eval_every=100",
    "train.checkpoint_every=1000",
    "distill.chunk=1024",
]
# CPU smoke: a character vocabulary, tiny models, a few steps; numbers mean nothing.
LM_SMOKE = [
    "tokenizer={kind: char}",
    "data.block_size=32",
    "data.val_blocks=4",
    "teacher.model.config={n_layer: 2, n_head: 2, n_embd: 32, n_positions: 32}",
    "teacher.train.steps=4",
    "teacher.train.batch_size=4",
    "teacher.train.warmup=1",
    "student.model.config={n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}",
    "train.steps=6",
    "train.batch_size=4",
    "train.warmup=1",
    "train.eval_every=3",
    "distill.chunk=64",
]


def _lm_recipe(smoke: bool, extra: list[str]):
    from darkknowledge.families import load_family_recipe

    _, recipe, _ = load_family_recipe(LM_RECIPE, [*(LM_SMOKE if smoke else LM_FULL), *extra])
    return recipe


def _lm(a) -> int:
    """``lm-prepare``: train the teacher once; ``lm-measure``: distil a student from it."""

    from darkknowledge import dist
    from darkknowledge.lm.pipeline import run_lm_recipe

    extra = [f"train.dtype={a.dtype}"]
    if a.shared:  # the data folder (TinyShakespeare, the GPT-2 tokenizer) elsewhere
        extra.append(f"data.path={a.shared / 'tinyshakespeare' / 'input.txt'}")
        if not a.smoke:
            extra.append(f"tokenizer.path={a.shared / 'tokenizers' / 'gpt2'}")
    if a.what == "lm-prepare":  # the teacher only: the student is a 1-step placeholder
        extra += ["train.steps=1", "train.eval_every=1"]
    else:  # the prepared teacher, loaded from its folder
        extra += [f"teacher={{model: {{path: {a.teacher}}}, placement: {a.placement}}}"]
    recipe = _lm_recipe(a.smoke, extra)
    st = dist.state()
    _, wall = _timed(lambda: run_lm_recipe(recipe, a.out, force=True))
    if a.what == "lm-prepare" or not st.is_main:
        dist.shutdown()
        return 0
    res = json.loads((a.out / "student" / "result.json").read_text())
    rec = {
        "name": a.name,
        "family": "causal_lm",
        "device": _device_name(st.device),
        "processes": st.world,
        "student_fsdp": st.fsdp,
        "student_param_bytes_per_process": res.get("student_param_bytes_per_process"),
        "dtype": a.dtype,
        "teacher_placement": a.placement,
        "teacher_param_bytes_per_process": res.get("teacher_param_bytes_per_process"),
        "student_params": res["params"],
        "steps": res["steps"],
        "tokens_per_step": recipe.train.batch_size
        * recipe.train.grad_accum
        * recipe.data.block_size,
        "student_wall_s": res["wall_s"],
        "s_per_step": res["wall_s"] / res["steps"],
        "run_wall_s": wall,
        "val_loss": res["val_loss"],
        **_machine(st.device, a.smoke),
    }
    _append(a.json, rec)
    dist.shutdown()
    return 0


def _timed(run):
    """``run()`` (one whole recipe run) with this process's CUDA peak-memory counters
    reset first: its result and its wall seconds."""
    import torch

    from darkknowledge import dist

    device = dist.state().device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = run()
    return res, time.perf_counter() - t0


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _machine(device, smoke: bool) -> dict:
    """The fields every record ends with: peak memory (CUDA, and this process's RSS), the
    torch version, how it was launched, and whether it was a CPU smoke run."""
    import torch

    cuda = device.type == "cuda"
    return {
        "peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if cuda
        else None,
        "peak_cuda_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
        "launch": os.environ.get("DK_BENCH_LAUNCH", ""),
        "smoke": smoke,
    }


def _append(path: Path | None, rec: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*records, rec], indent=2) + "\n")
    print(json.dumps(rec))


def _recipe(smoke: bool, extra: list[str]):
    from darkknowledge.recipe_io import load_recipe

    recipe, _ = load_recipe(RECIPE, [*(SMOKE if smoke else FULL), *extra])
    return recipe


def _last_epoch_step_s(history: list[dict]) -> float | None:
    if len(history) < 2 or "elapsed_s" not in history[-1]:
        return None
    a, b = history[-2], history[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["prepare", "measure", "lm-prepare", "lm-measure"])
    p.add_argument("--name", default="run", help="configuration name in the JSON record")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--teacher", type=Path, help="teacher weights from `prepare`")
    p.add_argument("--json", type=Path, help="append the record here (measure)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--mnist", help="folder of the MNIST IDX files (default: the recipe's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="causal_lm")
    p.add_argument("--placement", choices=["replicate", "shard"], default="replicate")
    p.add_argument("--shared", type=Path, help="causal_lm: the shared data folder")
    a = p.parse_args()
    if a.what.startswith("lm-"):
        return _lm(a)

    from darkknowledge import dist
    from darkknowledge.pipeline import run_recipe

    extra = [f"teacher.checkpoint={a.teacher}"] if a.teacher else []
    if a.mnist:
        extra.append(f"data.path={a.mnist}")
    if a.what == "prepare":  # the teacher only: the student is a 1-step placeholder
        extra += ["train.max_steps=1"]
    recipe = _recipe(a.smoke, extra)
    st = dist.state()
    res, wall = _timed(lambda: run_recipe(recipe, a.out, force=True))
    if a.what == "prepare" or not st.is_main:
        dist.shutdown()
        return 0
    train = json.loads((a.out / "student" / "train.json").read_text())
    rec = {
        "name": a.name,
        "device": _device_name(st.device),
        "processes": st.world,
        "fsdp": st.fsdp,
        "mixed_precision": st.mixed_precision,
        "student_params": res.report["rows"]["student"]["params"],
        "steps": train["steps"],
        "student_wall_s": train["wall_s"],
        "s_per_step": train["wall_s"] / train["steps"],
        # the last epoch alone: no start-up (process group, first CUDA kernels, caching)
        "s_per_step_last_epoch": _last_epoch_step_s(train["history"]),
        "run_wall_s": wall,
        "test_accuracy": res.report["rows"]["student"]["accuracy"],
        **_machine(st.device, a.smoke),
    }
    _append(a.json, rec)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
