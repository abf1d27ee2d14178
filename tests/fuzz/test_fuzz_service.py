"""The job service's endpoints on mutated bodies, in process (FastAPI's TestClient, a
SQLite file, no workers): every answer is a success or a 4xx, never a 500 (the client
re-raises a server exception, which fails the test)."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from fuzzlib import (
    TOKENS,
    assert_http_ok_or_4xx,
    cases,
    json_values,
    mutated_bytes,
    mutated_tree,
    recipe_fixture,
    yaml_dump,
)
from hypothesis import given
from hypothesis import strategies as st

from darkknowledge.service.app import create_app
from darkknowledge.service.auth import create_token
from darkknowledge.service.settings import ServiceSettings

TINY = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 64},
    "eval": {"latency": False},
}
TINY_KD = {
    **TINY,
    "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [32]},
                "train": {"epochs": 2, "batch_size": 64}},
    "loss": {"hinton_kd": {"temperature": 3.0, "alpha": 0.7}},
}  # fmt: skip


def quote_url(text: str) -> str:
    return quote(text, safe="")


def _family_recipe(family: str, root: Path) -> dict:
    """A recipe of ``family`` with its data path inside the service's data root."""
    r = recipe_fixture(family)
    if family in ("text", "causal_lm"):
        r["data"]["path"] = "data:" + Path(r["data"]["path"]).name
    return r


@pytest.fixture(scope="module")
def service():
    root = Path(tempfile.mkdtemp(prefix="dk-fuzz-service-"))
    (root / "data" / "sst2").mkdir(parents=True)
    (root / "data" / "input.txt").write_text("to be or not to be\n" * 50)
    settings = ServiceSettings(data_dir=root / "svc", workers=0, upload_limit_mb=0.25,
                               max_request_mb=0.5, data_roots={"data": root / "data"})  # fmt: skip
    app = create_app(settings)
    with app.state.sessions() as db:
        token = create_token(db, "fuzz")
    client = TestClient(app, raise_server_exceptions=True)
    client.headers["Authorization"] = f"Bearer {token}"
    client.cookies.set("dk_token", token)
    bases = [TINY, TINY_KD, *(_family_recipe(f, root) for f in ("text", "causal_lm"))]
    yield client, bases
    client.close()


def test_the_fixtures_are_accepted(service):
    client, bases = service
    for b in bases[:2]:
        r = client.post("/api/v1/jobs", json={"recipe": b, "name": "ok"})
        assert r.status_code == 201, r.text


@cases(250)
@given(data=st.data())
def test_post_job_mutated_recipe(service, data):
    client, bases = service
    base = data.draw(st.sampled_from(bases))
    body = {"recipe": data.draw(mutated_tree(base)), "name": data.draw(
        st.one_of(st.none(), st.text(max_size=10), st.sampled_from(["\n", "x" * 300, ""])))}  # fmt: skip
    content = json.dumps(body).encode()  # NaN and Infinity too, as a careless client sends
    r = client.post("/api/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert_http_ok_or_4xx(r)


@cases(80)
@given(data=st.data(), ctype=st.sampled_from(["application/json", "text/plain", "",
                                              "application/x-www-form-urlencoded"]))  # fmt: skip
def test_post_job_mutated_bytes(service, data, ctype):
    client, bases = service
    raw = json.dumps({"recipe": bases[0]}).encode()
    body = data.draw(
        st.one_of(
            mutated_bytes(
                raw,
                [
                    '"',
                    "{",
                    "}",
                    "[",
                    "]",
                    ",",
                    ":",
                    "null",
                    "[" * 50,
                    "1e999",
                    "NaN",
                    "\\ud800",
                    "é",
                ],
            ),
            st.builds(lambda v: json.dumps(v).encode(), json_values),
            st.sampled_from([b"[" * 20_000 + b"]" * 20_000, b'{"recipe": ' + b"[" * 5000]),
        )
    )
    headers = {"content-type": ctype} if ctype else {}
    assert_http_ok_or_4xx(client.post("/api/v1/jobs", content=body, headers=headers))


@cases(60)
@given(
    state=st.one_of(st.none(), st.text(max_size=10), st.sampled_from(["queued", "running"])),
    limit=st.one_of(st.none(), st.integers(-5, 1000), st.text(max_size=5)),
    offset=st.one_of(st.none(), st.integers(-5, 2**40), st.text(max_size=5)),
    job=st.one_of(st.integers(-5, 2**40), st.text(max_size=12).map(quote_url)),
    tail=st.sampled_from(
        [
            "",
            "/metrics",
            "/logs",
            "/artifacts",
            "/report",
            "/student",
            "/artifacts/report.md",
            "/artifacts/../../x",
            "/cancel",
        ]
    ),
)
def test_get_jobs_and_one_job(service, state, limit, offset, job, tail):
    client, _ = service
    params = {k: v for k, v in {"state": state, "limit": limit, "offset": offset}.items()
              if v is not None}  # fmt: skip
    assert_http_ok_or_4xx(client.get("/api/v1/jobs", params=params))
    path = f"/api/v1/jobs/{job}{tail}"
    r = client.post(path) if tail == "/cancel" else client.get(path)
    assert_http_ok_or_4xx(r)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return buf.getvalue()


ZIP = _zip({"train-images-idx3-ubyte": b"\x00\x00\x08\x03" + bytes(12), "a/b.txt": b"hello"})


@cases(80)
@given(
    data=st.data(),
    filename=st.one_of(
        st.sampled_from(["d.zip", "../x.zip", "a/b.zip", ".h", "x" * 300]), st.text(max_size=12)
    ),
)
def test_post_dataset_mutated_zip(service, data, filename):
    client, _ = service
    body = data.draw(mutated_bytes(ZIP, ["PK", "\x00", "\xff", "../", "/", "a", "\x01\x02"]))
    r = client.post("/api/v1/datasets", params={"filename": filename}, content=body)
    assert_http_ok_or_4xx(r)
    if r.status_code == 201:
        assert client.delete(f"/api/v1/datasets/{r.json()['id']}").status_code == 204


@cases(60)
@given(data=st.data())
def test_dashboard_form_mutated_yaml(service, data):
    client, bases = service
    text = data.draw(mutated_bytes(yaml_dump(data.draw(st.sampled_from(bases))), TOKENS))
    recipe = text.decode("utf-8", "replace")
    r = client.post("/ui/jobs", data={"recipe": recipe, "name": "f"}, follow_redirects=False)
    assert r.status_code in (303, 422) or r.status_code < 500, r.status_code
