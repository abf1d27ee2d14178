"""40 submissions from 8 concurrent clients: all accepted, each run exactly once
(checked in the database and in the run directories)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text

from conftest import FINISHED, TINY, Server
from darkknowledge.service.auth import create_token
from darkknowledge.service.db import session_factory

CLIENTS, PER_CLIENT = 8, 5


def test_40_submissions_from_8_clients_run_exactly_once(db_url, tmp_path):
    srv = Server(tmp_path, db_url, workers=2).start()
    try:
        engine = srv.engine()
        with session_factory(engine)() as db:
            tokens = [create_token(db, f"client{i}") for i in range(CLIENTS)]

        def client(i: int) -> list[int]:
            ids = []
            with srv.client(tokens[i]) as c:
                for k in range(PER_CLIENT):
                    recipe = {**TINY, "train": {**TINY["train"], "seed": k}}
                    r = c.post("/jobs", json={"recipe": recipe, "name": f"c{i}-{k}"})
                    assert r.status_code == 201, r.text
                    ids.append(r.json()["id"])
            return ids

        with ThreadPoolExecutor(CLIENTS) as pool:
            per_client = list(pool.map(client, range(CLIENTS)))
        ids = [j for ids in per_client for j in ids]
        assert len(set(ids)) == CLIENTS * PER_CLIENT

        deadline = time.time() + 240
        for i, own in enumerate(per_client):
            with srv.client(tokens[i]) as c:
                while time.time() < deadline:  # one list request per client per poll
                    listed = c.get("/jobs").json()
                    if all(j["state"] in FINISHED for j in listed["data"]):
                        break
                    time.sleep(0.5)
                assert listed["count"] == PER_CLIENT  # each client sees only its own
                assert sorted(j["id"] for j in listed["data"]) == sorted(own)
                assert {j["state"] for j in listed["data"]} == {"succeeded"}

        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, state, attempts, owner_id FROM jobs")).all()
        assert len(rows) == CLIENTS * PER_CLIENT
        assert {r.id for r in rows} == set(ids)
        assert all(r.state == "succeeded" and r.attempts == 1 for r in rows)
        assert len({r.owner_id for r in rows}) == CLIENTS

        dirs = sorted((srv.data_dir / "jobs").iterdir())
        assert sorted(int(d.name) for d in dirs) == sorted(ids)
        for d in dirs:
            events = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
            assert [e["event"] for e in events] == ["start", "end"], d
            assert events[1]["state"] == "succeeded"
            assert (d / "run" / "report.json").exists()
            assert (d / "run" / "student" / "model.safetensors").exists()
            metrics = (d / "run" / "student" / "metrics.jsonl").read_text()
            assert '"resume"' not in metrics
        workers = {
            json.loads((d / "events.jsonl").read_text().splitlines()[0])["worker"] for d in dirs
        }
        assert len(workers) == 2  # both workers took jobs
    finally:
        srv.stop()
