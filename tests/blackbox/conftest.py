"""Real loopback servers for the black-box tests: the scripted fault server runs in its
own process (so it can be killed for real), counting what it answers in a log file; a
tiny char-level causal LM served by ``dk serve-teacher``'s app (uvicorn in a thread)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
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


def tiny_teacher(d: Path, n_positions: int = 1024) -> Path:
    """A randomly initialised one-layer GPT-2 over the characters of the synthetic
    problems, saved (config, weights, tokenizer) in ``d``."""
    from darkknowledge.blackbox.synthetic import problems, prompt_of
    from darkknowledge.hf.io import build_tiny, char_tokenizer, save_pretrained

    rows = problems(50, 0)
    tok = char_tokenizer(
        "".join(prompt_of(r["question"]) + r["answer"] for r in rows) + "0123456789"
    )
    model = build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=0, vocab_size=len(tok),
                       n_embd=32, n_positions=n_positions, n_layer=1, n_head=2)  # fmt: skip
    save_pretrained(model, d, tok)
    return d


@contextmanager
def serving(model_dir: Path, name: str = "tiny", max_top_logprobs: int = 5):
    """``dk serve-teacher``'s app on a free loopback port: (base URL, Generator)."""
    import uvicorn

    from darkknowledge.blackbox.serve import create_app, load_generator

    gen = load_generator(model_dir)
    app = create_app(gen, name, max_top_logprobs=max_top_logprobs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", gen
    finally:
        server.should_exit = True
        t.join(5)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def served(teacher_dir):
    """The tiny teacher served as ``tiny`` (top_logprobs capped at 5)."""
    with serving(teacher_dir) as s:
        yield s
