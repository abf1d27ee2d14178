"""Request bodies are bounded while they stream in, and malformed uploads are 400s.

A real uvicorn server on loopback, in this process (so the test can read the body
counter the middleware keeps), on a SQLite file; no workers (nothing runs)."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zipfile
import zlib

import httpx
import pytest
from sqlalchemy import func, select

from darkknowledge.service.app import create_app
from darkknowledge.service.auth import create_token
from darkknowledge.service.db import Dataset, Job
from darkknowledge.service.settings import ServiceSettings

MB = 1 << 20
CHUNK = 64 * 1024
# What the server may read past the cap: the one receive() that crossed it. uvicorn hands
# the app what it has buffered, which is up to 64 KB (its high-water mark) plus one socket
# read (asyncio reads up to 256 KB at a time).
SLACK = 64 * 1024 + 256 * 1024


class InProcessServer:
    def __init__(self, settings: ServiceSettings):
        import uvicorn

        self.app = create_app(settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        with self.app.state.sessions() as db:
            self.token = create_token(db, "alice")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}/api/v1", timeout=60,
                            headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def count(self, table) -> int:
        with self.app.state.sessions() as db:
            return db.scalar(select(func.count()).select_from(table))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "data").mkdir()
    settings = ServiceSettings(data_dir=root / "svc", workers=0, upload_limit_mb=1,
                               data_roots={"data": root / "data"})  # fmt: skip
    assert settings.max_request_mb == 16  # the default cap of a JSON body
    with InProcessServer(settings) as s:
        yield s


def _job_body(n: int) -> bytes:
    """A job whose recipe carries ``n`` bytes of padding (valid JSON all the way)."""
    head = b'{"recipe": {"data": {"name": "digits"}, "pad": "'
    return head + b"x" * (n - len(head) - 3) + b'"}}'


def test_50_mb_job_body_is_413_and_read_no_further_than_the_cap(srv):
    cap = srv.app.state.settings.max_request_bytes
    stats = srv.app.state.body_stats
    body = _job_body(50 * MB)
    with srv.client() as c:
        # Content-Length given: refused before any of the body is read
        r = c.post("/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "16 MB" in r.json()["detail"], r.text
        assert stats.last_refused_read == 0

        # no Content-Length (chunked): counted as it streams in
        def chunks():
            for i in range(0, len(body), CHUNK):
                yield body[i : i + CHUNK]

        before = stats.refused
        r = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert stats.refused == before + 1
        assert cap < stats.last_refused_read <= cap + SLACK, stats.last_refused_read
    assert srv.count(Job) == 0  # nothing stored


def test_a_raw_chunked_stream_is_counted(srv):
    """Chunk-framed bytes written straight to the socket: the server answers 413 while
    the client is still sending, and has read no further than the cap plus one chunk."""
    cap = srv.app.state.settings.max_request_bytes
    stats = srv.app.state.body_stats
    before = stats.refused
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + srv.token.encode() + b"\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        chunk = b"x" * CHUNK
        try:
            for _ in range(cap // CHUNK + 800):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert stats.refused == before + 1 and stats.last_refused_read <= cap + SLACK
    assert srv.count(Job) == 0


def test_a_job_body_under_the_cap_still_works(srv):
    with srv.client() as c:
        r = c.post("/jobs", json={"recipe": {"data": {"name": "digits"}}})
        assert r.status_code == 422 and "student" in r.json()["detail"], r.text  # validated


def test_upload_over_its_own_cap_is_413_and_leaves_nothing(srv):
    with srv.client() as c:
        r = c.post(
            "/datasets", params={"filename": "big.zip"}, content=(b"x" * CHUNK for _ in range(40))
        )
        assert r.status_code == 413 and "1 MB" in r.json()["detail"], r.text
    datasets = srv.app.state.settings.datasets_dir
    assert list(datasets.iterdir()) == [] and srv.count(Dataset) == 0


# ---------------------------------------------------------------- malformed ZIP uploads


def _zip(files: dict[str, bytes], method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _patch_local_and_central(raw: bytes, name: bytes, fn) -> bytes:
    """Apply ``fn(bytearray, header_offset, kind)`` to the local and central headers."""
    out = bytearray(raw)
    i = out.find(b"PK\x03\x04")
    fn(out, i, "local")
    j = out.find(b"PK\x01\x02")
    fn(out, j, "central")
    return bytes(out)


def bad_crc() -> bytes:
    raw = _zip({"a.txt": b"hello world" * 10})

    def crc(b, i, kind):
        off = 14 if kind == "local" else 16
        b[i + off : i + off + 4] = struct.pack("<I", zlib.crc32(b"other") & 0xFFFFFFFF)

    return _patch_local_and_central(raw, b"a.txt", crc)


def forged_sizes() -> bytes:
    raw = _zip({"a.txt": b"hello world" * 10}, zipfile.ZIP_DEFLATED)

    def size(b, i, kind):  # uncompressed size says 4 GB - 1
        off = 22 if kind == "local" else 24
        b[i + off : i + off + 4] = struct.pack("<I", 0xFFFFFFFE)

    return _patch_local_and_central(raw, b"a.txt", size)


def small_forged_size() -> bytes:
    raw = _zip({"a.txt": b"hello world" * 10}, zipfile.ZIP_DEFLATED)

    def size(b, i, kind):  # says 5 bytes; it inflates to 110
        off = 22 if kind == "local" else 24
        b[i + off : i + off + 4] = struct.pack("<I", 5)

    return _patch_local_and_central(raw, b"a.txt", size)


def encrypted() -> bytes:
    raw = _zip({"a.txt": b"secret"})

    def flag(b, i, kind):
        off = 6 if kind == "local" else 8
        b[i + off] |= 0x01

    return _patch_local_and_central(raw, b"a.txt", flag)


def nul_name() -> bytes:
    raw = _zip({"abcde": b"x"})
    return raw.replace(b"abcde", b"ab\x00de")


@pytest.mark.parametrize(
    "make, needle",
    [
        (bad_crc, "damaged"),
        (forged_sizes, "damaged"),
        (small_forged_size, "damaged"),
        (encrypted, "encrypted"),
        (lambda: _zip({"a": b"file", "a/b": b"under a file"}), "both a file and a folder"),
        (lambda: _zip({"a/b": b"under a folder", "a": b"file"}), "both a file and a folder"),
        (lambda: _zip({"a.txt": b"1", "./a.txt": b"2"}), "twice"),
        (lambda: _zip({"x" * 300: b"long"}), "too long"),
        (lambda: _zip({"d/" + "y" * 300: b"long"}), "too long"),
        (nul_name, "bad name"),
        (lambda: _zip({"a.txt": b"1"})[:-10], "ZIP"),
    ],
    ids=[
        "bad-crc",
        "forged-size-4g",
        "forged-size-small",
        "encrypted",
        "file-then-dir",
        "dir-then-file",
        "same-name-twice",
        "300-char-name",
        "300-char-part",
        "nul-in-name",
        "truncated",
    ],
)
def test_malformed_upload_is_400(srv, make, needle):
    with srv.client() as c:
        r = c.post("/datasets", params={"filename": "m.zip"}, content=make())
        assert r.status_code == 400 and needle in r.json()["detail"], r.text
        assert "\n" not in r.json()["detail"]
    datasets = srv.app.state.settings.datasets_dir
    assert list(datasets.iterdir()) == [] and srv.count(Dataset) == 0
