"""The one training loop. Every family (classify, text, causal_lm, chat SFT) trains
through :func:`train`; a family supplies a :class:`Task`, a small adapter saying only
what differs: how a step's micro-batches are made, the loss of one micro-batch (the
student's forward, the teacher's signals, each loss term), evaluation, and what of its
own state a checkpoint must hold.

The step, on one screen::

    lr = schedule(step)                         # depends on the step only
    for each micro-batch of this process:       # task.micro_batches(step)
        loss, stats = task.forward(mb)          # its share of the step's loss
        backward(loss × processes)              # DDP averages: × N gives the sum
    clip; optimizer step; task.after_update()

Checkpoints (:mod:`.checkpoint`) hold the model, optimizer, schedule, every process's
RNG streams and the task's data position, so a run killed at any point and resumed
ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .. import dist, faults
from ..config import TrainConfig
from ..errors import DKError
from . import checkpoint, rundir
from .log import MetricsLog, Progress
from .optim import Schedule, build_optimizer
from .trackers import Trackers

_log = logging.getLogger(__name__)


class Task(Protocol):
    """What a family tells the engine. ``trained`` is the module whose parameters are
    optimised and checkpointed (the student, plus any learned part of the loss);
    ``net`` is what the forward calls go through (a DDP/FSDP wrapper, or ``trained``)."""

    trained: nn.Module
    net: nn.Module
    steps_per_epoch: int
    stat_names: tuple[str, ...]  # the stats forward returns (summed over micro-batches)

    def micro_batches(self, step: int) -> list[Any]: ...

    def forward(self, mb: Any) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, step: int) -> dict: ...  # {"stop": True} ends training there

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Fit:
    steps: int
    resumed_from: int  # the step training restarted from (0 when not resumed)
    wall_s: float
    history: list[dict] = field(default_factory=list)  # one record per evaluation


def _rng_states(dev: torch.device) -> tuple[list, list]:
    """Every process's CPU and CUDA generator states (collective)."""
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    rngs = dist.all_gather_object((torch.get_rng_state(), cuda))
    return [r[0] for r in rngs], [r[1] for r in rngs]


def _stop_non_finite(step: int, stats: dict, ckpt: Path | None, folder: Path | None):
    """A loss that is not finite cannot train: stop with one line (every process)."""
    bad = [k for k, v in stats.items() if k != "loss" and not math.isfinite(v)]
    terms = f" (term {', '.join(bad)})" if bad else ""
    kept = (
        f"; the last good checkpoint ({ckpt}) is kept: fix the recipe and --resume"
        if ckpt is not None and ckpt.exists()
        else ""
    )
    raise DKError(
        f"step {step}: the training loss is {stats['loss']}{terms}; check train.lr, the "
        f"loss temperatures and weights, the teacher's outputs and the data{kept}"
    )


def train(
    task: Task,
    cfg: TrainConfig,
    folder: Path | None,
    *,
    resume: bool = False,
    desc: str = "train",
    fresh_seed: int | None = None,
    optimizer_module: nn.Module | None = None,
) -> Fit:
    """Train ``task`` for ``cfg``'s steps; checkpoints and ``metrics.jsonl`` go to
    ``folder`` (process 0 writes). ``resume``: continue from ``folder``'s checkpoint.

    ``fresh_seed``: reseed the dropout stream (``+ 1,000,003·rank``) at a fresh start;
    None keeps the stream as model construction left it (several processes still get
    one stream each). ``optimizer_module``: whose parameters the optimizer takes
    (default ``task.trained``; under FSDP the sharded module)."""
    st = dist.state()
    dev = next(task.trained.parameters()).device
    if st.mixed_precision == "fp16":
        raise DKError("mixed precision fp16 is not supported; launch with bf16 or no")
    autocast = cfg.dtype == "bf16" or st.mixed_precision == "bf16"
    spe = task.steps_per_epoch
    total = cfg.total_steps(spe)
    opt = build_optimizer(optimizer_module or task.trained, cfg)
    sched = Schedule(opt, cfg, total)
    # the gradient norm sums per-parameter norms in this order; the order decides the
    # last bits of a clipped step (a task may ask for the optimizer's group order)
    if getattr(task, "clip_in_group_order", False):
        clip_params = [p for g in opt.param_groups for p in g["params"]]
    else:
        clip_params = list(task.trained.parameters())
    ckpt = folder / checkpoint.NAME if folder is not None else None
    step = resumed_from = 0
    metrics_offset, wall_before = 0, 0.0
    if resume and ckpt is not None and ckpt.exists():
        state = checkpoint.load(ckpt)
        dist.check_checkpoint_sharding(ckpt, bool(state.get("fsdp", False)))
        dist.load_train_state(task.trained, opt, state["model"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        task.load_state_dict(state["task"])
        cpu, cuda = state["rng"]["cpu"], state["rng"]["cuda"]
        step = resumed_from = int(state["step"])
        if len(cpu) == st.world:
            torch.set_rng_state(cpu[st.rank])
            if dev.type == "cuda" and cuda[st.rank] is not None:
                torch.cuda.set_rng_state(cuda[st.rank], dev)
        else:  # another process count: fresh dropout streams (weights etc. are exact)
            torch.manual_seed(cfg.seed + 1_000_003 * (st.rank + 1) + step)
        metrics_offset = int(state["metrics_bytes"])
        wall_before = float(state.get("wall_s", 0.0))
    elif fresh_seed is not None:
        torch.manual_seed(fresh_seed + 1_000_003 * st.rank)
    elif st.world > 1:  # each process its own dropout stream (one stream repeats masks)
        torch.manual_seed(cfg.seed + 1_000_003 * (st.rank + 1))
    main_folder = folder if folder is not None and st.is_main else None
    log = MetricsLog(
        main_folder / "metrics.jsonl" if main_folder is not None else None,
        metrics_offset,
        resume,
        Trackers(cfg.report_to, main_folder, "/".join(folder.parts[-2:]) if folder else desc,
                 resumed_from),
    )  # fmt: skip
    if resumed_from:
        log.write({"event": "resume", "step": step, "phase": desc, "processes": st.world})
    _log.debug("%s: steps %d-%d (%d per epoch), batch %d, %d process(es), device %s%s",
               desc, step, total, spe, cfg.batch_size, st.world, dev,
               f", report_to {list(cfg.report_to)}" if cfg.report_to else "")  # fmt: skip
    ckpt_every = cfg.checkpoint_every or spe
    eval_every = cfg.eval_every or spe
    progress = Progress(total, step, desc, enabled=st.is_main)
    history: list[dict] = []
    names = ("loss", *task.stat_names)
    since_eval, n_since = 0.0, 0
    t0 = time.perf_counter()
    task.net.train()
    while step < total:
        lr = sched.apply(opt, step)
        micro = task.micro_batches(step)
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(len(names), dtype=torch.float64)
        for j, mb in enumerate(micro):
            with dist.no_sync(task.net, j == len(micro) - 1):
                with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
                    loss, stats = task.forward(mb)
                (loss * st.world if st.world > 1 else loss).backward()  # the one backward
            sums[0] += float(loss.detach())
            for i, k in enumerate(task.stat_names, start=1):
                sums[i] += stats.get(k, 0.0)
        sums = dist.all_reduce_sum(sums) if st.world > 1 else sums
        stats = dict(zip(names, (float(v) for v in sums), strict=True))
        if not math.isfinite(stats["loss"]):  # before the update: the weights stay good
            _stop_non_finite(step + 1, stats, ckpt, folder)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
        opt.step()
        after = getattr(task, "after_update", None)
        if after is not None:
            after()
        sched.step()
        step += 1
        faults.point("step")
        since_eval, n_since = since_eval + stats["loss"], n_since + 1
        progress.update(step, stats["loss"], **{k: stats[k] for k in task.stat_names[:1]})
        if step % cfg.log_every == 0 or step == total:
            log.write(
                {"step": step, "epoch": step / spe, "lr": lr}
                | {("loss" if k == "loss" else f"loss/{k}"): v for k, v in stats.items()}
            )
        if step % eval_every == 0 or step == total:
            rec = {"step": step, "epoch": step / spe, "train_loss": since_eval / n_since}
            rec |= task.evaluate(step)
            rec["elapsed_s"] = wall_before + time.perf_counter() - t0
            task.net.train()
            since_eval, n_since = 0.0, 0
            history.append(rec)
            log.write(rec)
            progress.evaluation(rec)
            if rec.get("stop"):  # the task's early stop (after its evaluation)
                break
        if ckpt is not None and step % ckpt_every == 0 and step < total:
            msd, osd = dist.train_state(task.trained, opt)  # collective under FSDP
            cpu, cuda = _rng_states(dev)
            if st.is_main:
                checkpoint.save(
                    ckpt,
                    {
                        "step": step,
                        "model": msd,
                        "optimizer": osd,
                        "scheduler": sched.state_dict(),
                        "rng": {"cpu": cpu, "cuda": cuda},
                        "task": task.state_dict(),
                        "metrics_bytes": log.tell(),
                        "wall_s": wall_before + time.perf_counter() - t0,
                        "processes": st.world,
                        "fsdp": st.fsdp,
                    },
                )
            dist.barrier()  # the checkpoint is on disk before anyone goes on
            if st.is_main:
                rundir.commit_replaced(folder)  # a run it replaced (--force) can go now
            faults.point("checkpoint")
    progress.close()
    log.close()
    return Fit(step, resumed_from, wall_before + time.perf_counter() - t0, history)
