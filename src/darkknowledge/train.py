"""The training loop: plain supervised training and distillation are the same loop,
with or without a teacher. Checkpoints hold everything needed for a bit-exact resume."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import dist
from .config import TrainConfig
from .data.vision import ArrayDataset, augment
from .errors import DKError
from .losses import LossStack, cross_entropy
from .signals import Signals
from .teachers import Batch, Teacher

CKPT = "checkpoint.pt"


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    resumed_from: int  # the step training restarted from (0 when not resumed)
    wall_s: float
    history: list[dict] = field(default_factory=list)


def distill_step(
    student: nn.Module,
    teacher: Teacher | None,
    batch: Batch,
    loss: LossStack,
    device: torch.device | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """One step's forward: teacher under no-grad, student, each loss term, weighted sum.

    ``device``: where the student runs, when the teacher's signals come from elsewhere
    (a store, a cache on CPU)."""
    signals: Signals | None = None
    if teacher is not None:
        with torch.no_grad():
            signals = teacher.signals(batch)  # logits (B, V)
        if device is not None and device.type != "cpu":
            signals = signals.to(device)
    logits = student(batch.x)  # (B, V)
    total, parts = loss(logits, signals, batch.y)  # scalar, {term: value}
    return total, parts, logits


def fit(
    model: nn.Module,
    train: ArrayDataset,
    cfg: TrainConfig,
    loss: LossStack,
    teacher: Teacher | None = None,
    val: ArrayDataset | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train`` for ``cfg.epochs`` (or ``cfg.max_steps``).

    With ``run_dir``: ``metrics.jsonl`` gets one line per logged step and per epoch, and
    ``checkpoint.pt`` is rewritten atomically every ``cfg.checkpoint_every`` steps (or
    each epoch). ``resume=True`` continues from it: weights, optimizer, scheduler, RNG
    and data position are restored, so the result equals an uninterrupted run's.

    Under a distributed launcher (:mod:`darkknowledge.dist`) each process trains on its
    slice of every global batch and process 0 alone writes files; see
    :func:`_fit`.
    """
    return _fit(model, train, cfg, loss, teacher, val, run_dir, resume, desc)


def _global_batch(n: int, bs: int, seed: int, epoch: int, k: int) -> Tensor:
    """Example indices ``(B,)`` of step ``k`` of ``epoch``: the same on every process."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * bs : (k + 1) * bs]


def _fit(
    model: nn.Module,
    train: ArrayDataset,
    cfg: TrainConfig,
    loss: LossStack,
    teacher: Teacher | None,
    val: ArrayDataset | None,
    run_dir: str | Path | None,
    resume: bool,
    desc: str,
) -> TrainResult:
    """The training loop of :func:`fit`, in one process or several, with or without
    micro-batches (``cfg.grad_accum``). In one process it is plain training: one slice
    (the whole batch), weights of exactly 1, no collective calls.

    Every process draws the same global batch (and the same jitter for it), keeps its
    contiguous slice (:func:`darkknowledge.dist.shard`) and splits that into
    ``grad_accum`` micro-batches. A micro-batch's mean loss is weighted by
    ``its examples / global batch examples × processes``: DDP averages gradients over
    processes, so the update is the gradient of the mean loss over the whole global
    batch, as in one process. The global count is all-reduced, not assumed. Logged loss
    and accuracy are global too. Dropout draws from a per-process RNG stream, so
    recipes with dropout match a one-process run in distribution, not bit for bit.
    """
    st = dist.state()
    main = st.is_main
    dev = st.device
    if st.mixed_precision == "fp16":
        raise DKError("mixed precision fp16 is not supported; launch with bf16 or no")
    autocast = st.mixed_precision == "bf16"
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else None
    n, bs = len(train), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    plain = model  # the module that is returned (on CPU, unsharded)
    teacher_nets = getattr(teacher, "modules", list)() if dev.type != "cpu" else []
    for t in teacher_nets:  # replicated: every process runs the whole teacher
        t.to(dev)
    net = copy.deepcopy(model).to(dev) if st.fsdp else model.to(dev)
    ddp = dist.wrap(net)  # DDP, FSDP (net sharded in place) or net
    opt = _optimizer(net, cfg)
    sched = _scheduler(opt, cfg, total)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 7919)
    step, resumed_from, metrics_offset = 0, 0, 0
    ckpt_path = run_dir / CKPT if run_dir else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        _load_train_state(net, opt, state["model"], state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        rngs = state.get("torch_rng_ranks") or [state["torch_rng"]]
        cuda_rngs = state.get("cuda_rng_ranks") or [None] * len(rngs)
        if len(rngs) == st.world:
            torch.set_rng_state(rngs[st.rank])
            if dev.type == "cuda" and cuda_rngs[st.rank] is not None:
                torch.cuda.set_rng_state(cuda_rngs[st.rank], dev)
        else:  # another process count: fresh dropout streams (weights etc. are exact)
            torch.manual_seed(cfg.seed + 1_000_003 * (st.rank + 1) + int(state["step"]))
        aug_gen.set_state(state["aug_rng"])
        step = resumed_from = int(state["step"])
        metrics_offset = int(state["metrics_bytes"])
    elif st.world > 1:
        # each process its own dropout stream (the same stream would repeat masks)
        torch.manual_seed(cfg.seed + 1_000_003 * (st.rank + 1))
    log = _MetricsLog(
        run_dir / "metrics.jsonl" if run_dir and main else None, metrics_offset, resume
    )
    if resumed_from:
        log.write({"event": "resume", "step": step, "phase": desc, "processes": st.world})
    every = cfg.checkpoint_every or steps_per_epoch
    history: list[dict] = []
    bar = tqdm(
        total=total,
        initial=step,
        desc=desc,
        file=sys.stderr,
        leave=False,
        disable=None if main else True,
        dynamic_ncols=True,
    )
    net.train()
    run_loss = run_acc = None
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        idx = _global_batch(n, bs, cfg.seed, epoch, k)  # (B,) the same on every process
        gx = train.x[idx]
        if cfg.augment != "none":  # augment the global batch: one aug stream for all
            gx = augment(gx, cfg.augment, cfg.jitter_px, aug_gen)
        pos = dist.shard(torch.arange(len(idx)))  # this process's rows of the batch
        count = dist.all_reduce_sum(torch.tensor([float(len(pos))], device=dev))
        n_global = float(count.item())  # examples in the global batch (all processes)
        micro = pos.tensor_split(cfg.grad_accum)
        # ---- the step: per micro-batch forward + weighted backward, then one update
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(2 + len(loss.terms), dtype=torch.float64)  # loss, correct, parts
        for j, p in enumerate(micro):
            y = None if train.y is None else train.y[idx[p]].to(dev)
            mb = Batch(gx[p].to(dev), y, train.ids[idx[p]])
            last = j == len(micro) - 1
            with _sync(ddp, last):
                with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
                    if len(p):
                        total_loss, parts, logits = distill_step(ddp, teacher, mb, loss, dev)
                        w = len(p) / n_global
                    else:  # an empty slice (a short last batch) still joins the all-reduce
                        total_loss = ddp(mb.x).sum() * 0.0  # (0, V) logits: zero gradients
                        parts, logits, w = {}, None, 0.0
                (total_loss * (w * st.world)).backward()  # outside autocast
            stats[0] += float(total_loss.detach()) * w
            if logits is not None and y is not None:
                stats[1] += float((logits.argmax(-1) == y).sum()) / n_global
            for i, name in enumerate(loss.terms):
                stats[2 + i] += parts.get(name, 0.0) * w
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if hasattr(net, "apply_constraints"):
            net.apply_constraints()
        if sched is not None:
            sched.step()
        step += 1
        # ---- bookkeeping (global means over the batch)
        stats = dist.all_reduce_sum(stats)
        lv = float(stats[0])
        run_loss = lv if run_loss is None else 0.95 * run_loss + 0.05 * lv
        if train.y is not None:
            acc = float(stats[1])
            run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss:.4f}", **({"acc": f"{run_acc:.3f}"} if run_acc else {}))
        if step % 50 == 0 or step == total:
            log.write(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": lv,
                    "lr": opt.param_groups[0]["lr"],
                    **{f"loss/{k_}": float(stats[2 + i]) for i, k_ in enumerate(loss.terms)},
                }
            )
        if step % steps_per_epoch == 0 or step == total:
            rec = {"step": step, "epoch": epoch + 1, "train_loss": run_loss}
            rec["elapsed_s"] = time.perf_counter() - t0  # steady-state step time (bench)
            if val is not None and len(val) and val.y is not None:
                with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
                    rec.update(_val_metrics(net, val))  # every process: FSDP needs all
                net.train()
            history.append(rec)
            log.write(rec)
        if ckpt_path is not None and (step % every == 0) and step < total:
            _save_checkpoint(ckpt_path, net, opt, sched, aug_gen, step, log.tell() if main else 0)
    bar.close()
    log.close()
    if st.fsdp:
        plain.load_state_dict(dist.full_state_dict(net))
    else:
        plain.to("cpu")
    plain.eval()
    for t in teacher_nets:
        t.to("cpu")
    return TrainResult(plain, step, resumed_from, time.perf_counter() - t0, history)


def _sync(ddp: nn.Module, last: bool):
    """Gradient all-reduce only on the step's last micro-batch."""
    if last:
        return contextlib.nullcontext()
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    if hasattr(ddp, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def no_sync():
            ddp.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                ddp.set_requires_gradient_sync(True)

        return no_sync()
    return contextlib.nullcontext()


def _train_state(net: nn.Module, opt) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU; collective under FSDP."""
    if dist.state().fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(
            net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, opt.state_dict()


def _load_train_state(net: nn.Module, opt, msd: dict, osd: dict) -> None:
    if dist.state().fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            net,
            opt,
            model_state_dict=msd,
            optim_state_dict=osd,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    net.load_state_dict(msd)
    opt.load_state_dict(osd)


def _save_checkpoint(path: Path, net, opt, sched, aug_gen, step, metrics_bytes):
    """Process 0 writes the checkpoint, with every process's dropout RNG state."""
    msd, osd = _train_state(net, opt)
    dev = dist.state().device
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None  # GPU dropout
    rngs = dist.all_gather_object((torch.get_rng_state(), cuda))
    if dist.is_main():
        state = {
            "model": msd,
            "optimizer": osd,
            "scheduler": sched.state_dict() if sched is not None else {},
            "torch_rng": rngs[0][0],
            "torch_rng_ranks": [r[0] for r in rngs],
            "cuda_rng_ranks": [r[1] for r in rngs],
            "aug_rng": aug_gen.get_state(),
            "step": step,
            "metrics_bytes": metrics_bytes,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    dist.barrier()


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt, cfg: TrainConfig, total: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
    if cfg.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 2))
    return None


@torch.no_grad()
def _val_metrics(model: nn.Module, val: ArrayDataset, batch_size: int = 1024) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat(
        [
            model(val.x[i : i + batch_size].to(dev)).float().cpu()
            for i in range(0, len(val), batch_size)
        ]
    )
    return {
        "val_loss": float(cross_entropy(logits, val.y)),
        "val_acc": float((logits.argmax(-1) == val.y).float().mean()),
    }


class _MetricsLog:
    """Append-only JSON lines; on resume, lines written after the checkpoint are cut."""

    def __init__(self, path: Path | None, offset: int, resume: bool):
        self.path = path
        self.f = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            with open(path, "r+b") as f:
                f.truncate(offset)
        elif path.exists():
            path.unlink()
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def tell(self) -> int:
        return self.f.tell() if self.f is not None else 0
