"""Load on the job service: N submissions from C concurrent clients against a real
``dk serve`` on loopback; measures submission latency, throughput and queueing, and
checks that every job ran exactly once (database + run directories).

    .venv/bin/python bench/service_load.py --jobs 200 --clients 20 --workers 2 \
        --out docs/results/service_load.json

Writes JSON (``--out``) and prints a Markdown table. Bounded: it gives up after
``--timeout`` seconds. Use ``--database-url postgresql://...`` for PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import text

from darkknowledge.service.auth import create_token
from darkknowledge.service.db import init_db, make_engine, session_factory

RECIPE = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 64},
    "eval": {"latency": False},
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dk-bench-"))
    data_dir = tmp / "svc"
    db_url = args.database_url or f"sqlite:///{data_dir / 'service.db'}"
    data_dir.mkdir()
    engine = make_engine(db_url)
    init_db(engine)
    with session_factory(engine)() as db:
        tokens = [create_token(db, f"bench{i}") for i in range(args.clients)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DK_SERVE_DATA_DIR": str(data_dir), "DK_SERVE_DATABASE_URL": db_url,
           "DK_SERVE_WORKERS": str(args.workers), "DK_SERVE_POLL_S": "0.05"}  # fmt: skip
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "darkknowledge.cli", "serve", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start; see " + str(tmp / "server.log"))

        per_client = [args.jobs // args.clients + (i < args.jobs % args.clients)
                      for i in range(args.clients)]  # fmt: skip

        def client(i: int) -> list[tuple[int, float, int]]:
            out = []
            with httpx.Client(base_url=base, timeout=120,
                              headers={"Authorization": f"Bearer {tokens[i]}"}) as c:  # fmt: skip
                for k in range(per_client[i]):
                    recipe = {**RECIPE, "train": {**RECIPE["train"], "seed": k}}
                    t = time.perf_counter()
                    r = c.post("/jobs", json={"recipe": recipe, "name": f"b{i}-{k}"})
                    out.append((r.status_code, time.perf_counter() - t,
                                r.json().get("id", -1)))  # fmt: skip
            return out

        t0 = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [x for xs in pool.map(client, range(args.clients)) for x in xs]
        t_submitted = time.time()
        codes = [c for c, _, _ in results]
        lat_ms = [1000 * s for _, s, _ in results]
        ids = {j for _, _, j in results}

        while time.time() - t0 < args.timeout:
            with engine.connect() as conn:
                left = conn.execute(
                    text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
                ).scalar()
            if left == 0:
                break
            time.sleep(0.5)
        t_done = time.time()
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, state, attempts, created_at, started_at, finished_at FROM jobs")
            ).all()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    starts = {}
    for d in (data_dir / "jobs").iterdir():
        ev = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
        starts[int(d.name)] = sum(e["event"] == "start" for e in ev)
    done = [r for r in rows if r.state == "succeeded"]
    wait_s = [r.started_at - r.created_at for r in done]
    run_s = [r.finished_at - r.started_at for r in done]
    res = {
        "command": "python bench/service_load.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "database": "postgresql" if db_url.startswith("postgresql") else "sqlite (WAL)",
        "jobs": args.jobs,
        "clients": args.clients,
        "workers": args.workers,
        "accepted": codes.count(201),
        "rejected": len(codes) - codes.count(201),
        "unique_ids": len(ids),
        "succeeded": len(done),
        "ran_exactly_once_db": sum(r.attempts == 1 for r in rows),
        "ran_exactly_once_dirs": sum(v == 1 for v in starts.values()),
        "run_dirs": len(starts),
        "submit_ms": {
            "p50": pct(lat_ms, 50),
            "p95": pct(lat_ms, 95),
            "p99": pct(lat_ms, 99),
            "max": max(lat_ms),
        },
        "submit_wall_s": t_submitted - t0,
        "submissions_per_s": len(codes) / (t_submitted - t0),
        "makespan_s": t_done - t0,
        "jobs_per_s": len(done) / (t_done - t0),
        "queue_wait_s": {"p50": pct(wait_s, 50), "max": max(wait_s)} if wait_s else None,
        "run_s": {"p50": pct(run_s, 50), "mean": statistics.fmean(run_s)} if run_s else None,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    ok = res["accepted"] == res["succeeded"] == res["ran_exactly_once_db"] == args.jobs
    return 0 if ok and res["ran_exactly_once_dirs"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
