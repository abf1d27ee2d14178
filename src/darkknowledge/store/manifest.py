"""The manifest's schema, and the checks that hold a store's files to it.

One pydantic model covers every manifest the labeller writes (dense, top-k, head,
sampled, the
top-k stores ``dk store from-api`` builds, stored hidden layers; unfinished and
finished). It is strict: unknown keys, missing keys, signal names that do not exist,
sizes that are not positive and facts that contradict each other (a ``k`` on a dense
store, a fingerprint that names another signal, shard rows that do not add up) are
refused with one line naming the key. Shard and side files are plain file names inside
the store folder; :func:`store_file` also refuses links that lead out of it.
:func:`check_shard` compares a shard's safetensors header with what the manifest says
it holds (tensor names, dtypes, shapes), before any of its data is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from ..errors import DKError
from .format import FORMAT, SHARDS

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Signal = Literal["dense", "topk", "head", "sampled"]
Dtype = Literal["fp32", "fp16", "bf16", "q8"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def _plain_name(v: str) -> str:
    """A file name inside the store: no folder, no absolute path, no ``..``."""
    if not _NAME.match(v) or v in (".", "..") or ".." in v:
        raise ValueError(
            f"{v!r} is not a plain file name inside the store folder "
            "(no absolute path, no '..', no '/')"
        )
    return v


FileName = Annotated[str, AfterValidator(_plain_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ShardEntry(_Strict):
    file: FileName  # in STORE/shards/
    rows: PosInt
    bytes: PosInt
    sha256: Hex64


class FileEntry(_Strict):
    """A file stored once beside the manifest (the tail prior)."""

    file: FileName
    bytes: PosInt
    sha256: Hex64


class HeadEntry(FileEntry):
    """The teacher's output layer of a head store: weight (V, H), optional bias (V,)."""

    layer: str
    shape: Annotated[list[PosInt], Field(min_length=2, max_length=2)]
    bias: bool


class SpecRecord(_Strict):
    """The labelling settings as run (``LabelSpec``); informational, checked for agreement."""

    signal: Signal
    k: PosInt | None
    dtype: Dtype
    temperature: PosFloat
    shard_size: PosInt
    batch_size: PosInt
    hidden: list[str]
    tail_prior: bool | None = None  # absent in stores labelled before the tail prior
    head_layer: str | None = None  # absent in stores labelled before head stores
    seed: NonNegInt | None = None  # absent in stores labelled before sampled stores


class Fingerprint(_Strict):
    teacher: Hex64
    data: Hex64
    example_ids: Hex64
    preprocessing: Hex64
    tokenizer: str | None
    signal: Signal
    temperature: PosFloat | None
    k: PosInt | None
    dtype: Dtype
    hidden: list[str]
    tail_prior: Literal[True] | None = None  # present (true) only when the store has one
    head_layer: str | None = None  # head stores only
    seed: NonNegInt | None = None  # sampled stores only: the draws' seed


class Manifest(_Strict):
    format: Literal["darkknowledge.store/v1"]
    complete: bool
    task: Literal["classification", "sequence"]
    vocab: PosInt
    num_examples: PosInt
    shard_size: PosInt
    batch_size: PosInt
    signal: Signal
    k: PosInt | None
    dtype: Dtype
    temperature: PosFloat | None
    fingerprint: Fingerprint
    preprocessing: dict[str, Any]
    describe: dict[str, Any]
    # the recipe sections the store was labelled from (`dk label`): teacher and data
    recipe: dict[str, Any] | None = None
    shards: list[ShardEntry]
    # written when the store is complete
    num_positions: NonNegInt | None = None
    hidden: dict[str, list[PosInt]] | None = None
    spec: SpecRecord | None = None
    tail_prior: FileEntry | None = None
    head: HeadEntry | None = None
    # a store of sampled responses (``dk store from-api``): each example's key, the prompt
    # id and sample index it joins to, in example-id order; and its token ids, once
    keys: list[Annotated[list[str | int], Field(min_length=2, max_length=2)]] | None = None
    inputs: FileEntry | None = None

    @model_validator(mode="after")
    def _consistent(self):
        _agree(self)
        return self


def _agree(m: Manifest) -> None:
    """Facts that must agree with each other (ValueError naming the key)."""
    if m.signal == "topk":
        if m.k is None or m.temperature is None:
            raise ValueError("a top-k store needs k and temperature")
        if m.k > m.vocab:
            raise ValueError(f"k: {m.k} is more than vocab {m.vocab}")
    elif m.signal == "sampled":
        if m.k is None or m.temperature is None:
            raise ValueError("a sampled store needs k (draws per position) and temperature")
        if m.k > 65535:
            raise ValueError(f"k: {m.k} draws, more than the 65535 a uint16 count holds")
        if m.tail_prior is not None:
            raise ValueError("tail_prior: set on a sampled store (top-k stores only)")
    else:
        for key in ("k", "temperature", "tail_prior"):
            if getattr(m, key) is not None:
                raise ValueError(f"{key}: set on a {m.signal} store (top-k stores only)")
    if m.dtype == "q8" and m.signal != "topk":
        raise ValueError(f"dtype: q8 is for top-k stores, not {m.signal}")
    fp = m.fingerprint
    if (fp.seed is not None) != (m.signal == "sampled"):
        raise ValueError(f"fingerprint.seed: {fp.seed!r} on a {m.signal} store")
    for key in ("signal", "k", "dtype", "temperature"):
        if getattr(fp, key) != getattr(m, key):
            raise ValueError(
                f"fingerprint.{key}: {getattr(fp, key)!r} contradicts {key} {getattr(m, key)!r}"
            )
    if (fp.head_layer is not None) != (m.signal == "head"):
        raise ValueError(f"fingerprint.head_layer: {fp.head_layer!r} on a {m.signal} store")
    if (fp.tail_prior is True) != (m.tail_prior is not None) and m.complete:
        raise ValueError("fingerprint.tail_prior and tail_prior disagree")
    if not m.complete:
        if m.shards:
            raise ValueError("shards: listed in an unfinished store (written when it is complete)")
        return
    for key in ("num_positions", "hidden", "spec"):
        if getattr(m, key) is None:
            raise ValueError(f"{key}: missing (a complete store has it)")
    if m.signal == "head" and m.head is None:
        raise ValueError("head: missing (a head store keeps its output layer)")
    if m.keys is not None:
        if len(m.keys) != m.num_examples:
            raise ValueError(f"keys: {len(m.keys)} keys for {m.num_examples} examples")
        for k in m.keys:
            if not (isinstance(k[0], str) and len(k[0]) <= 1000) or not (
                isinstance(k[1], int) and not isinstance(k[1], bool) and k[1] >= 0
            ):
                raise ValueError(f"keys: {k!r} is not a [prompt id, sample index ≥ 0] pair")
        if len({tuple(k) for k in m.keys}) != len(m.keys):
            raise ValueError("keys: a (prompt id, sample) key is given twice")
        if m.task != "sequence" or m.inputs is None:
            raise ValueError("keys: only a sequence store with its inputs has keys")
    if m.signal != "head" and m.head is not None:
        raise ValueError(f"head: set on a {m.signal} store (head stores only)")
    if m.head is not None:
        if m.head.shape[0] != m.vocab:
            raise ValueError(f"head.shape: {m.head.shape} has not the vocab's {m.vocab} rows")
        if fp.head_layer != m.head.layer:
            raise ValueError(f"head.layer: {m.head.layer!r} contradicts fingerprint.head_layer")
    if sorted(m.hidden) != fp.hidden:
        raise ValueError(f"hidden: {sorted(m.hidden)} contradicts fingerprint.hidden {fp.hidden}")
    s = m.spec
    for key in ("signal", "dtype", "shard_size", "batch_size"):
        if getattr(s, key) != getattr(m, key):
            raise ValueError(f"spec.{key}: {getattr(s, key)!r} contradicts {key}")
    if m.signal in ("topk", "sampled") and (s.k, s.temperature) != (m.k, m.temperature):
        raise ValueError("spec.k / spec.temperature contradict k / temperature")
    if m.signal == "sampled" and s.seed != fp.seed:
        raise ValueError(f"spec.seed: {s.seed!r} contradicts fingerprint.seed {fp.seed!r}")
    if sorted(s.hidden) != fp.hidden:
        raise ValueError("spec.hidden contradicts fingerprint.hidden")
    n_shards = math.ceil(m.num_examples / m.shard_size)
    if len(m.shards) != n_shards:
        raise ValueError(
            f"shards: {len(m.shards)} listed, {m.num_examples} examples in shards of "
            f"{m.shard_size} make {n_shards}"
        )
    seen = set()
    for i, sh in enumerate(m.shards):
        want = min(m.shard_size, m.num_examples - i * m.shard_size)
        if sh.rows != want:
            raise ValueError(f"shards[{i}].rows: {sh.rows}, the layout gives {want}")
        if sh.file in seen:
            raise ValueError(f"shards[{i}].file: {sh.file!r} is listed twice")
        seen.add(sh.file)
    if m.task == "classification" and m.num_positions != m.num_examples:
        raise ValueError(
            f"num_positions: {m.num_positions}, a classifier store has one per example"
        )


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "missing key"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    loc = _loc(err["loc"])
    return f"{loc}: {msg}" if loc else msg


def parse_manifest(raw: Any, where: str | Path) -> Manifest:
    """``raw`` (the JSON object of a manifest) as a :class:`Manifest`, or one DKError."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DKError(f"{where}: not a {FORMAT} manifest")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise DKError(
            f"{where}: invalid manifest: {_message(e)}; relabel the store (`dk label --force`)"
        ) from None


def store_file(root: Path, rel: str, what: str) -> Path:
    """``root/rel`` after checking that it stays inside ``root`` (links resolved)."""
    path = root / rel
    real_root = root.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop
        raise DKError(f"{path}: {what} cannot be resolved (a link loop?)") from None
    if not real.is_relative_to(real_root):
        raise DKError(
            f"{path}: {what} leads outside the store folder (a link out of it); "
            "a store reads only its own files"
        )
    return path


def shard_path(root: Path, file: str) -> Path:
    """A shard listed in a validated manifest (a plain name), checked for links out."""
    return store_file(root, f"{SHARDS}/{file}", f"shard {file}")


# ---------------------------------------------------------------- shard headers

_FLOAT = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def expected_tensors(m: Manifest, rows: int, t: int | None) -> dict[str, tuple[str, tuple]]:
    """Tensor name → (safetensors dtype, shape) that a shard of ``rows`` rows holds;
    ``t`` is the sequence length (None for classifiers)."""
    lead = (rows,) if t is None else (rows, t)
    fdt = _FLOAT.get(m.dtype, "F32")
    out: dict[str, tuple[str, tuple]] = {"ids": ("I64", (rows,))}
    if m.signal == "dense":
        out["logits"] = (fdt, (*lead, m.vocab))
    elif m.signal == "head":
        out["head_hidden"] = (fdt, (*lead, m.head.shape[1] if m.head else -1))
    elif m.signal == "sampled":
        out["sample_ids"] = ("U16" if m.vocab <= 65536 else "I32", (*lead, m.k))
        out["sample_counts"] = ("U8" if m.k <= 255 else "U16", (*lead, m.k))
    else:
        out["topk_ids"] = ("U16" if m.vocab <= 65536 else "I32", (*lead, m.k))
        out["topk_logprobs"] = ("U8" if m.dtype == "q8" else fdt, (*lead, m.k))
        out["tail_mass"] = ("F32", lead)
    if t is not None:
        out["mask"] = ("U8", (rows, t))
    for name, dims in (m.hidden or {}).items():
        out[f"hidden.{name}"] = (fdt, (rows, *dims))
    return out


def check_shard(header: dict, m: Manifest, rows: int, path: Path, t: int | None) -> int | None:
    """Refuse a shard whose header disagrees with the manifest (one line naming the
    tensor). Returns the sequence length it holds (None for classifiers), which every
    shard of a store shares: pass the first shard's as ``t`` for the others."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if m.task == "sequence":
        mask = tensors.get("mask")
        if mask is None or len(mask["shape"]) != 2:
            raise DKError(f"{path}: a sequence store's shard has no (rows, T) mask")
        if t is None:
            t = mask["shape"][1]
    want = expected_tensors(m, rows, t)
    for name in tensors:
        if name not in want:
            raise DKError(f"{path}: holds tensor {name!r}, which the manifest does not describe")
    for name, (dtype, shape) in want.items():
        got = tensors.get(name)
        if got is None:
            raise DKError(f"{path}: tensor {name!r} is missing (the manifest says it is there)")
        if got["dtype"] != dtype or tuple(got["shape"]) != shape:
            raise DKError(
                f"{path}: tensor {name!r} is {got['dtype']} {list(got['shape'])}, the manifest "
                f"says {dtype} {list(shape)}"
            )
    return t


def check_side_file(header: dict, want: dict[str, tuple[str, tuple]], path: Path) -> None:
    """The tail prior's or output layer's header against what the manifest says."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(tensors) != set(want):
        raise DKError(f"{path}: holds {sorted(tensors)}, the manifest says {sorted(want)}")
    for name, (dtypes, shape) in want.items():
        got = tensors[name]
        if got["dtype"] not in dtypes or tuple(got["shape"]) != shape:
            raise DKError(
                f"{path}: tensor {name!r} is {got['dtype']} {list(got['shape'])}, "
                f"the manifest says {list(shape)}"
            )
