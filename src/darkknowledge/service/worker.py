"""Workers: claim queued jobs atomically, run each in a forked child, heartbeat, recover.

Claiming is one conditional ``UPDATE ... WHERE state = 'queued'`` (with ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL), so two workers can never both start a job. While a child runs,
its worker holds an exclusive ``flock`` on the job's ``lock`` file (the child shares it)
and writes a heartbeat; every write is fenced by (worker, attempt), so a worker that has
lost its job stops its child at once.

A job is orphaned when its heartbeat is stale *and* nobody holds its lock: the worker and
child died (SIGKILL, power cut, ``dk serve`` restarted). Any worker then requeues it
with ``resume``, and the next start continues from the run's last checkpoint, or marks
it failed with the reason after ``max_attempts`` starts. Workers and children die with
their parent (``PR_SET_PDEATHSIG``), so a killed server leaves no training behind.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from .db import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, make_engine
from .jobs import job_dir
from .settings import ServiceSettings, load_settings

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


def _warn(msg: str) -> None:
    print(f"dk worker {os.getpid()}: {msg.splitlines()[0]}", file=sys.stderr, flush=True)


def events(jdir: Path, **rec) -> None:
    """Append one line to the job's events.jsonl (its starts, ends and recoveries)."""
    jdir.mkdir(parents=True, exist_ok=True)
    with open(jdir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **rec}) + "\n")


def lock_is_free(jdir: Path) -> bool:
    path = jdir / "lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def last_error(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :][:2000]
    return next((ln for ln in reversed(lines) if ln.strip()), "")[:2000]


class Worker:
    def __init__(self, settings: ServiceSettings, name: str):
        self.s = settings
        self.name = name
        self.engine = make_engine(settings.database_url)
        self.stopping = False
        self._last_recover = 0.0

    # ------------------------------------------------------------ database steps

    def claim(self) -> tuple[int, int, dict] | None:
        now = time.time()
        oldest = (
            select(Job.id)
            .where(Job.state == QUEUED)
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(Job)
            .where(Job.id == oldest, Job.state == QUEUED)
            .values(
                state=RUNNING,
                worker=self.name,
                heartbeat_at=now,
                started_at=func.coalesce(Job.started_at, now),
                attempts=Job.attempts + 1,
            )
            .returning(Job.id, Job.attempts, Job.resolved, Job.resume)
        )
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        job_id, attempt, resolved, resume = row
        events(job_dir(self.s, job_id), event="start", attempt=attempt, resume=bool(resume),
               worker=self.name)  # fmt: skip
        return job_id, attempt, resolved

    def _fenced(self, job_id: int, attempt: int):
        return update(Job).where(
            Job.id == job_id, Job.worker == self.name, Job.attempts == attempt, Job.state == RUNNING
        )

    def heartbeat(self, job_id: int, attempt: int) -> tuple[bool, bool]:
        """(still ours, cancel requested)."""
        with self.engine.begin() as conn:
            n = conn.execute(
                self._fenced(job_id, attempt).values(heartbeat_at=time.time())
            ).rowcount
            if not n:
                return False, False
            cancel = conn.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar()
        return True, bool(cancel)

    def finish(self, job_id: int, attempt: int, **values) -> bool:
        values.setdefault("finished_at", time.time())
        with self.engine.begin() as conn:
            return bool(conn.execute(self._fenced(job_id, attempt).values(**values)).rowcount)

    def recover(self) -> int:
        """Requeue (or fail) running jobs whose worker is gone. Returns how many."""
        cutoff = time.time() - max(2 * self.s.heartbeat_s, 1.0)
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(Job.id, Job.attempts, Job.worker, Job.cancel_requested).where(
                    Job.state == RUNNING, Job.heartbeat_at < cutoff
                )
            ).all()
        n = 0
        for job_id, attempts, worker, cancel in rows:
            jdir = job_dir(self.s, job_id)
            if not lock_is_free(jdir):
                continue  # its process still runs: slow, not dead
            if cancel:
                values = {"state": CANCELLED, "finished_at": time.time(), "error": "cancelled"}
            elif attempts >= self.s.max_attempts:
                values = {
                    "state": FAILED,
                    "finished_at": time.time(),
                    "error": f"the process running it died {attempts} time(s) "
                    f"(max_attempts={self.s.max_attempts}); last worker {worker}",
                }
            else:
                values = {"state": QUEUED, "resume": True, "worker": None}
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == RUNNING, Job.attempts == attempts)
                    .where(Job.heartbeat_at < cutoff)
                    .values(**values)
                ).rowcount
            if done:
                n += 1
                events(jdir, event="recovered", by=self.name, dead_worker=worker,
                       attempt=attempts, now=values["state"])  # fmt: skip
        return n

    # ------------------------------------------------------------ running a job

    def run_one(self, job_id: int, attempt: int, resolved: dict) -> str:
        jdir = job_dir(self.s, job_id)
        jdir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(jdir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process still has this job: leave it to recovery
            os.close(lock_fd)
            self.finish(job_id, attempt, state=QUEUED, worker=None, finished_at=None)
            return "busy"
        try:
            return self._supervise(job_id, attempt, resolved, jdir)
        finally:
            os.close(lock_fd)  # the lock goes when the child is gone too

    def _supervise(self, job_id: int, attempt: int, resolved: dict, jdir: Path) -> str:
        from .runner import child_main

        sys.stdout.flush()
        sys.stderr.flush()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                die_with_parent(me)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                child_main(jdir, resolved, self.s.threads_per_job, jdir / "log.txt")
            finally:
                os._exit(1)
        last_hb = time.monotonic()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if self.stopping:  # graceful stop: the next start resumes; this one doesn't count
                self._stop_child(pid)
                self.finish(job_id, attempt, state=QUEUED, resume=True, worker=None,
                            attempts=attempt - 1, finished_at=None)  # fmt: skip
                events(jdir, event="end", attempt=attempt, state="requeued (worker stopping)")
                return "requeued"
            if time.monotonic() - last_hb >= self.s.heartbeat_s:
                last_hb = time.monotonic()
                try:
                    ours, cancel = self.heartbeat(job_id, attempt)
                except SQLAlchemyError as e:  # the database is away: keep training, retry
                    _warn(f"heartbeat for job {job_id} failed: {e}")
                    ours, cancel = True, False
                if not ours:
                    self._stop_child(pid)
                    events(jdir, event="end", attempt=attempt, state="lost (job changed)")
                    return "lost"
                if cancel:
                    self._stop_child(pid)
                    self.finish(job_id, attempt, state=CANCELLED, error="cancelled while running")
                    events(jdir, event="end", attempt=attempt, state=CANCELLED)
                    return CANCELLED
            time.sleep(0.05)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            state, error = SUCCEEDED, None
        else:
            why = last_error(jdir / "log.txt")
            state = FAILED
            error = why or (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        self.finish(job_id, attempt, state=state, error=error)
        events(jdir, event="end", attempt=attempt, state=state, exit=code)
        return state

    @staticmethod
    def _stop_child(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    # ------------------------------------------------------------ the loop

    def loop(self, max_jobs: int | None = None) -> None:
        ran = 0
        while not self.stopping and (max_jobs is None or ran < max_jobs):
            now = time.monotonic()
            try:
                if now - self._last_recover >= max(self.s.heartbeat_s, 0.5):
                    self._last_recover = now
                    self.recover()
                claimed = self.claim()
            except SQLAlchemyError as e:  # e.g. PostgreSQL restarting: wait, then go on
                _warn(f"database error, retrying in 2 s: {e}")
                time.sleep(2)
                continue
            if claimed is None:
                time.sleep(self.s.poll_s)
                continue
            self.run_one(*claimed)
            ran += 1


def _warm_imports() -> None:
    """Import what every job needs once, here; forked children then start at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import sklearn.datasets  # noqa: F401  (digits)
    import torch._dynamo  # noqa: F401  (imported lazily by the first optimizer: 2 s)

    from .. import pipeline  # noqa: F401
    from ..data import load_data  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m darkknowledge.service.worker")
    p.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--parent", type=int, default=None, help="die when this process dies")
    args = p.parse_args(argv)
    if args.parent is not None:
        die_with_parent(args.parent)
    settings = load_settings()
    w = Worker(settings, args.name)

    def _stop(*_):
        w.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _warm_imports()
    w.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
