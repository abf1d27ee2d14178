"""Reading a signal store: look signals up by example id, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DKError
from ..signals import Signals
from . import fingerprint as fp
from .format import MANIFEST, dequantize_q8, map_shard, read_header, to_torch, verify_file
from .manifest import (
    Manifest,
    check_shard,
    check_side_file,
    parse_manifest,
    shard_path,
    store_file,
)

PRELOAD_BYTES = 1 << 30  # stores up to this size are copied into RAM once at open
_FLOATS = ("F32", "F16", "BF16")


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store ``path``, checked against the schema (one-line DKError)."""
    return load_manifest(path)[0]


def load_manifest(path: str | Path) -> tuple[dict, Manifest]:
    """The manifest as read (a dict) and as validated (a :class:`Manifest`)."""
    path = Path(path)
    if not path.is_dir():
        raise DKError(f"{path}: no such store folder (make one with `dk label RECIPE.yaml`)")
    if not (path / MANIFEST).exists():
        raise DKError(f"{path}: not a signal store (no {MANIFEST}); make one with `dk label`")
    m = store_file(path, MANIFEST, MANIFEST)
    try:
        manifest = json.loads(m.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise DKError(f"{m}: not valid JSON; relabel the store with `dk label --force`") from None
    return manifest, parse_manifest(manifest, m)


class SignalStore:
    """A finished store, opened for lookups by example id.

    Opening reads the manifest (checked against the schema) and every shard's header
    (checked against the manifest), never the signals. Shards are memory-mapped; a store
    no larger than ``preload_bytes`` is also copied into RAM once, so each lookup is one
    gather (what keeps KD from a store as cheap as plain training).

    ``verify`` (the default): each shard's SHA-256 is checked against the manifest before
    its signals are first used, once per process: at open for a preloaded store, at the
    first lookup that reaches it otherwise; a damaged shard stops with one line naming
    it. ``verify=False`` (``dk store info``) hashes nothing; :meth:`verify_all` then
    checks every file at once.
    """

    def __init__(self, path: str | Path, preload_bytes: int = PRELOAD_BYTES, verify: bool = True):
        self.path = Path(path)
        self.manifest, spec = load_manifest(self.path)
        if not spec.complete:
            raise DKError(
                f"{self.path}: the store is unfinished (labelling was interrupted); "
                "rerun the same `dk label` command to finish it"
            )
        m = self.manifest
        self.fingerprint: dict = m["fingerprint"]
        self.signal: str = m["signal"]
        self.task: str = m["task"]
        self.k: int | None = m.get("k")
        self.vocab: int = m["vocab"]
        self.dtype: str = m["dtype"]
        self.temperature: float = m["temperature"]
        self.shard_size: int = m["shard_size"]
        self._verify = verify
        self._verified: set[int] = set()  # shards checked by this store
        self._files: list[Path] = []
        self._maps = []
        seq_len = None  # a sequence store's T, the same in every shard
        for s in spec.shards:
            f = shard_path(self.path, s.file)
            if not f.exists():
                raise DKError(f"{f}: shard listed in the manifest is missing; relabel the store")
            if f.stat().st_size != s.bytes:
                raise DKError(f"{f}: shard has {f.stat().st_size} bytes, manifest says {s.bytes}")
            header = read_header(f)
            seq_len = check_shard(header[0], spec, s.rows, f, seq_len)
            self._files.append(f)
            self._maps.append(map_shard(f, header))
        self.fields = sorted(k for k in (self._maps[0] if self._maps else {}) if k != "ids")
        ids = [to_torch(mp["ids"]) for mp in self._maps]
        self.ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)  # (N,)
        if len(self.ids) != m["num_examples"]:
            raise DKError(
                f"{self.path}: shards hold {len(self.ids)} rows, manifest says {m['num_examples']}"
            )
        self._sorted, self._order = torch.sort(self.ids)
        twice = (self._sorted[1:] == self._sorted[:-1]).nonzero()
        if len(twice):
            raise DKError(
                f"{self.path}: example id {int(self._sorted[int(twice[0])])} is in the store "
                "twice; the store is damaged, relabel it"
            )
        if seq_len is not None and spec.num_positions > len(self.ids) * seq_len:
            raise DKError(
                f"{self.path}: num_positions {spec.num_positions} is more than the "
                f"{len(self.ids)}×{seq_len} positions the shards hold"
            )
        self._side: list[tuple[Path, str, str]] = []  # (file, sha256, what): read at open
        self.tail_log_prior: Tensor | None = None
        if spec.tail_prior is not None:
            t = self._side_file(spec.tail_prior, "tail prior",
                                {"tail_log_prior": (_FLOATS, (self.vocab,))})  # fmt: skip
            self.tail_log_prior = to_torch(t["tail_log_prior"]).float()  # (V,)
        self.head_weight: Tensor | None = None  # signal='head': (V, H), and bias (V,)
        self.head_bias: Tensor | None = None
        if spec.head is not None:
            want = {"weight": (_FLOATS, tuple(spec.head.shape))}
            if spec.head.bias:
                want["bias"] = (_FLOATS, (self.vocab,))
            t = self._side_file(spec.head, "output layer", want)
            self.head_weight = to_torch(t["weight"]).float()
            self.head_bias = to_torch(t["bias"]).float() if "bias" in t else None
        # a store of sampled responses: each example's tokens and (prompt id, sample) key
        self.inputs: Tensor | None = None  # (N, T), rows in the order of ``self.input_ids``
        self.input_ids: Tensor | None = None  # (N,) their example ids
        self.keys: list[tuple[str, int]] | None = None
        if spec.inputs is not None:
            want = {"input_ids": (("I32",), (len(self.ids), seq_len)),
                    "example_ids": (("I64",), (len(self.ids),))}  # fmt: skip
            t = self._side_file(spec.inputs, "token ids", want)
            self.inputs = to_torch(t["input_ids"]).long()
            self.input_ids = to_torch(t["example_ids"]).long()
            if not torch.equal(torch.sort(self.input_ids).values, self._sorted):
                raise DKError(f"{self.path}: the store's token ids are for other examples")
            self.keys = [(str(a), int(b)) for a, b in spec.keys] if spec.keys else None
        self._tables: dict[str, Tensor] | None = None
        if self.nbytes <= preload_bytes:
            if verify:  # every shard is read now: each is checked first
                for i in range(len(self._maps)):
                    self._check(i)
            self._tables = {
                f: torch.cat([to_torch(mp[f]) for mp in self._maps]) for f in self.fields
            }

    def _side_file(self, entry, what: str, want: dict) -> dict:
        """The tail prior or the output layer: checked, hashed (with ``verify``), mapped."""
        f = store_file(self.path, entry.file, f"the store's {what}")
        if not f.exists() or f.stat().st_size != entry.bytes:
            raise DKError(f"{f}: the store's {what} is missing or damaged; relabel it")
        header = read_header(f)
        check_side_file(header[0], want, f)
        self._side.append((f, entry.sha256, f"the store's {what}"))
        if self._verify:
            verify_file(f, entry.sha256, f"the store's {what}")
        return map_shard(f, header)

    def _check(self, i: int) -> None:
        """Shard ``i``'s SHA-256 against the manifest, once (per process: ``verify_file``)."""
        if i not in self._verified:
            verify_file(self._files[i], self.manifest["shards"][i]["sha256"], "shard")
            self._verified.add(i)

    def verify_all(self) -> int:
        """Check the SHA-256 of every shard and side file now; the number of files."""
        for i in range(len(self._maps)):
            self._check(i)
        for f, sha, what in self._side:
            verify_file(f, sha, what)
        return len(self._maps) + len(self._side)

    # ------------------------------------------------------------ facts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the shards plus the tail prior, the output layer and the stored
        token ids, if any."""
        once = sum(
            (self.manifest.get(k) or {}).get("bytes", 0) for k in ("tail_prior", "head", "inputs")
        )
        return sum(s["bytes"] for s in self.manifest["shards"]) + once

    @property
    def num_positions(self) -> int:
        """Examples (classification) or valid token positions (sequences)."""
        return int(self.manifest["num_positions"])

    def check(self, expected: dict, where: str | None = None) -> None:
        """Refuse (one-line DKError naming the field) unless ``expected`` ⊆ fingerprint."""
        fp.check(self.fingerprint, expected, where or str(self.path))

    # ------------------------------------------------------------ lookups

    def rows_of(self, ids: Tensor) -> Tensor:
        """Row numbers ``(B,)`` of example ``ids (B,)``; KeyError names a missing id."""
        ids = ids.to(torch.long)
        at = torch.searchsorted(self._sorted, ids).clamp_max(max(len(self._sorted) - 1, 0))
        if len(self._sorted) == 0 or not torch.equal(self._sorted[at], ids):
            bad = ids[self._sorted[at] != ids] if len(self._sorted) else ids
            raise KeyError(f"{self.path}: example id {int(bad[0])} is not in the store")
        return self._order[at]

    def lengths(self, ids: Tensor) -> Tensor:
        """A sequence store's valid positions per example ``ids (B,)``: ``(B,)``."""
        return self._gather("mask", self.rows_of(ids)).bool().sum(-1)

    def _gather(self, field: str, rows: Tensor) -> Tensor:
        if self._tables is not None:
            return self._tables[field][rows]
        shard, local = rows // self.shard_size, rows % self.shard_size
        out = None
        for s in torch.unique(shard).tolist():
            if self._verify and s not in self._verified:
                self._check(s)  # first use of this shard: its SHA-256, once
            sel = (shard == s).nonzero().squeeze(1)
            loc, perm = torch.sort(local[sel])  # sequential reads from the memmap
            part = to_torch(self._maps[s][field][loc.numpy()])
            sel = sel[perm]
            if out is None:
                out = torch.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
            out[sel] = part
        assert out is not None
        return out

    def get(self, ids: Tensor) -> Signals:
        """The stored signals of examples ``ids (B,)``, in that order, as fp32 / int64."""
        rows = self.rows_of(ids)
        sig = Signals(temperature=self.temperature)
        if self.signal == "dense":
            sig.logits = self._gather("logits", rows).float()  # (B, [T,] V)
        elif self.signal == "head":  # the exact logits, recomputed through the output layer
            h = self._gather("head_hidden", rows).float()  # (B, [T,] H)
            sig.logits = F.linear(h, self.head_weight, self.head_bias)  # (B, [T,] V)
        elif self.signal == "sampled":  # distinct drawn ids, weighted by count / draws
            sig.sampled_ids = self._gather("sample_ids", rows).long()  # (B, [T,] K)
            counts = self._gather("sample_counts", rows).float()
            sig.sampled_weights = counts / float(self.k)  # (B, [T,] K), Σ = 1
        else:
            sig.topk_ids = self._gather("topk_ids", rows).long()  # (B, [T,] K)
            lp = self._gather("topk_logprobs", rows)
            sig.topk_logprobs = dequantize_q8(lp) if self.dtype == "q8" else lp.float()
            sig.tail_mass = self._gather("tail_mass", rows).float()  # (B, [T])
            sig.tail_log_prior = self.tail_log_prior
        if "mask" in self.fields:
            sig.mask = self._gather("mask", rows).bool()  # (B, T)
        for f in self.fields:
            if f.startswith("hidden."):
                sig.hidden[f[len("hidden.") :]] = self._gather(f, rows).float()
        return sig

    def info(self) -> dict:
        """What `dk store info` prints: the manifest's facts and the sizes."""
        m = self.manifest
        per = "token" if self.task == "sequence" else "example"
        return {
            "path": str(self.path),
            "signal": self.signal,
            "task": self.task,
            "examples": len(self),
            "positions": self.num_positions,
            "vocab": self.vocab,
            "k": self.k,
            "dtype": self.dtype,
            "temperature": self.temperature,
            "tail_prior": self.tail_log_prior is not None,
            "head": m.get("head"),
            "hidden": m.get("hidden", {}),
            "shards": len(m["shards"]),
            "bytes": self.nbytes,
            f"bytes_per_{per}": self.nbytes / max(self.num_positions, 1),
            "fingerprint": self.fingerprint,
            "describe": m.get("describe", {}),
        }


def open_store(
    path: str | Path, preload_bytes: int = PRELOAD_BYTES, verify: bool = True
) -> SignalStore:
    return SignalStore(path, preload_bytes, verify)
