"""A scripted OpenAI-compatible server on loopback, for fault-injection tests and the
throughput bench (a real HTTP server, not a mock of the client).

It answers ``/v1/chat/completions`` and ``/v1/completions`` with arithmetic: the answer
to sample ``i`` is the sum of the integers in the prompt plus ``i`` (so sample 0 is right
and the others wrong, which makes rejection sampling visible), formatted as
``"... #### N"``. The first POSTs get the faults listed in ``--faults`` in order
(``429``, ``500``, ``hang``, ``drop``, ``badjson``, ``ok``); ``--latency`` adds a fixed
delay, ``--capacity`` caps concurrent requests (the rest queue). Each answered request
is logged as one JSON line in ``--log`` so tests can count what the server really sent.

    python -m darkknowledge.blackbox.faultserver --port 0 --faults 429,500 --log a.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_text(prompt: str, i: int) -> str:
    nums = [int(x) for x in re.findall(r"-?\d+", prompt)]
    total = sum(nums) + i
    return f"The numbers add up to {total}.\n#### {total}"


class _State:
    def __init__(self, faults, latency, capacity, log, hang_s, retry_after, model, die_after):
        self.faults = list(faults)
        self.latency = latency
        self.capacity = threading.Semaphore(capacity)
        self.log = open(log, "a", buffering=1) if log else None
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.model = model
        self.lock = threading.Lock()
        self.posts = 0
        self.answered = 0
        self.die_after = die_after  # answered requests, then the process dies
        self.dying = False

    def next_fault(self) -> str:
        with self.lock:
            i = self.posts
            self.posts += 1
        return self.faults[i] if i < len(self.faults) else "ok"

    def answer(self, send, row: dict) -> None:
        """Send and log under one lock, so the log counts exactly what was sent; after
        ``die_after`` answers the process exits abruptly, dropping requests in flight."""
        with self.lock:
            if self.dying:
                return
            send()
            if self.log:
                self.log.write(json.dumps(row) + "\n")
            self.answered += 1
            if self.die_after is not None and self.answered >= self.die_after:
                self.dying = True
                threading.Timer(0.05, os._exit, args=(1,)).start()


def make_handler(st: _State):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _json(self, code: int, obj, headers=None, raw: bytes | None = None):
            body = raw if raw is not None else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                return self._json(200, {"object": "list", "data": [{"id": st.model}]})
            self._json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            chat = self.path.endswith("/chat/completions")
            if not chat and not self.path.endswith("/completions"):
                return self._json(404, {"error": {"message": "not found"}})
            fault = st.next_fault()
            if fault == "429":
                return self._json(
                    429,
                    {"error": {"message": "rate limited"}},
                    headers={"Retry-After": str(st.retry_after)},
                )
            if fault == "500":
                return self._json(500, {"error": {"message": "internal error"}})
            if fault in ("hang", "drop"):
                if fault == "hang":
                    time.sleep(st.hang_s)
                self.close_connection = True
                return None
            if chat:
                prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
            else:
                prompt = body.get("prompt", "")
            with st.capacity:
                if st.latency:
                    time.sleep(st.latency)
            k = int(body.get("n") or 1)
            texts = [answer_text(prompt, i) for i in range(k)]
            if fault == "badjson":
                return self._json(200, None, raw=b'{"choices": [{"message": ')
            choices = [
                {"index": i, "finish_reason": "stop"}
                | ({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
                for i, t in enumerate(texts)
            ]
            out = {
                "id": f"cmpl-{st.posts}",
                "object": "chat.completion" if chat else "text_completion",
                "model": body.get("model", st.model),
                "choices": choices,
                "usage": {
                    "prompt_tokens": max(1, len(prompt) // 4),
                    "completion_tokens": sum(max(1, len(t) // 4) for t in texts),
                },
            }
            st.answer(
                lambda: self._json(200, out),
                {
                    "prompt": prompt,
                    "n": k,
                    "seed": body.get("seed"),
                    "auth": "Authorization" in self.headers,  # whether a key came, not the key
                },
            )
            self.close_connection = st.dying or self.close_connection
            return None

    return H


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the listen backlog (the default 5 drops bursts of connects)
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that went away (killed, timed out) is part of the tests: no traceback
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(
    port: int = 0,
    faults=(),
    latency: float = 0.0,
    capacity: int = 64,
    log: str | None = None,
    hang_s: float = 5.0,
    retry_after: float = 0.2,
    model: str = "arith",
    die_after: int | None = None,
    ready=None,
):
    st = _State(faults, latency, capacity, log, hang_s, retry_after, model, die_after)
    srv = _Server(("127.0.0.1", port), make_handler(st))
    if ready is not None:
        ready(srv.server_address[1])
    try:
        srv.serve_forever(poll_interval=0.05)
    finally:
        srv.server_close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--faults", default="", help="comma list: 429,500,hang,drop,badjson,ok")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--capacity", type=int, default=64, help="concurrent requests served")
    p.add_argument("--log", help="append one JSON line per answered request")
    p.add_argument("--hang-s", type=float, default=5.0)
    p.add_argument("--retry-after", type=float, default=0.2)
    p.add_argument("--die-after", type=int, help="exit abruptly after this many answers")
    a = p.parse_args(argv)
    faults = [f for f in a.faults.split(",") if f]

    def ready(port):
        print(f"PORT {port}", flush=True)

    serve(
        a.port,
        faults,
        a.latency,
        a.capacity,
        a.log,
        a.hang_s,
        a.retry_after,
        die_after=a.die_after,
        ready=ready,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
