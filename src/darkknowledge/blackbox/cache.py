"""An append-only on-disk request cache: one JSON line per answered request.

A request's key is the SHA-256 of its canonical JSON (model, messages or prompt, sampling
parameters), never the endpoint or the API key, so a rerun, or the same run spread over
other endpoints, costs nothing for what was already answered. Each answer is written with
one ``write`` on an ``O_APPEND`` descriptor as soon as it arrives, so it survives a
SIGKILL; ``fsync`` runs at most every ``fsync_every_s`` seconds and on close (a power cut
may lose the last second, never corrupt what came before). A torn last line (a crash in
the middle of a write) is ignored on load and overwritten by the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import DKError


def request_key(body: dict[str, Any]) -> str:
    """The cache key of a request body (endpoint and credentials are not in the body)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


class RequestCache:
    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_every_s = fsync_every_s
        self._mem: dict[str, dict] = {}
        good_end = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                data = f.read()
            pos = 0
            for line in data.split(b"\n"):
                end = pos + len(line) + 1
                if end > len(data):  # no newline: torn tail
                    break
                try:
                    row = json.loads(line)
                    self._mem[row["key"]] = row["response"]
                except (ValueError, KeyError, TypeError):
                    if end < len(data):
                        raise DKError(
                            f"{self.path}: corrupt cache line at byte {pos}; "
                            "delete the file to start over"
                        ) from None
                    break
                good_end = end
                pos = end
            if good_end < len(data):
                os.truncate(self.path, good_end)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()
        self.hits = 0
        self.writes = 0

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        return key in self._mem

    def get(self, key: str) -> dict | None:
        r = self._mem.get(key)
        if r is not None:
            self.hits += 1
        return r

    def put(self, key: str, response: dict) -> None:
        line = json.dumps({"key": key, "response": response}, ensure_ascii=False) + "\n"
        os.write(self._fd, line.encode())
        self._mem[key] = response
        self.writes += 1
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_every_s:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
