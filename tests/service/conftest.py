"""Fixtures for the service tests: a real ``dk serve`` process on loopback, on a real
SQLite file or a real PostgreSQL database (skipped only when no server is reachable)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

PG_URL = os.environ.get("DK_TEST_PG_URL", "postgresql://dk:dk@127.0.0.1:5432/postgres")
FINISHED = ("succeeded", "failed", "cancelled")

TINY = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 64},
    "eval": {"latency": False},
}
TINY_KD = {
    **TINY,
    "teacher": {
        "kind": "module",
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 64},
    },
    "loss": {"hinton_kd": {"temperature": 3.0, "alpha": 0.7}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``dk serve`` in a child process, with its own data dir, database and data root."""

    def __init__(self, root: Path, db_url: str | None, workers: int = 2, **settings):
        self.root = root
        self.data_dir = root / "svc"
        self.data_root = root / "data"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "DK_SERVE_DATA_DIR": str(self.data_dir),
            "DK_SERVE_WORKERS": str(workers),
            "DK_SERVE_HEARTBEAT_S": "0.3",
            "DK_SERVE_POLL_S": "0.05",
            "DK_SERVE_DATA_ROOTS": json.dumps({"data": str(self.data_root)}),
            "DK_SERVE_UPLOAD_LIMIT_MB": "0.1",
            "PYTHONUNBUFFERED": "1",
        }
        if db_url:
            self.env["DK_SERVE_DATABASE_URL"] = db_url
        for k, v in settings.items():
            self.env[f"DK_SERVE_{k.upper()}"] = str(v)
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'service.db'}"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def _dk(self, *args) -> list[str]:
        return [sys.executable, "-m", "darkknowledge.cli", *args]

    def start(self) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(self._dk("serve", "--port", str(port)), env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up: {self.log()}")

    def log(self) -> str:
        return (self.root / f"server-{self.starts}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def token(self, name: str) -> str:
        res = subprocess.run(self._dk("serve", "token", "create", name), env=self.env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def token_in_process(self, name: str) -> str:
        from darkknowledge.service.auth import create_token
        from darkknowledge.service.db import session_factory

        engine = self.engine()
        try:
            with session_factory(engine)() as db:
                return create_token(db, name)
        finally:
            engine.dispose()

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=60, **kw)

    def engine(self):
        from darkknowledge.service.db import make_engine

        return make_engine(self.db_url)

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir / "jobs" / str(job_id)


def wait_job(client: httpx.Client, job_id: int, states=FINISHED, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def pg_database(request) -> str | None:
    """A fresh database on the local PostgreSQL server, or skip when none is reachable."""
    try:
        import psycopg

        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as e:
        if os.environ.get("DK_TEST_PG_REQUIRED"):
            pytest.fail(f"PostgreSQL required but not reachable at {PG_URL}: {e}")
        pytest.skip(f"no PostgreSQL server reachable at {PG_URL} ({type(e).__name__})")
    name = f"dk_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop():
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    request.addfinalizer(drop)
    return PG_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    if request.param == "sqlite":
        return None
    return pg_database(request)


@pytest.fixture(scope="module")
def server(db_url, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("service"), db_url, workers=2).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server) -> str:
    return server.token("alice")


@pytest.fixture(scope="module")
def bob(server) -> str:
    return server.token_in_process("bob")  # the CLI path is alice's; this one is faster


def idx_bytes(arr: np.ndarray) -> bytes:
    """An array in the IDX format (uint8)."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def tiny_idx_zip(n_train: int = 300, n_test: int = 100, seed: int = 0) -> bytes:
    """A learnable 8×8, 4-class dataset in the MNIST IDX layout, zipped."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for split, n in (("train", n_train), ("t10k", n_test)):
            y = rng.integers(0, 4, n)
            x = rng.integers(0, 40, (n, 8, 8))
            for c in range(4):  # each class lights one quadrant
                r, q = divmod(c, 2)
                x[y == c, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 200
            z.writestr(f"{split}-images-idx3-ubyte", idx_bytes(np.clip(x, 0, 255)))
            z.writestr(f"{split}-labels-idx1-ubyte", idx_bytes(y))
    return out.getvalue()
