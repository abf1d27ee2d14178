"""What dk generate puts on the wire: ``sampling.extra_body`` and
``sampling.max_completion_tokens`` reach a real loopback server (which records every
request body)."""

from __future__ import annotations

import json
import ssl
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from conftest import recipe_dict, write_prompts
from darkknowledge.cli import main


@contextmanager
def recording_server(tls: ssl.SSLContext | None = None):
    """An OpenAI-style chat endpoint on 127.0.0.1 that answers ``#### 4`` n times and
    keeps every request body it was sent: (base URL, bodies)."""
    bodies: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "arith"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            msg = {"role": "assistant", "content": "#### 4"}
            n = body.get("n", 1)
            self._send({"choices": [{"index": i, "message": msg} for i in range(n)]})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://127.0.0.1:{srv.server_port}/v1", bodies
    finally:
        srv.shutdown()
        srv.server_close()


def _generate(tmp_path: Path, url: str, capsys, **over) -> tuple[int, str]:
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    rec = recipe_dict(prompts, [url], select={"keep": "all"}, **over)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(rec))
    capsys.readouterr()
    rc = main(["generate", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "o"), "--force"])
    return rc, capsys.readouterr().err


def test_extra_body_and_max_completion_tokens_reach_the_server(tmp_path, capsys):
    extra = {"top_k": 20, "min_p": 0.05, "chat_template_kwargs": {"enable_thinking": False}}
    with recording_server() as (url, bodies):
        rc, err = _generate(
            tmp_path, url, capsys,
            sampling={"extra_body": extra, "max_completion_tokens": 64},
        )  # fmt: skip
        assert rc == 0, err
        assert len(bodies) == 2
        for b in bodies:
            assert {k: b[k] for k in extra} == extra
            assert b["max_completion_tokens"] == 64 and "max_tokens" not in b
            assert b["temperature"] == 0.7 and b["n"] == 2  # the recipe's own fields stay
        # what the run recorded: the sampling with its extra fields, in every SFT row
        row = json.loads((tmp_path / "o" / "sft.jsonl").read_text().splitlines()[0])
        assert row["sampling"]["extra_body"] == extra

        # without them the body is what it always was (so old caches still answer)
        bodies.clear()
        assert _generate(tmp_path, url, capsys)[0] == 0
        assert "max_tokens" in bodies[0] and not {"top_k", "max_completion_tokens"} & set(bodies[0])

    # a key the request already has is refused in one line
    for over, want in [
        ({"extra_body": {"temperature": 0.0}}, "'temperature' is a field dk generate sets"),
        ({"extra_body": {"stream": True}}, "'stream' is a field dk generate sets"),
    ]:
        rc, err = _generate(tmp_path, "http://127.0.0.1:9/v1", capsys, sampling=over)
        assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
    rc, err = _generate(
        tmp_path, "http://127.0.0.1:9/v1", capsys,
        sampling={"max_completion_tokens": 10}, teacher={"api": "completions"},
    )  # fmt: skip
    assert rc == 2 and "chat API field" in err and len(err.strip().splitlines()) == 1, err
