"""What dk generate puts on the wire: ``sampling.extra_body`` and
``sampling.max_completion_tokens`` reach a real loopback server (which records every
request body), and an https teacher signed by a private CA is trusted through
``SSL_CERT_FILE`` and refused in one line without it."""

from __future__ import annotations

import datetime
import ipaddress
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


def _ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it (PEM files:
    CA certificate, server certificate, server key)."""
    from cryptography import x509  # the interop-test extra: missing fails, never skips
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    span = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject, issuer, key, sign_key, ca: bool, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(span[0])
            .not_valid_after(span[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        else:
            b = b.add_extension(san, critical=False).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(sign_key.public_key()), False
            )
        return b.sign(sign_key, hashes.SHA256())

    ca_key, srv_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = cert("dk test CA", "dk test CA", ca_key, ca_key, True)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    srv = cert("127.0.0.1", "dk test CA", srv_key, ca_key, False, san)
    pem = serialization.Encoding.PEM
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(srv.public_bytes(pem))
    paths[2].write_bytes(
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_https_teacher_trusted_through_ssl_cert_file(tmp_path, capsys, monkeypatch):
    ca, crt, key = _ca_and_server_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with recording_server(ctx) as (url, bodies):
        assert url.startswith("https://")
        # the private CA is not in the system store nor certifi's bundle: refused at
        # once (a certificate check is not retried) in one line that says what to do
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        rc, err = _generate(tmp_path, url, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "TLS certificate not trusted" in err and "SSL_CERT_FILE" in err
        assert bodies == []

        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        rc, err = _generate(tmp_path, url, capsys)
        assert rc == 0, err
        assert len(bodies) == 2  # both prompts answered over TLS

        for bad, want in [(tmp_path / "nope.pem", "no such file"), (key, "not a PEM CA")]:
            monkeypatch.setenv("SSL_CERT_FILE", str(bad))
            rc, err = _generate(tmp_path, url, capsys)
            assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err
