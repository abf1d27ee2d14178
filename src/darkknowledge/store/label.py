"""Labelling: run a teacher once over fixed inputs and write its signals to a store.

Resumable and crash-safe. Shard ``i`` always holds rows ``[i·S, (i+1)·S)`` computed in
the same batches, and is written atomically; a rerun skips the shards that exist and
computes the rest, so a store finished after any number of kills is byte-identical to
one written in a single run.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from .. import dist, faults
from ..console import Progress
from ..errors import DKError
from ..signals import Batch, Teacher
from . import fingerprint as fp
from .folder import check_store_folder, commit_replaced, replace_store
from .format import (
    FLOAT_DTYPES,
    FORMAT,
    HEAD,
    INPUTS,
    MANIFEST,
    PRIOR,
    SHARDS,
    quantize_q8,
    read_header,
    remember_verified,
    sha256_file,
    shard_name,
    write_json,
    write_shard,
)
from .manifest import parse_manifest
from .reader import SignalStore, read_manifest
from .select import (
    ChunkedLogits,
    head_filler,
    logits_filler,
    row_groups,
    sample_signals,
    topk_signals,
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpec:
    """What to store. ``signal='auto'`` (the default): dense for up to 256 outputs;
    otherwise ``head`` when the teacher has a linear output layer and its input costs no
    more bytes per example/token than the top-k signal would, else ``topk``. ``signal='topk'`` keeps the ``k`` most probable classes/tokens,
    their log-probabilities at ``temperature`` and the tail mass 1 − Σ top-k; ``'dense'``
    keeps all logits (raw, so any loss temperature works). ``dtype`` is the storage type
    of the float signals: fp32, fp16, bf16, or q8 (top-k log-probs in 8 bits, 0.1-nat
    steps); ``auto`` picks fp16 for dense and q8 for top-k. ``hidden`` names teacher layers whose outputs are stored too.

    ``signal='head'`` (token teachers with a linear output layer): the input of that
    layer, i.e. the teacher's last hidden state ``(…, H)``, plus the layer's weight and
    bias stored once; the reader recomputes the exact logits as ``h·Wᵀ + b``. Per token
    it costs ``2·H`` bytes in fp16 whatever the vocabulary, and labelling skips the
    output layer. ``head_layer`` names the layer (None: the model's output embeddings,
    or its only ``nn.Linear`` with as many outputs as the logits).

    ``signal='sampled'`` (Anshumann et al. 2025, "Sparse Logit Sampling"): per
    example/position, ``k`` draws with replacement from the teacher's distribution at
    ``temperature``, kept as the distinct ids drawn and their counts (width ``k``: ids
    padded with 0, counts 0 there). The draws are seeded by ``seed`` and the shard index,
    so a rerun or a resume writes the same bytes. ``c_i/k`` weights give an unbiased
    estimate of the soft cross-entropy / forward KL (:mod:`darkknowledge.losses.sampled`).
    ``dtype`` is then only the storage type of stored hidden layers."""

    signal: str = "auto"
    k: int | None = 64
    dtype: str = "auto"  # fp16 for dense, q8 for top-k
    temperature: float = 1.0
    shard_size: int = 8192
    batch_size: int = 512
    hidden: tuple[str, ...] = ()
    # top-k only: also measure the tail prior (how the mass outside the top-k is spread
    # over the other outputs, averaged over the store). None: on for token sequences.
    tail_prior: bool | None = None
    head_layer: str | None = None  # signal='head' only
    seed: int = 0  # signal='sampled' only: the draws' seed

    def __post_init__(self):
        if self.dtype == "auto" and self.signal != "auto":
            object.__setattr__(self, "dtype", "q8" if self.signal == "topk" else "fp16")

    def validate(self, vocab: int | None = None) -> None:
        if self.signal not in SIGNALS:
            raise DKError(
                f"label.signal must be auto, dense, topk, head or sampled, not {self.signal!r}"
            )
        if self.dtype not in (*FLOAT_DTYPES, "q8") and not (self.signal == self.dtype == "auto"):
            raise DKError(f"label.dtype must be fp32, fp16, bf16 or q8, not {self.dtype!r}")
        if self.signal in ("dense", "head", "sampled") and self.dtype == "q8":
            raise DKError(
                f"label.dtype=q8 is for top-k log-probabilities; use fp16 for {self.signal}"
            )
        if self.head_layer and self.signal not in ("head", "auto"):
            raise DKError("label.head_layer applies to signal=head only")
        if self.signal in ("topk", "auto"):
            if not self.k or self.k < 1:
                raise DKError("label.k must be ≥ 1 for top-k signals")
            if vocab is not None and self.k >= vocab and self.signal == "topk":
                raise DKError(
                    f"label.k={self.k} but the teacher has only {vocab} outputs: "
                    "use label.signal=dense (it is no larger) or a smaller k"
                )
        if self.signal == "sampled":
            if not self.k or not 1 <= self.k <= MAX_DRAWS:
                raise DKError(f"label.k (draws per position) must be in [1, {MAX_DRAWS}]")
            if self.seed < 0:
                raise DKError(f"label.seed must be ≥ 0, not {self.seed}")
        if self.signal in ("dense", "head") and self.temperature != 1.0:
            raise DKError(
                f"label.temperature applies to top-k and sampled signals; {self.signal} stores keep raw "
                "logits, which serve every loss temperature: leave it at 1.0"
            )

    def fields(self) -> dict:
        out = {
            "signal": self.signal,
            "temperature": self.temperature if self.signal in ("topk", "sampled") else None,
            "k": self.k if self.signal in ("topk", "sampled") else None,
            "dtype": self.dtype,
            "hidden": sorted(self.hidden),
        }
        if self.tail_prior:  # only present when on: older stores' fingerprints still match
            out["tail_prior"] = True
        if self.signal == "head":
            out["head_layer"] = self.head_layer
        if self.signal == "sampled":
            out["seed"] = self.seed
        return out


SIGNALS = ("auto", "dense", "topk", "head", "sampled")
MAX_DRAWS = 65535  # sampled: counts are stored as uint8 (k ≤ 255) or uint16


def default_k(signal: str) -> int:
    """``label.k`` when the recipe leaves it out: 16 draws (sampled), else top-64."""
    return 16 if signal == "sampled" else 64


def base_fingerprint(teacher: Teacher, x: Tensor, ids: Tensor) -> dict:
    """The fields computable from the teacher and the inputs themselves."""
    mods = getattr(teacher, "modules", list)()
    extra = {"class": type(teacher).__name__}
    for attr in ("combine",):
        if hasattr(teacher, attr):
            extra[attr] = getattr(teacher, attr)
    if hasattr(teacher, "weights") and isinstance(teacher.weights, Tensor):
        extra["weights"] = teacher.weights.tolist()
    return {
        "teacher": fp.modules_digest(mods, extra),
        "data": fp.tensor_digest(x),
        "example_ids": fp.tensor_digest(ids),
    }


def label(
    teacher: Teacher,
    x: Tensor,
    ids: Tensor,
    out: str | Path,
    spec: LabelSpec | None = None,
    *,
    mask: Tensor | None = None,
    preprocessing: dict | None = None,
    tokenizer: str | None = None,
    describe: dict | None = None,
    recipe: dict | None = None,
    keys: list[tuple[str, int]] | None = None,
    store_inputs: bool = False,
    force: bool = False,
    progress: bool = True,
) -> SignalStore:
    """Label inputs ``x (N, ...)`` with example ids ``ids (N,)`` into the store ``out``.

    Classification: the teacher returns logits ``(B, V)``. Token sequences: ``x (N, T)``
    token ids with ``mask (N, T)`` of valid positions; the teacher returns ``(B, T, V)``.
    ``preprocessing`` (a JSON-able description) and ``tokenizer`` (a digest, e.g. from
    :func:`~darkknowledge.store.fingerprint.files_digest`) enter the fingerprint.
    ``recipe`` (``dk label``: the recipe's teacher and data sections) is kept in the
    manifest, so that a later ``dk label`` into the same folder can compare it.
    ``store_inputs`` (token sequences): keep ``x`` and ``ids`` once, in ``inputs.safetensors``
    (a store of sampled responses needs its tokens to join them to training data);
    ``keys``: each example's (prompt id, sample index), in the order of ``x``.
    An interrupted call is continued by calling it again with the same arguments.
    ``force``: replace the store in ``out``, which must be one this tool made (see
    :mod:`.folder`); the old one is moved aside and deleted at the first new shard (a
    caller whose labelling fails before that puts it back with
    :func:`.folder.restore_replaced`, as ``dk`` does).
    """
    spec = spec or LabelSpec()
    out = Path(out)
    n = len(x)
    if len(ids) != n or (mask is not None and mask.shape != x.shape[: mask.dim()]):
        raise DKError("label: x, ids and mask must have the same number of examples")
    if n == 0:
        raise DKError("label: nothing to label (0 examples)")
    if len(torch.unique(ids)) != n:
        raise DKError("label: example ids must be unique")
    task = "sequence" if mask is not None else "classification"
    fingerprint = base_fingerprint(teacher, x, ids)
    fingerprint["preprocessing"] = fp.json_digest(preprocessing or {})
    fingerprint["tokenizer"] = tokenizer
    n_shards = math.ceil(n / spec.shard_size)
    layout = {"num_examples": n, "shard_size": spec.shard_size, "batch_size": spec.batch_size}

    # One batch first: it gives V (to validate k) and checks the teacher's output shape;
    # the inputs its linear layers saw let the output layer be checked without another run
    # For token sequences, only the first window's first PROBE_POSITIONS (a causal teacher's
    # logits there are those of the whole window; the probe and the output layer's check
    # are a fixed cost of every store), unless the teacher refuses a prefix
    prefix = task == "sequence" and x.dim() == 2 and x.shape[1] > PROBE_POSITIONS
    try:
        probe, seen = _probe(
            teacher, Batch(x[:1, :PROBE_POSITIONS] if prefix else x[:1], None, ids[:1])
        )
    except Exception:  # a teacher that needs whole windows: probe with the first one
        if not prefix:
            raise
        probe, seen = _probe(teacher, Batch(x[:1], None, ids[:1]))
    if probe is None:
        raise DKError("label: the teacher gave no logits")
    vocab = int(probe.shape[-1])
    spec.validate(vocab)
    head_mod = None  # signal='head': the teacher's output layer, checked once
    if spec.signal == "auto":
        spec, head_mod = _auto_signal(spec, teacher, vocab, probe, seen)
        spec.validate(vocab)
    if spec.tail_prior and spec.signal != "topk":
        raise DKError("label.tail_prior applies to top-k signals only")
    if spec.tail_prior is None:
        spec = replace(spec, tail_prior=spec.signal == "topk" and task == "sequence")
    if spec.signal == "head" and head_mod is None:
        name, head_mod = _find_head(teacher, spec.head_layer, vocab)
        spec = replace(spec, head_layer=name)
        _check_head(head_mod, name, seen, probe)
    # top-k and sampled signals: from the output layer's input, one vocabulary chunk of
    # logits at a time, when the logits are that layer's output (else from the logits)
    fused = _fusable_head(spec, teacher, vocab, probe, seen)
    del seen
    fingerprint.update(spec.fields())
    head = {
        "format": FORMAT,
        "task": task,
        "vocab": vocab,
        **layout,
        **{k: spec.fields()[k] for k in ("signal", "k", "dtype", "temperature")},
        "fingerprint": fingerprint,
        "preprocessing": preprocessing or {},
        "describe": describe or {},
    }
    if recipe is not None:
        head["recipe"] = recipe
    if keys is not None:
        if not store_inputs or len(keys) != n:
            raise DKError("label: keys need store_inputs and one key per example")
        head["keys"] = [[str(a), int(b)] for a, b in keys]
    shard_dir = out / SHARDS
    # process 0 checks and prepares the folder; under a launcher the others wait for it
    if dist.on_main(_prepare, out, head, layout, force):
        return SignalStore(out)  # already complete

    # each process labels its contiguous range of shards (all of them in one process)
    todo = [
        i
        for i in dist.shard_range(n_shards)
        if not _shard_ok(shard_dir / shard_name(i))
        or (spec.tail_prior and not _shard_ok(shard_dir / tailsum_name(i)))
    ]
    mine = sum(min(spec.shard_size, n - i * spec.shard_size) for i in dist.shard_range(n_shards))
    bar = Progress(
        mine,
        mine - sum(min(spec.shard_size, n - i * spec.shard_size) for i in todo),
        f"label {out.name}",
        unit="example",
        enabled=progress and dist.is_main(),
        logger=_log,
    )
    done = bar.n
    chunks = ChunkedLogits()  # one buffer for every batch's logits chunks
    with (
        _hidden_hooks(teacher, spec.hidden) as captured,
        _skip_head(head_mod or fused, captured),
    ):
        for i in todo:
            lo, hi = i * spec.shard_size, min((i + 1) * spec.shard_size, n)
            parts: list[dict[str, Tensor]] = []
            tail_sum = torch.zeros(vocab, dtype=torch.float64) if spec.tail_prior else None
            gen = _shard_generator(spec, i)  # sampled: the same draws after any resume
            for b in range(lo, hi, spec.batch_size):
                e = min(b + spec.batch_size, hi)
                captured.clear()
                sig = teacher.signals(Batch(x[b:e], None, ids[b:e]))
                m = None if mask is None else mask[b:e]
                parts.append(_encode(sig.logits, spec, vocab, captured, m, gen, fused, chunks))
                if tail_sum is not None:  # the sum stays on the CPU, the teacher anywhere
                    tail_sum += parts[-1].pop("tail_sum").cpu()
                done += e - b
                bar.update(done)
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if tail_sum is not None:  # before the shard: a shard implies its tail sum
                write_shard(shard_dir / tailsum_name(i), {"tail_sum": tail_sum})
            tensors["ids"] = ids[lo:hi].to(torch.int64)
            if mask is not None:
                tensors["mask"] = mask[lo:hi].to(torch.uint8)
            write_shard(shard_dir / shard_name(i), tensors)
            faults.point("shard")
            if dist.is_main():
                commit_replaced(out)  # a store it replaced (--force) can go now
    bar.close()
    dist.barrier()  # every shard is on disk
    positions = int(mask.sum()) if mask is not None else n
    inputs = (x, ids) if store_inputs else None
    dist.on_main(_finish, out, head, spec, n, n_shards, positions, head_mod, inputs)
    if dist.is_main():
        commit_replaced(out)
    return SignalStore(out)


def _prepare(out: Path, head: dict, layout: dict, force: bool) -> bool:
    """Check ``out`` against the labelling and make it ready; True if already complete."""
    shard_dir = out / SHARDS
    if force:  # the old store moves aside (deleted at the first new shard), or refused
        replace_store(out)
    else:
        check_store_folder(out, force)
    if (out / MANIFEST).exists() and not force:
        old = read_manifest(out)
        for key in ("fingerprint", "task", "vocab", *layout):
            if old.get(key) != head[key]:
                what = (
                    f"fingerprint field '{fp.first_difference(old[key], head[key])}'"
                    if key == "fingerprint"
                    else f"'{key}'"
                )
                raise DKError(
                    f"{out}: holds a store for a different labelling ({what} differs); "
                    "use --force to replace it or --out for a new store"
                )
        if old.get("complete"):
            return True
    elif out.exists() and any(out.iterdir()) and not force:
        if any((out / SHARDS).glob("*.safetensors")):
            raise DKError(f"{out}: has shards but no manifest; use --force to relabel")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():  # first, so shards never exist without a manifest
        _write_manifest(out, {**head, "complete": False, "shards": []})
    shard_dir.mkdir(exist_ok=True)
    for tmp in [*shard_dir.glob("*.tmp"), *out.glob("*.tmp")]:  # being written at a kill
        tmp.unlink()
    return False


def _finish(
    out: Path,
    head: dict,
    spec: LabelSpec,
    n: int,
    n_shards: int,
    positions: int,
    head_mod: nn.Linear | None = None,
    inputs: tuple[Tensor, Tensor] | None = None,
):
    """The complete manifest: every shard's size and SHA-256."""
    shard_dir = out / SHARDS
    shards = []
    for i in range(n_shards):
        f = shard_dir / shard_name(i)
        rows = min(spec.shard_size, n - i * spec.shard_size)
        shards.append(
            {"file": f.name, "rows": rows, "bytes": f.stat().st_size, "sha256": _hashed(f)}
        )
    prior = {}
    if spec.tail_prior:
        total = torch.zeros(head["vocab"], dtype=torch.float64)
        for i in range(n_shards):  # in shard order: the same sum after any resume
            total += load_file(str(shard_dir / tailsum_name(i)))["tail_sum"]
        pri = (total / total.sum().clamp_min(1e-300)).clamp_min(1e-20)
        f = out / PRIOR
        write_shard(f, {"tail_log_prior": pri.log().to(torch.float16)})
        prior = {"tail_prior": {"file": f.name, "bytes": f.stat().st_size, "sha256": _hashed(f)}}
    if head_mod is not None:  # the output layer, once, in the store's dtype
        f = out / HEAD
        tensors = {"weight": head_mod.weight.detach().to(FLOAT_DTYPES[spec.dtype])}
        if head_mod.bias is not None:
            tensors["bias"] = head_mod.bias.detach().to(FLOAT_DTYPES[spec.dtype])
        write_shard(f, tensors)
        prior["head"] = {
            "file": f.name,
            "layer": spec.head_layer,
            "shape": list(head_mod.weight.shape),
            "bias": head_mod.bias is not None,
            "bytes": f.stat().st_size,
            "sha256": _hashed(f),
        }
    if inputs is not None:  # the token ids, once (int32) with their example ids
        f = out / INPUTS
        write_shard(f, {"input_ids": inputs[0].to(torch.int32), "example_ids": inputs[1].long()})
        prior["inputs"] = {"file": f.name, "bytes": f.stat().st_size, "sha256": _hashed(f)}
    hidden_dims = {}
    if spec.hidden:
        header, _ = read_header(shard_dir / shard_name(0))
        hidden_dims = {h: header[f"hidden.{h}"]["shape"][1:] for h in spec.hidden}
    _write_manifest(
        out,
        {
            **head,
            "complete": True,
            "num_positions": positions,
            "hidden": hidden_dims,
            "shards": shards,
            "spec": asdict(spec) | {"hidden": list(spec.hidden)},
            **prior,
        },
    )
    for i in range(n_shards):  # folded into the prior; the finished store no longer needs them
        (shard_dir / tailsum_name(i)).unlink(missing_ok=True)


def _hashed(f: Path) -> str:
    """SHA-256 of a file this process just wrote; opening the store will not hash it again."""
    digest = sha256_file(f)
    remember_verified(f, digest)
    return digest


def _write_manifest(out: Path, manifest: dict) -> None:
    """Write a manifest after checking it against the schema every reader applies."""
    parse_manifest(json.loads(json.dumps(manifest)), out / MANIFEST)  # as a reader sees it
    write_json(out / MANIFEST, manifest)


def _shard_ok(path: Path) -> bool:
    """A shard exists whole (renamed into place) — its header must still parse."""
    if not path.exists():
        return False
    try:
        read_header(path)
    except DKError:
        path.unlink()
        return False
    return True


def tailsum_name(i: int) -> str:
    return f"tailsum-{i:05d}.safetensors"


def _shard_generator(spec: LabelSpec, i: int) -> torch.Generator | None:
    """The random draws of shard ``i`` of a sampled store: seeded by (seed, i) only, so
    they do not depend on which process labels the shard or on what ran before."""
    if spec.signal != "sampled":
        return None
    return torch.Generator().manual_seed(spec.seed * 1_000_003 + i)


def sample_counts(
    logits: Tensor, k: int, temperature: float, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``k`` draws with replacement from ``softmax(logits / temperature)`` per row of
    ``logits (..., V)``, as (distinct ids ``(..., k)`` int64 in increasing order, their
    counts ``(..., k)`` int64); slots past the distinct ids hold id 0 with count 0."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    z = logits.detach().float().cpu().reshape(-1, vocab)
    draws = sample_signals(logits_filler(z), len(z), vocab, k, temperature, gen, ChunkedLogits())
    ids, counts = distinct_counts(draws)
    return ids.reshape(*lead, k), counts.reshape(*lead, k)


def distinct_counts(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Draws ``(R, k)`` → (distinct ids ``(R, k)`` in increasing order, their counts);
    slots past the distinct ids hold id 0 with count 0."""
    draws = draws.sort(dim=-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(-1) - 1  # (R, k): which distinct id each draw is
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)  # a slot's draws share one id
    return ids, counts


def _count_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 255 else torch.uint16


def _encode(
    logits: Tensor | None,
    spec: LabelSpec,
    vocab: int,
    hidden: dict,
    mask: Tensor | None = None,
    gen: torch.Generator | None = None,
    fused: nn.Linear | None = None,
    chunks: ChunkedLogits | None = None,
) -> dict:
    """Teacher logits ``(B, [T,] V)`` → the tensors one batch adds to a shard (and, with
    a tail prior, ``tail_sum (V,)``: Σ over valid positions of the probabilities outside
    each position's top-k, float64, which the caller takes out). ``gen``: the shard's
    random generator (sampled signals). ``fused``: the teacher's output layer, which
    did not run (its input is in ``hidden``): top-k and draws come from that input."""
    if fused is not None:
        h = hidden.pop(HEAD_INPUT)  # (B, [T,] H)
        if logits is None or h.shape[:-1] != logits.shape[:-1]:
            raise DKError("label: the teacher's output layer input changed shape between batches")
        lead, dev = h.shape[:-1], h.device
        fill = _head_fills(h.reshape(-1, h.shape[-1]), fused)
    elif spec.signal != "head" and (logits is None or logits.shape[-1] != vocab):
        raise DKError("label: the teacher's output size changed between batches")
    elif spec.signal in ("topk", "sampled"):
        lead, dev = logits.shape[:-1], logits.device
        z = logits.detach().float().reshape(-1, vocab)  # (R, V)
        fill = lambda lo, hi: logits_filler(z[lo:hi])  # noqa: E731
    chunks = chunks or ChunkedLogits()
    out: dict[str, Tensor] = {}
    if spec.signal == "head":
        out["head_hidden"] = hidden.pop(HEAD_INPUT).to(FLOAT_DTYPES[spec.dtype])  # (B, [T,] H)
    elif spec.signal == "dense":
        out["logits"] = logits.to(FLOAT_DTYPES[spec.dtype])  # (B, [T,] V)
    elif spec.signal == "sampled":
        rows = math.prod(lead)
        draws = torch.cat(
            [
                sample_signals(fill(lo, hi), hi - lo, vocab, spec.k, spec.temperature, gen, chunks)
                for lo, hi in row_groups(rows, vocab)
            ]
        )  # (R, k)
        ids, counts = distinct_counts(draws)
        out["sample_ids"] = ids.reshape(*lead, spec.k).to(_id_dtype(vocab))  # (B, [T,] k)
        out["sample_counts"] = counts.reshape(*lead, spec.k).to(_count_dtype(spec.k))
    else:
        rows = math.prod(lead)
        w = None
        if spec.tail_prior:  # positions enter the tail prior's sum with weight 1 (0 if masked)
            w = torch.ones(rows) if mask is None else mask.reshape(-1).float()
            w = w.to(dev)  # where the logits are made
        parts = [
            topk_signals(
                fill(lo, hi),
                hi - lo,
                vocab,
                spec.k,
                spec.temperature,
                None if w is None else w[lo:hi],
                chunks,
            )
            for lo, hi in row_groups(rows, vocab)
        ]
        vals = torch.cat([p["logprobs"] for p in parts]).reshape(*lead, spec.k)
        out["topk_ids"] = torch.cat([p["ids"] for p in parts]).reshape(*lead, spec.k)
        out["topk_ids"] = out["topk_ids"].to(_id_dtype(vocab))
        out["topk_logprobs"] = (
            quantize_q8(vals) if spec.dtype == "q8" else vals.to(FLOAT_DTYPES[spec.dtype])
        )
        out["tail_mass"] = torch.cat([p["tail"] for p in parts]).reshape(lead)
        if w is not None:
            out["tail_sum"] = sum(p["tail_sum"] for p in parts)
    fdt = torch.float32 if spec.dtype == "q8" else FLOAT_DTYPES[spec.dtype]
    for name, h in hidden.items():
        out[f"hidden.{name}"] = h.to(fdt)
    return out


def _head_fills(h: Tensor, head: nn.Linear):
    """``fill`` factories per row group for the output layer applied to ``h (R, H)``."""
    return lambda lo, hi: head_filler(h[lo:hi], head)


@contextmanager
def _hidden_hooks(teacher: Teacher, names: tuple[str, ...]):
    """Capture the outputs of the teacher's layers ``names`` into a dict per batch.

    With several teacher networks (an ensemble) a name is ``<member>.<layer>``."""
    captured: dict[str, Tensor] = {}
    if not names:
        yield captured
        return
    mods = getattr(teacher, "modules", list)()
    table = {}
    for i, m in enumerate(mods):
        for n, sub in m.named_modules():
            if n:
                table[n if len(mods) == 1 else f"{i}.{n}"] = sub
    handles = []
    for name in names:
        if name not in table:
            some = ", ".join(list(table)[:8])
            raise DKError(f"label.hidden: the teacher has no layer {name!r} (layers: {some}, ...)")

        def hook(_m, _inp, output, name=name):
            t = output[0] if isinstance(output, tuple) else output
            captured[name] = t.detach().float()  # (B, ...) as the layer gives it

        handles.append(table[name].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


HEAD_INPUT = "\0head"  # the key under which _skip_head puts the output layer's input


def _find_head(teacher: Teacher, name: str | None, vocab: int) -> tuple[str, nn.Linear]:
    """The teacher's output layer for ``signal='head'``: (its name, the module)."""
    mods = getattr(teacher, "modules", list)()
    if len(mods) != 1:
        raise DKError(
            "label.signal=head needs one teacher network with a linear output layer "
            f"(this teacher has {len(mods)}); use topk or dense"
        )
    (m,) = mods
    table = dict(m.named_modules())
    if name is not None:
        if name not in table:
            raise DKError(f"label.head_layer: the teacher has no layer {name!r}")
        found = table[name]
    else:
        get = getattr(m, "get_output_embeddings", None)
        found = get() if callable(get) else None
        if found is None:
            cands = [
                k for k, v in table.items() if isinstance(v, nn.Linear) and v.out_features == vocab
            ]
            if len(cands) != 1:
                raise DKError(
                    f"label.signal=head: found {len(cands)} nn.Linear layers with {vocab} "
                    "outputs; name the output layer with label.head_layer"
                )
            found = table[cands[0]]
        name = next(k for k, v in table.items() if v is found)
    if not isinstance(found, nn.Linear) or found.out_features != vocab:
        raise DKError(
            f"label.head_layer {name!r} is not an nn.Linear with {vocab} outputs; use topk or dense"
        )
    return name, found


PROBE_POSITIONS = 16  # token sequences: the probe reads the first window's first 16


def _probe(teacher: Teacher, batch: Batch) -> tuple[Tensor | None, dict[nn.Module, Tensor]]:
    """The teacher's logits on ``batch`` and, for a teacher of one network, the input
    each of its ``nn.Linear`` layers last received (what checks its output layer)."""
    seen: dict[nn.Module, Tensor] = {}
    mods = getattr(teacher, "modules", list)()
    linears = [m for m in mods[0].modules() if isinstance(m, nn.Linear)] if len(mods) == 1 else []
    hooks = [
        m.register_forward_hook(lambda mod, inp, _o: seen.__setitem__(mod, inp[0].detach()))
        for m in linears
    ]
    try:
        logits = teacher.signals(batch).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def _check_head(head: nn.Linear, name: str, seen: dict[nn.Module, Tensor], probe: Tensor) -> None:
    """Refuse a head store unless the teacher's logits ``probe`` are exactly its output
    layer applied to that layer's input (no soft-capping, scaling or mixing after it);
    ``seen``: the inputs of the teacher's linear layers in the same run (:func:`_probe`)."""
    if head not in seen:
        raise DKError(f"label.signal=head: the teacher's layer {name!r} was not called")
    again = F.linear(
        seen[head].float(), head.weight.float(), None if head.bias is None else head.bias.float()
    )
    scale = float(probe.abs().max().clamp_min(1.0))
    if again.shape != probe.shape or float((again - probe.float()).abs().max()) > 1e-3 * scale:
        raise DKError(
            f"label.signal=head: the teacher's logits are not its layer {name!r} applied to "
            "that layer's input (something acts after it); use topk or dense"
        )


def _fusable_head(
    spec: LabelSpec, teacher: Teacher, vocab: int, probe: Tensor, seen: dict
) -> nn.Linear | None:
    """For top-k and sampled signals: the teacher's output layer when its logits are
    exactly that layer's output and nothing else needs them (no stored output of that
    layer), else None (the signals are then computed from the logits)."""
    if spec.signal not in ("topk", "sampled"):
        return None
    try:
        name, head = _find_head(teacher, None, vocab)
        _check_head(head, name, seen, probe)
    except DKError:
        return None
    return None if name in spec.hidden else head


@contextmanager
def _skip_head(head: nn.Linear | None, captured: dict):
    """While labelling a head store (or top-k / sampled signals from the output layer's
    input): the output layer records its input and returns a (…, 1) placeholder, so its
    own vocabulary-sized product is never computed."""
    if head is None:
        yield
        return

    def forward(inp: Tensor) -> Tensor:
        captured[HEAD_INPUT] = inp.detach()
        return inp.new_zeros((*inp.shape[:-1], 1))

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _auto_signal(
    spec: LabelSpec, teacher: Teacher, vocab: int, probe: Tensor, seen: dict
) -> tuple[LabelSpec, nn.Linear | None]:
    """Resolve ``signal='auto'``: the exact formats when they are no larger. Returns the
    spec and, for a head store, the (already checked) output layer. ``replace`` resolves
    an ``auto`` dtype for the chosen signal (``LabelSpec.__post_init__``)."""
    if vocab <= 256:
        return replace(spec, signal="dense", k=None, temperature=1.0), None
    topk = replace(spec, signal="topk")
    if spec.temperature != 1.0 or spec.dtype == "q8" or spec.tail_prior:
        return topk, None
    try:
        name, head_mod = _find_head(teacher, spec.head_layer, vocab)
        _check_head(head_mod, name, seen, probe)
    except DKError:
        return topk, None
    head = replace(spec, signal="head", k=None, head_layer=name)
    # per position: H floats for the head store; K ids, K log-probs and the tail for top-k
    lp_bytes = 1 if topk.dtype == "q8" else FLOAT_DTYPES[topk.dtype].itemsize
    topk_bytes = spec.k * (_id_dtype(vocab).itemsize + lp_bytes) + 4
    if head_mod.in_features * FLOAT_DTYPES[head.dtype].itemsize <= topk_bytes:
        return head, head_mod
    return topk, None


def _id_dtype(vocab: int) -> torch.dtype:
    """How top-k token ids are stored."""
    return torch.uint16 if vocab <= 65536 else torch.int32
