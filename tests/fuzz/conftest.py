"""The fuzz suite runs in the default test run: fixed seeds, in-process, bounded time.

Every test here runs in its own tmp folder as the working directory, under an alarm (a
hang fails the test), and the session checks that no file of the repository or the
shared data went missing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WATCHED = [ROOT / "recipes", ROOT / "src", ROOT / "tests", ROOT.parent / "shared" / "data"]
HANG_S = 120  # one test (all its examples) that runs longer than this has hung


def _files(roots: list[Path]) -> set[str]:
    out = set()
    for r in roots:
        if not r.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(r):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".hypothesis")]
            out.update(os.path.join(dirpath, f) for f in filenames)
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_deleted():
    before = _files(WATCHED)
    yield
    gone = before - _files(WATCHED)
    assert not gone, f"the fuzz suite deleted files outside its tmp folders: {sorted(gone)[:5]}"


@pytest.fixture(autouse=True)
def in_tmp_with_alarm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def hung(*_):
        raise TimeoutError(f"a fuzz test ran past {HANG_S} s (a hang)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
