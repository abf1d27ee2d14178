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
from .format import FORMAT, MANIFEST, SHARDS, dequantize_q8, map_shard, to_torch

PRELOAD_BYTES = 1 << 30  # stores up to this size are copied into RAM once at open


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    m = path / MANIFEST
    if not path.is_dir():
        raise DKError(f"{path}: no such store folder (make one with `dk label RECIPE.yaml`)")
    if not m.exists():
        raise DKError(f"{path}: not a signal store (no {MANIFEST}); make one with `dk label`")
    try:
        manifest = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DKError(f"{m}: not valid JSON; relabel the store with `dk label --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DKError(f"{m}: not a {FORMAT} manifest")
    return manifest


class SignalStore:
    """A finished store, opened for lookups by example id.

    Shards are memory-mapped; a store no larger than ``preload_bytes`` is also copied
    into RAM once, so each lookup is one gather (what keeps KD from a store as cheap
    as plain training).
    """

    def __init__(self, path: str | Path, preload_bytes: int = PRELOAD_BYTES):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
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
        self._maps = []
        for s in m["shards"]:
            f = self.path / SHARDS / s["file"]
            if not f.exists():
                raise DKError(f"{f}: shard listed in the manifest is missing; relabel the store")
            if f.stat().st_size != s["bytes"]:
                raise DKError(
                    f"{f}: shard has {f.stat().st_size} bytes, manifest says {s['bytes']}"
                )
            self._maps.append(map_shard(f))
        self.fields = sorted(k for k in (self._maps[0] if self._maps else {}) if k != "ids")
        ids = [to_torch(mp["ids"]) for mp in self._maps]
        self.ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)  # (N,)
        if len(self.ids) != m["num_examples"]:
            raise DKError(
                f"{self.path}: shards hold {len(self.ids)} rows, manifest says {m['num_examples']}"
            )
        self._sorted, self._order = torch.sort(self.ids)
        self.tail_log_prior: Tensor | None = None
        if m.get("tail_prior"):
            f = self.path / m["tail_prior"]["file"]
            if not f.exists() or f.stat().st_size != m["tail_prior"]["bytes"]:
                raise DKError(f"{f}: the store's tail prior is missing or damaged; relabel it")
            self.tail_log_prior = to_torch(map_shard(f)["tail_log_prior"]).float()  # (V,)
        self.head_weight: Tensor | None = None  # signal='head': (V, H), and bias (V,)
        self.head_bias: Tensor | None = None
        if self.signal == "head":
            f = self.path / m["head"]["file"]
            if not f.exists() or f.stat().st_size != m["head"]["bytes"]:
                raise DKError(f"{f}: the store's output layer is missing or damaged; relabel it")
            t = map_shard(f)
            self.head_weight = to_torch(t["weight"]).float()
            self.head_bias = to_torch(t["bias"]).float() if "bias" in t else None
        self._tables: dict[str, Tensor] | None = None
        if self.nbytes <= preload_bytes:
            self._tables = {
                f: torch.cat([to_torch(mp[f]) for mp in self._maps]) for f in self.fields
            }

    # ------------------------------------------------------------ facts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the shards plus the tail prior or the output layer, if any."""
        once = sum((self.manifest.get(k) or {}).get("bytes", 0) for k in ("tail_prior", "head"))
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

    def _gather(self, field: str, rows: Tensor) -> Tensor:
        if self._tables is not None:
            return self._tables[field][rows]
        shard, local = rows // self.shard_size, rows % self.shard_size
        out = None
        for s in torch.unique(shard).tolist():
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


def open_store(path: str | Path, preload_bytes: int = PRELOAD_BYTES) -> SignalStore:
    return SignalStore(path, preload_bytes)
