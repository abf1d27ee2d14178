"""The worker's database steps on a real database, without a server: claiming is
exclusive, and recovery requeues, fails or leaves alone exactly the right jobs."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from darkknowledge.service.db import Job, Token, init_db, make_engine, session_factory
from darkknowledge.service.settings import ServiceSettings
from darkknowledge.service.worker import Worker


@pytest.fixture
def setup(db_url, tmp_path):
    url = db_url or f"sqlite:///{tmp_path / 'w.db'}"
    settings = ServiceSettings(data_dir=tmp_path, database_url=url, heartbeat_s=0.2,
                               max_attempts=2)  # fmt: skip
    engine = make_engine(url)
    init_db(engine)
    sessions = session_factory(engine)
    with sessions() as db:
        db.query(Job).delete()
        db.query(Token).delete()
        db.add(Token(id=1, name="t", token_hash="x" * 64))
        db.commit()
    yield settings, sessions
    engine.dispose()


def _add(sessions, n: int, **values) -> list[int]:
    with sessions() as db:
        jobs = [Job(owner_id=1, name="j", recipe={}, resolved={}, **values) for _ in range(n)]
        db.add_all(jobs)
        db.commit()
        return [j.id for j in jobs]


def test_concurrent_claims_take_each_job_once(setup):
    settings, sessions = setup
    ids = _add(sessions, 30)
    workers = [Worker(settings, f"w{i}") for i in range(4)]
    got: dict[str, list[int]] = {w.name: [] for w in workers}

    def drain(w: Worker):
        for _ in range(200):  # bounded
            c = w.claim()
            if c is None:
                return
            got[w.name].append(c[0])

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [j for js in got.values() for j in js]
    assert sorted(claimed) == sorted(ids)  # all, none twice
    with sessions() as db:
        assert {(j.state, j.attempts) for j in db.query(Job)} == {("running", 1)}


def test_recovery_requeues_fails_or_leaves_alone(setup):
    settings, sessions = setup
    stale = time.time() - 60
    requeue, give_up, alive, cancel, fresh = (
        _add(
            sessions,
            1,
            state="running",
            attempts=a,
            heartbeat_at=h,
            worker="dead",
            cancel_requested=c,
        )[0]
        for a, h, c in [
            (1, stale, False),
            (2, stale, False),
            (1, stale, False),
            (1, stale, True),
            (1, time.time() + 60, False),
        ]
    )
    # "alive": its process still holds the lock, however old the heartbeat
    (settings.jobs_dir / str(alive)).mkdir(parents=True)
    fd = os.open(settings.jobs_dir / str(alive) / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert Worker(settings, "rescuer").recover() == 3
    finally:
        os.close(fd)
    with sessions() as db:
        s = {j.id: j for j in db.query(Job)}
    assert (s[requeue].state, s[requeue].resume, s[requeue].worker) == ("queued", True, None)
    assert s[give_up].state == "failed" and "died 2 time(s)" in s[give_up].error
    assert s[alive].state == "running"
    assert s[cancel].state == "cancelled"
    assert s[fresh].state == "running"
    # the requeued job is claimed again as attempt 2, resuming
    assert Worker(settings, "next").claim()[:2] == (requeue, 2)
