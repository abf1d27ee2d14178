"""Several processes, one run: the thin seam between darkknowledge and torch.distributed.

``dk run`` and ``dk label`` run unchanged under ``accelerate launch`` or ``torchrun``.
Accelerate's :class:`~accelerate.PartialState` reads the launcher's environment and sets
up the process group (gloo on CPU, NCCL on GPUs); the student is wrapped in PyTorch's
own DDP, or FSDP2 (``fully_shard``) when the launcher asks for FSDP
(``accelerate launch --use_fsdp``). Without a launcher nothing here touches
torch.distributed and every helper is a no-op, so a plain ``dk run`` behaves exactly as
it does without this module.

How the work is split (see docs/distributed.md):

- training: ``train.batch_size`` is the *global* batch of one optimizer step. Every
  process draws the same permutation, takes its contiguous slice of the global batch
  (:func:`shard`), and scales its mean loss by ``local count / global count`` so that
  the gradient DDP averages is the gradient of the global batch's mean loss.
- labelling: each process writes a contiguous range of shards; process 0 writes the
  manifest once all are on disk.
- files (checkpoints, metrics, reports, models) are written by process 0 only
  (:func:`on_main`); the others wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DKError


class EchoedError(DKError):
    """Process 0's error, raised again on another process (the CLI prints it once)."""


@dataclass(frozen=True)
class DistState:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launched: bool = False  # started by a distributed launcher (even with 1 process)
    fsdp: bool = False
    mixed_precision: str = "no"  # "no", "bf16" or "fp16", as the launcher says

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when a launcher started this process: torchrun (and ``accelerate launch``
    with several processes or FSDP, which uses it), or ``accelerate launch`` with one
    process (no process group then, but its device and mixed precision apply)."""
    torchrun = "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ
    return torchrun or "ACCELERATE_USE_CPU" in os.environ


def _grouped() -> bool:
    return state().launched and torch.distributed.is_initialized()


@cache
def state() -> DistState:
    """This process's place in the run (computed once; sets up the process group)."""
    if not launched():
        return DistState()
    try:
        from accelerate import PartialState
    except ModuleNotFoundError:  # pragma: no cover - accelerate ships with the dist extra
        raise DKError(
            "multi-process runs need accelerate: pip install 'darkknowledge[dist]'"
        ) from None
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1",
        "true",
    )
    s = PartialState(cpu=cpu)  # cpu: gloo process group; else NCCL, one GPU per process
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return DistState(
        rank=s.process_index,
        world=s.num_processes,
        local_rank=s.local_process_index,
        device=torch.device(s.device),
        launched=True,
        fsdp=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
        and torch.distributed.is_initialized(),
        mixed_precision=mp if mp in ("bf16", "fp16") else "no",
    )


def is_main() -> bool:
    return state().is_main


def default_device() -> torch.device:
    """Where a run's models and batches live: this process's device under a launcher
    (its GPU, or the CPU), else a GPU when there is one."""
    if launched():
        return state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_checkpoint_sharding(path, written_with_fsdp: bool) -> None:
    """A checkpoint resumes the way it was written: FSDP's optimizer state is keyed by
    parameter name, DDP's by position. Otherwise a one-line error (every process finds
    it; process 0 alone prints it)."""
    if written_with_fsdp == state().fsdp:
        return
    how = "with" if written_with_fsdp else "without"
    raise (DKError if is_main() else EchoedError)(
        f"{path}: written by a run {how} FSDP; resume it the same way "
        f"(accelerate launch {how} --use_fsdp)"
    )


def barrier() -> None:
    if _grouped():
        torch.distributed.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over processes (a new tensor on ``t``'s device)."""
    st = state()
    if not _grouped():
        return t
    buf = t.detach().to(st.device, copy=True)
    torch.distributed.all_reduce(buf)
    return buf.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    if not _grouped():
        return [obj]
    out: list[Any] = [None] * state().world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Process 0's ``obj`` on every process."""
    if not _grouped():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn`` on process 0 only and hand its result to every process.

    A :class:`DKError` raised there is raised on every process, so bad input stops the
    whole run with the same one-line error instead of leaving the others at a barrier.
    """
    st = state()
    if not _grouped():
        return fn(*args, **kwargs)
    result, error, other = None, None, None
    if st.is_main:
        try:
            result = fn(*args, **kwargs)
        except DKError as e:
            error = str(e)
        except BaseException as e:  # re-raised below, once the others know
            other = e
            error = f"process 0 failed: {type(e).__name__}: {e}"
    result, error = broadcast_object((result, error))
    if other is not None:
        raise other
    if error is not None:
        raise DKError(error) if st.is_main else EchoedError(error)
    return result


_left = False


def shutdown() -> None:
    """Leave the process group (at the end of a launched command)."""
    global _left
    if _grouped():
        import gc

        # DDP/FSDP objects left in reference cycles hold the group's C++ side: free them
        # while the group is alive (freeing them at exit can abort the interpreter)
        gc.collect()
        torch.distributed.destroy_process_group()
        _left = True


def left_group() -> bool:
    """True once :func:`shutdown` has left a process group in this process."""
    return _left


def shard(idx: Tensor) -> Tensor:
    """This process's contiguous slice of the global batch ``idx (B,)``.

    Slices differ in size by at most one; a process may get an empty slice when
    B < world size (it then contributes a zero gradient)."""
    st = state()
    if st.world == 1:
        return idx
    return idx.tensor_split(st.world)[st.rank]


def shard_range(n: int) -> range:
    """This process's contiguous part of ``range(n)`` (work items such as store shards)."""
    st = state()
    lo = n * st.rank // st.world
    hi = n * (st.rank + 1) // st.world
    return range(lo, hi)


def wrap(model: nn.Module, *, ddp_only: bool = False, find_unused: bool = False) -> nn.Module:
    """The module the training step calls: DDP, FSDP2, or ``model`` itself.

    ``model`` must already be on :func:`state`'s device. With FSDP, ``model`` is
    sharded in place (its parameters become DTensors); use :func:`full_state_dict`
    to read its weights. ``ddp_only``: DDP even when the launcher asks for FSDP (for
    callers that use some parameters outside ``model``'s forward);
    ``find_unused``: DDP's ``find_unused_parameters``."""
    st = state()
    if not _grouped():
        return model  # one process (accelerate launch without torchrun): no wrapper
    if st.fsdp and not ddp_only:
        from torch.distributed.fsdp import fully_shard

        return fully_shard(model)
    ids = [st.device.index] if st.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused
    )


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a transformer (the first ``nn.ModuleList`` in ``model``:
    GPT-2's ``transformer.h``, LLaMA's ``model.layers``, BERT's ``encoder.layer``)."""
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            return list(mod)
    return []


def shard_for_inference(root: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    """Shard a frozen model's parameters over the processes for inference (FSDP2).

    Each of ``blocks`` becomes its own unit: its parameters are all-gathered just
    before its forward and freed right after, so a process holds 1/N of them at rest
    and one block's worth in flight. ``root`` (whose forward must run the blocks) keeps
    everything else (embeddings, final norm, head) in one unit that its forward
    gathers and *keeps* gathered, so callers can use those parameters after the
    forward (an LM head applied chunk by chunk); call ``root.reshard()`` when done.
    Every process must call ``root`` the same number of times (the all-gathers are
    collective). Without a process group ``root`` is returned as is."""
    if not _grouped():
        return root
    for p in root.parameters():
        p.requires_grad_(False)
    return _shard_blocks(root, blocks)


def shard_for_training(root: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    """FSDP2 for a student trained with parameters used outside ``root``'s forward.

    The units are those of :func:`shard_for_inference`: one per block, and ``root``
    holding the rest, left gathered after its forward so the LM head can be applied
    chunk by chunk after it. The backward pass reduce-scatters every unit's gradients
    (the head's included: FSDP's end-of-backward callback runs after the loss's own
    backward), leaving each process 1/N of the gradients and, through an optimizer
    built from the sharded parameters, 1/N of the optimizer state."""
    if not _grouped():
        return root
    return _shard_blocks(root, blocks)


def shard_step(root: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    """FSDP2 for a module whose forward computes the whole loss (every trainable
    parameter used inside it): a unit per block, gathered for its forward and backward,
    and ``root`` holding the rest, gathered for ``root``'s forward. To run the model
    outside ``root`` (evaluation), call ``root.unshard()`` first and ``root.reshard()``
    after, on every process alike."""
    if not _grouped():
        return root
    return _shard_blocks(root, blocks, keep_root=False)


def _shard_blocks(root: nn.Module, blocks: list[nn.Module], keep_root: bool = True) -> nn.Module:
    """A unit per block (gathered for its forward, and again for its backward), then
    ``root`` with the rest, left gathered after its forward when ``keep_root``."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # a transformers body returns its hidden states as a view; the callers here only
    # index them (a copy) and never write into them, which is what FSDP warns about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    for b in blocks:
        fully_shard(b, reshard_after_forward=True)
    return fully_shard(root, reshard_after_forward=not keep_root)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (a sharded parameter counts
    its local shard only; a tied parameter once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights of ``model`` (whatever :func:`wrap` did to it), on CPU."""
    if state().fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # every process gets the whole weights (cpu_offload would give them to rank 0 only)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() for k, v in full.items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def train_state(net: nn.Module, opt) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU; collective under FSDP."""
    if state().fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(
            net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, opt.state_dict()


def load_train_state(net: nn.Module, opt, msd: dict, osd: dict) -> None:
    """Inverse of :func:`train_state` (collective under FSDP)."""
    if state().fsdp:
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


def no_sync(net: nn.Module | None, last: bool):
    """A context: gradient all-reduce only on a step's last micro-batch (DDP, FSDP2)."""
    import contextlib

    if last or net is None:
        return contextlib.nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def off():
            net.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                net.set_requires_gradient_sync(True)

        return off()
    return contextlib.nullcontext()
