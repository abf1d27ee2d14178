"""Real loopback servers for the black-box tests: the scripted fault server runs in its
own process (so it can be killed for real), counting what it answers in a log file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from darkknowledge.blackbox import faultserver


class Server:
    def __init__(self, log: Path, port: int = 0, **opts):
        self.log = log
        # run the file, not the module: the package import (torch) costs seconds
        args = [sys.executable, faultserver.__file__, "--port", str(port)]
        args += ["--log", str(log)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def answered(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    servers: list[Server] = []

    def make(name: str = "a", **opts) -> Server:
        s = Server(tmp_path / f"server-{name}.jsonl", **opts)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.kill()


def write_prompts(path: Path, n: int) -> Path:
    """Addition problems ``What is a + b?`` with GSM8K-style answers ``#### a+b``."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7 + 1, i * 3 + 2
            f.write(
                json.dumps({"question": f"Q{i}: what is {a} + {b}?", "answer": f"#### {i + a + b}"})
                + "\n"
            )
    return path


def recipe_dict(prompts: Path, urls: list[str], **over) -> dict:
    r = {
        "prompts": {"path": str(prompts)},
        "teacher": {"base_url": urls, "model": "arith", "api": "chat"},
        "sampling": {"n": 2, "temperature": 0.7, "max_tokens": 32, "seed": 0},
        "verifier": {"name": "gsm8k"},
        "client": {
            "concurrency": 4,
            "max_attempts": 4,
            "backoff_s": 0.02,
            "max_backoff_s": 0.2,
            "timeout_s": 1.0,
        },
    }
    for k, v in over.items():
        r.setdefault(k, {}).update(v) if isinstance(v, dict) else r.__setitem__(k, v)
    return r
