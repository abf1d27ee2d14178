"""The job API end to end against a real server: submit, run, download, reload; uploads;
cancel; delete; a failing job; on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import json
import time
import zipfile

import torch
from sqlalchemy import text

import darkknowledge as dk
from conftest import TINY, TINY_KD, tiny_idx_zip, wait_job


def test_submit_run_download_reload(server, alice, tmp_path):
    with server.client(alice) as c:
        r = c.post("/jobs", json={"recipe": TINY_KD, "name": "kd tiny"})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] in ("queued", "running") and job["name"] == "kd tiny"
        done = wait_job(c, job["id"])
        assert done["state"] == "succeeded", c.get(f"/jobs/{job['id']}/logs").text
        assert done["progress"]["fraction"] == 1.0 and done["attempts"] == 1

        z = c.get(f"/jobs/{job['id']}/student")
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        zipfile.ZipFile(io.BytesIO(z.content)).extractall(tmp_path / "student")
        model = dk.load_model(tmp_path / "student")
        report = c.get(f"/jobs/{job['id']}/report").json()
        assert set(report["rows"]) == {"teacher", "student"}

        # the reloaded student reproduces the service's test accuracy on the same split
        from darkknowledge.data import load_digits_split

        _, test = load_digits_split()
        with torch.no_grad():
            acc = float((model(test.x).argmax(-1) == test.y).float().mean())
        assert abs(acc - report["rows"]["student"]["accuracy"]) < 1e-6

        names = {a["name"] for a in c.get(f"/jobs/{job['id']}/artifacts").json()}
        assert {"report.json", "report.md", "config.yaml", "student/model.safetensors"} <= names
        png = c.get(f"/jobs/{job['id']}/artifacts/accuracy_vs_size.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        metrics = c.get(f"/jobs/{job['id']}/metrics").json()
        assert [m["epoch"] for m in metrics["student"]] == [1, 2]
        assert "val_acc" in metrics["student"][-1]
        assert "done: test accuracy" in c.get(f"/jobs/{job['id']}/logs").text

        listed = c.get("/jobs", params={"state": "succeeded"}).json()
        assert job["id"] in [j["id"] for j in listed["data"]]
        assert c.get("/jobs", params={"state": "failed"}).json()["count"] == 0
        assert c.get("/jobs", params={"state": "nonsense"}).status_code == 422


def test_uploaded_dataset_job(server, alice):
    with server.client(alice) as c:
        r = c.post("/datasets", params={"filename": "quads.zip"}, content=tiny_idx_zip(),
                   headers={"content-type": "application/zip"})  # fmt: skip
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["ref"] == f"dataset:{ds['id']}" and "train-images-idx3-ubyte" in ds["files"]
        assert c.get(f"/datasets/{ds['id']}").json()["sha256"] == ds["sha256"]
        recipe = {
            **TINY,
            "data": {"name": "idx", "path": ds["ref"]},
            "train": {"epochs": 10, "batch_size": 32, "lr": 0.01},
        }
        job = c.post("/jobs", json={"recipe": recipe}).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "succeeded", c.get(f"/jobs/{job['id']}/logs").text
        rep = c.get(f"/jobs/{job['id']}/report").json()
        assert rep["sizes"]["test"] == 100 and rep["rows"]["model"]["accuracy"] > 0.9


def test_dataset_in_a_data_root(server, alice):
    import zipfile as zf

    folder = server.data_root / "quads"
    zf.ZipFile(io.BytesIO(tiny_idx_zip(seed=1))).extractall(folder)
    with server.client(alice) as c:
        for path in ("data:quads", str(folder)):
            recipe = {**TINY, "data": {"name": "idx", "path": path}}
            r = c.post("/jobs", json={"recipe": recipe})
            assert r.status_code == 201, r.text
            assert wait_job(c, r.json()["id"])["state"] == "succeeded"


def test_failing_job_is_marked_failed_with_the_reason(server, alice):
    (server.data_root / "not_idx").mkdir(exist_ok=True)
    with server.client(alice) as c:
        recipe = {**TINY, "data": {"name": "idx", "path": "data:not_idx"}}
        job = c.post("/jobs", json={"recipe": recipe}).json()
        done = wait_job(c, job["id"])
        assert done["state"] == "failed"
        assert "train-images-idx3-ubyte" in done["error"] and "Traceback" not in done["error"]
        assert c.get(f"/jobs/{job['id']}/student").status_code == 409


def test_cancel_running_and_queued_jobs(server, alice):
    long = {**TINY, "train": {"epochs": 500, "batch_size": 16}}
    with server.client(alice) as c:
        a = c.post("/jobs", json={"recipe": long}).json()
        b = c.post("/jobs", json={"recipe": long}).json()
        q = c.post("/jobs", json={"recipe": long}).json()  # 2 workers: this one waits
        wait_job(c, a["id"], states=("running",), timeout=60)
        r = c.post(f"/jobs/{q['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        for j in (a, b):
            r = c.post(f"/jobs/{j['id']}/cancel")
            assert r.status_code == 200
            assert r.json()["state"] in ("cancelled", "running")  # running: stops soon
        t0 = time.time()
        for j in (a, b):
            assert wait_job(c, j["id"], timeout=30)["state"] == "cancelled"
        assert time.time() - t0 < 15
        assert not (server.job_dir(q["id"]) / "run").exists()  # never started
        # the training child is gone: its metrics stop growing
        m = server.job_dir(a["id"]) / "run" / "student" / "metrics.jsonl"
        size = m.stat().st_size if m.exists() else 0
        time.sleep(1.0)
        assert (m.stat().st_size if m.exists() else 0) == size
        assert c.post(f"/jobs/{a['id']}/cancel").status_code == 409
        # delete: a finished job goes with its files; afterwards it is 404
        assert c.delete(f"/jobs/{a['id']}").status_code == 204
        assert c.get(f"/jobs/{a['id']}").status_code == 404
        assert not server.job_dir(a["id"]).exists()


def test_running_job_cannot_be_deleted(server, alice):
    long = {**TINY, "train": {"epochs": 500, "batch_size": 16}}
    with server.client(alice) as c:
        j = c.post("/jobs", json={"recipe": long}).json()
        wait_job(c, j["id"], states=("running",), timeout=60)
        r = c.delete(f"/jobs/{j['id']}")
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
        c.post(f"/jobs/{j['id']}/cancel")
        assert wait_job(c, j["id"], timeout=30)["state"] == "cancelled"


def test_database_rows_match_the_api(server, alice):
    with server.client(alice) as c:
        listed = c.get("/jobs", params={"limit": 500}).json()
    with server.engine().connect() as conn:
        rows = dict(conn.execute(text("SELECT id, state FROM jobs")).all())
        hashes = [h for (h,) in conn.execute(text("SELECT token_hash FROM tokens"))]
    assert {j["id"]: j["state"] for j in listed["data"]} == {
        k: v for k, v in rows.items() if k in {j["id"] for j in listed["data"]}
    }
    assert alice not in hashes and all(len(h) == 64 for h in hashes)  # only hashes stored
    assert json.dumps(listed).count(alice) == 0


def test_dashboard_pages_render(server, alice):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as web:
        assert web.get("/ui/jobs").headers["location"] == "/ui/login"  # redirect, no cookie
        assert web.post("/ui/login", data={"token": "dk_nope"}).status_code == 401
        r = web.post("/ui/login", data={"token": alice})
        assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
        listing = web.get("/ui/jobs")
        assert listing.status_code == 200 and "kd tiny" in listing.text
        r = web.post("/ui/jobs", data={"recipe": "data: [unclosed", "name": "x"})
        assert r.status_code == 422 and "malformed YAML" in r.text
        r = web.post("/ui/jobs", data={"recipe": "!!python/object/apply:os.system [id]"})
        assert r.status_code == 422 and "Traceback" not in r.text
        with server.client(alice) as c:
            done = [j for j in c.get("/jobs").json()["data"] if j["state"] == "succeeded"]
        page = web.get(f"/ui/jobs/{done[-1]['id']}")
        assert page.status_code == 200 and 'id="report"' in page.text
        assert web.get("/ui/jobs/99999999999").status_code == 404
        # a refused form comes back with what was typed, every field escaped
        payload = '"><script>alert("dk")</script><img src=x onerror=alert(1)>'
        r = web.post(
            "/ui/jobs",
            data={"name": payload, "recipe": f"data: {{name: '{payload}'}}\n# {payload}\n"},
        )
        assert r.status_code == 422
        assert r.text.count("&lt;script&gt;alert(") == 4  # the error, the name, the recipe ×2
        assert "<script>alert" not in r.text and "<img src=x" not in r.text
