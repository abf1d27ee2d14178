"""Security: tokens, ownership, path confinement, upload limits, recipe validation.
The server runs with no workers: nothing here needs training."""

from __future__ import annotations

import io
import os
import zipfile

import httpx
import pytest

from conftest import TINY, Server, tiny_idx_zip


@pytest.fixture(scope="module")
def server(db_url, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("secure"), db_url, workers=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(server, alice, bob):
    """One job of alice's (never run: no workers) and one dataset of hers."""
    with server.client(alice) as c:
        job = c.post("/jobs", json={"recipe": TINY}).json()
        ds = c.post("/datasets", params={"filename": "a.zip"}, content=tiny_idx_zip()).json()
    # a file in the run dir, so artifact requests reach the path check with a real target
    run = server.job_dir(job["id"]) / "run"
    run.mkdir(parents=True)
    (run / "report.md").write_text("# hi\n")
    return job, ds


def _operations(server) -> list[tuple[str, str]]:
    spec = httpx.get(server.url + "/openapi.json").json()
    ops = []
    for path, item in spec["paths"].items():
        for method in item:
            ops.append((method.upper(), path.removeprefix("/api/v1")))
    return ops


def test_every_endpoint_but_health_needs_a_token(server, jobs):
    job, ds = jobs
    ops = _operations(server)
    assert len(ops) >= 14
    with server.client() as anon, server.client("dk_not_a_real_token") as bad:
        assert anon.get("/health").status_code == 200
        for method, path in ops:
            if path == "/health":
                continue
            url = path.replace("{job_id}", str(job["id"])).replace("{dataset_id}", ds["id"])
            url = url.replace("{name}", "report.md")
            for c in (anon, bad):
                r = c.request(method, url, params={"filename": "x.zip"})
                assert r.status_code == 401, (method, url, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                assert "token" in r.json()["detail"]


def test_another_tokens_job_and_dataset_are_404(server, alice, bob, jobs):
    job, ds = jobs
    j = job["id"]
    with server.client(bob) as c:
        for method, url in [
            ("GET", f"/jobs/{j}"),
            ("GET", f"/jobs/{j}/metrics"),
            ("GET", f"/jobs/{j}/logs"),
            ("GET", f"/jobs/{j}/artifacts"),
            ("GET", f"/jobs/{j}/artifacts/report.md"),
            ("GET", f"/jobs/{j}/student"),
            ("GET", f"/jobs/{j}/report"),
            ("POST", f"/jobs/{j}/cancel"),
            ("DELETE", f"/jobs/{j}"),
            ("GET", f"/datasets/{ds['id']}"),
            ("DELETE", f"/datasets/{ds['id']}"),
        ]:
            r = c.request(method, url)
            assert r.status_code == 404, (method, url, r.status_code)
        assert c.get("/jobs").json() == {"data": [], "count": 0}
        assert c.get("/datasets").json()["count"] == 0
        # bob cannot use alice's upload in a recipe either
        recipe = {**TINY, "data": {"name": "idx", "path": ds["ref"]}}
        r = c.post("/jobs", json={"recipe": recipe})
        assert r.status_code == 422 and "no uploaded dataset" in r.json()["detail"]
    with server.client(alice) as c:  # and alice still has both
        assert c.get(f"/jobs/{j}").status_code == 200
        assert c.get(f"/jobs/{j}/artifacts/report.md").text == "# hi\n"


@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fservice.db", "%2E%2E/%2E%2E/service.db", "student/..%2F..%2F..%2Flock",
     "%2Fetc%2Fpasswd", "%2E%2E", "a/%2E/b", "..%5C..%5Cservice.db"],
)  # fmt: skip
def test_path_traversal_in_artifact_names_is_400(server, alice, jobs, name):
    job, _ = jobs
    with server.client(alice) as c:
        r = c.get(f"/jobs/{job['id']}/artifacts/{name}")
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        assert "bad file name" in r.json()["detail"]


def test_symlink_out_of_the_run_dir_is_400(server, alice, jobs):
    job, _ = jobs
    link = server.job_dir(job["id"]) / "run" / "escape"
    link.symlink_to(server.data_dir / "service.db" if server.db_url.startswith("sqlite")
                    else "/etc/hostname")  # fmt: skip
    with server.client(alice) as c:
        assert c.get(f"/jobs/{job['id']}/artifacts/escape").status_code == 400


@pytest.mark.parametrize("filename", ["../evil.zip", "..", "a/b.zip", ".hidden.zip", "x\\..\\y"])
def test_path_traversal_in_dataset_names_is_400(server, alice, filename):
    with server.client(alice) as c:
        r = c.post("/datasets", params={"filename": filename}, content=tiny_idx_zip())
        assert r.status_code == 400, (filename, r.text)


@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "a/../../evil", "C:evil"])
def test_path_traversal_inside_an_uploaded_zip_is_400(server, alice, member):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr(member, "escape")
    with server.client(alice) as c:
        r = c.post("/datasets", params={"filename": "e.zip"}, content=buf.getvalue())
        assert r.status_code == 400 and "bad name" in r.json()["detail"]
    assert not (server.data_dir / "evil").exists() and not (server.root / "evil").exists()
    assert list((server.data_dir / "datasets").glob("*/ok.txt")) == []  # nothing left behind


def test_oversized_upload_is_413(server, alice):
    big = os.urandom(150 * 1024)  # the test server's limit is 0.1 MB
    with server.client(alice) as c:
        r = c.post("/datasets", params={"filename": "big.zip"}, content=big)
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while it streams
            for i in range(0, len(big), 16384):
                yield big[i : i + 16384]

        r = c.post("/datasets", params={"filename": "big.zip"}, content=chunks())
        assert r.status_code == 413
    leftovers = list((server.data_dir / "datasets").glob(".*"))
    assert leftovers == []


def test_not_a_zip_is_400(server, alice):
    with server.client(alice) as c:
        r = c.post("/datasets", params={"filename": "x.zip"}, content=b"plain text")
        assert r.status_code == 400 and "ZIP" in r.json()["detail"]


@pytest.mark.parametrize(
    "path", ["/etc", "/", "data:../..", "data:../../etc", "relative/folder", "~/x", "/proc/self"]
)
def test_dataset_path_outside_every_data_root_is_422(server, alice, path):
    with server.client(alice) as c:
        r = c.post("/jobs", json={"recipe": {**TINY, "data": {"name": "idx", "path": path}}})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail.startswith("recipe: data.path: ") and "data root" in detail


def test_symlink_in_a_data_root_pointing_out_is_422(server, alice):
    (server.data_root / "sneaky").symlink_to("/etc")
    with server.client(alice) as c:
        r = c.post(
            "/jobs", json={"recipe": {**TINY, "data": {"name": "idx", "path": "data:sneaky"}}}
        )
        assert r.status_code == 422 and "outside every data root" in r.json()["detail"]


def test_teacher_checkpoint_outside_the_roots_is_422(server, alice):
    recipe = {**TINY, "teacher": {"kind": "module", "model": {"name": "mlp"},
                                  "checkpoint": "/etc/passwd"}}  # fmt: skip
    with server.client(alice) as c:
        r = c.post("/jobs", json={"recipe": recipe})
        assert r.status_code == 422 and "teacher.checkpoint" in r.json()["detail"]


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"student": {"model": {"name": "resnet9000"}}}, "student.model"),
        ({"student": {"model": {"name": "os.system"}}}, "student.model"),
        ({"student": {"model": {"name": "torchvision.models:resnet18"}}}, "student.model"),
        ({"data": {"name": "pickle.loads"}}, "data"),
        ({"teacher": {"kind": "module:evil.Teacher", "model": {"name": "mlp"}}}, "teacher"),
        ({"loss": {"my.module:Loss": {}}}, "loss.my.module:Loss"),
        ({"student": {"model": {"name": "mlp", "class": "evil.Net"}}}, "student.model.class"),
        ({"callbacks": ["evil:hook"]}, "callbacks"),
    ],
)
def test_unknown_component_or_import_path_is_422(server, alice, patch, key):
    with server.client(alice) as c:
        r = c.post("/jobs", json={"recipe": {**TINY, **patch}})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail.startswith(f"recipe: {key}"), detail


def _every_stored_value(server) -> list[str]:
    """Every cell of every table, read through a real connection to the database: sqlite3
    (which reads the WAL, where a fresh commit may still sit) or psycopg on PostgreSQL."""
    cells: list[str] = []
    if server.db_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(str(server.data_dir / "service.db"), timeout=60)
        try:
            tables = [
                t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for t in tables:
                for row in conn.execute(f'SELECT * FROM "{t}"'):
                    cells += [str(v) for v in row]
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(server.db_url, connect_timeout=10) as conn:
            tables = [t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]  # fmt: skip
            for t in tables:
                for row in conn.execute(f'SELECT * FROM "{t}"'):
                    cells += [str(v) for v in row]
    assert cells, "read nothing from the database"
    return cells


def test_a_token_is_stored_only_as_its_hash(server):
    from darkknowledge.service.auth import hash_token

    token = server.token_in_process("carol")
    assert token.startswith("dk_") and len(token) > 40
    cells = _every_stored_value(server)
    assert not [c for c in cells if token in c], "the plain token is stored in the database"
    assert hash_token(token) in cells, "the token's SHA-256 hash is not stored"
    if server.db_url.startswith("sqlite"):  # nor in the raw files, WAL included
        for f in server.data_dir.glob("service.db*"):
            assert token.encode() not in f.read_bytes(), f"plain token in {f.name}"
    res = __import__("subprocess").run(
        server._dk("serve", "token", "create", "carol"),
        env=server.env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "exists" in res.stderr
