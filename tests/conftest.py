import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED / "mnist"
    if not d.exists():
        pytest.skip(f"{d} not present")
    return d


@pytest.fixture(scope="session")
def reasoning_recipes(tmp_path_factory) -> Path:
    """recipes/reasoning copied into a tree of the repository's shape whose
    runs/reasoning holds small seeded splits (the recipes' relative paths resolve there)
    and, for what the experiment's later stages write (generated rows, the arms' rows,
    the log-prob store, trained models), the distillation rows and empty folders."""
    import shutil

    from darkknowledge.blackbox.chains import write_splits

    tree = tmp_path_factory.mktemp("reasoning_tree")
    dst = tree / "recipes" / "reasoning"
    shutil.copytree(ROOT / "recipes" / "reasoning", dst)
    runs = tree / "runs" / "reasoning"
    write_splits(runs / "data", 0, {"teacher_train": 300, "distill": 200, "dev": 50, "test": 500})
    for f in ("generate/sft.jsonl", "arms/unverified.jsonl", "arms/verified_answers.jsonl"):
        (runs / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(runs / "data" / "distill.jsonl", runs / f)
    for d in ("store", "teacher/student/model", "students/verified_s0/student/model"):
        (runs / d).mkdir(parents=True)
    return dst


@pytest.fixture
def one_thread():
    """One torch thread for a test: on a shared 2-core machine a second thread mostly waits."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def _teacher_process(model_dir: Path, name: str):
    """``dk serve-teacher MODEL_DIR`` in its own process on a free loopback port, until
    it answers ``GET /models``: its base URL (the process is killed on exit; its output
    is in ``serve-NAME.log`` beside the model folder)."""
    from darkknowledge.blackbox.serve import start_server

    proc, url = start_server(model_dir, Path(model_dir).parent / f"serve-{name}.log", name=name)
    try:
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def teacher_process():
    """``with teacher_process(MODEL_DIR, NAME) as url``: `dk serve-teacher` served from
    its own process (a real server, as users run it)."""
    return _teacher_process
