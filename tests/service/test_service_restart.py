"""SIGKILL the whole server mid-job, restart it: the job finishes, resumed from its last
checkpoint, with nothing lost (the same weights as an uninterrupted run)."""

from __future__ import annotations

import json
import time

from safetensors.torch import load_file
from sqlalchemy import text

from conftest import TINY, Server, wait_job
from darkknowledge.service.worker import lock_is_free

# dropout makes the result depend on the RNG state, so an inexact resume would show
SLOW = {
    **TINY,
    "student": {"model": {"name": "mlp", "hidden": [24], "dropout": 0.2}},
    "train": {"epochs": 6, "batch_size": 16, "checkpoint_every": 10, "seed": 3},
}


def test_sigkill_server_mid_job_then_restart_resumes(db_url, tmp_path):
    srv = Server(tmp_path, db_url, workers=1).start()
    try:
        token = srv.token("alice")
        with srv.client(token) as c:
            job = c.post("/jobs", json={"recipe": SLOW}).json()
        jdir = srv.job_dir(job["id"])
        ckpt = jdir / "run" / "student" / "checkpoint.pt"
        final = jdir / "run" / "student" / "model.safetensors"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.01)
        assert ckpt.exists(), srv.log()
        srv.kill()  # the server process: its workers and their children die with it

        deadline = time.time() + 10
        while not lock_is_free(jdir) and time.time() < deadline:
            time.sleep(0.05)
        assert lock_is_free(jdir), "a training process outlived the server"
        assert not final.exists(), "the job finished before the kill; make it longer"
        metrics = jdir / "run" / "student" / "metrics.jsonl"
        size = metrics.stat().st_size
        time.sleep(0.5)
        assert metrics.stat().st_size == size  # nothing trains any more
        with srv.engine().connect() as conn:
            state = conn.execute(text("SELECT state FROM jobs WHERE id = :i"), {"i": job["id"]})
            assert state.scalar() == "running"  # as the crash left it

        srv.start()
        with srv.client(token) as c:
            done = wait_job(c, job["id"], timeout=180)
            assert done["state"] == "succeeded", c.get(f"/jobs/{job['id']}/logs").text
            assert done["attempts"] == 2
            # the same recipe, uninterrupted, in the same service
            clean = c.post("/jobs", json={"recipe": SLOW}).json()
            assert wait_job(c, clean["id"], timeout=180)["state"] == "succeeded"

        events = [json.loads(x) for x in (jdir / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["start", "recovered", "start", "end"]
        assert [e.get("resume") for e in events if e["event"] == "start"] == [False, True]
        assert events[-1]["state"] == "succeeded"

        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        resumes = [r for r in recs if r.get("event") == "resume"]
        assert len(resumes) == 1 and resumes[0]["step"] >= 10
        steps = [r["step"] for r in recs if "loss" in r]
        total = json.loads((jdir / "plan.json").read_text())["phases"][0]["total"]
        assert steps == sorted(set(steps)) and steps[-1] == total  # none lost, none twice

        a = load_file(str(final))
        b = load_file(str(srv.job_dir(clean["id"]) / "run" / "student" / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    finally:
        srv.stop()
