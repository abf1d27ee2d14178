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


@pytest.fixture
def one_thread():
    """One torch thread for a test: on a shared 2-core machine a second thread mostly waits."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
