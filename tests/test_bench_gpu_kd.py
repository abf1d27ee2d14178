"""bench/gpu_kd.py --smoke: every measured code path of the GPU bench on the CPU, in one
process, and darkknowledge's chunked losses against TRL's on the same inputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_kd.py"
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LIGER_CPU = "liger: not run on CPU (Triton kernels need a GPU)"


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def _numbers(obj, path=""):
    """Every number in a JSON tree, with where it is."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    pytest.importorskip("trl")
    if not TEXT.exists():
        if os.environ.get("DK_TEST_DATA_REQUIRED"):
            pytest.fail(f"{TEXT} missing; the shared data is required (DK_TEST_DATA_REQUIRED)")
        pytest.skip(f"{TEXT} not present")
    out = tmp_path_factory.mktemp("gpu_kd")
    r = _run("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "gpu_kd_smoke.json").read_text())


def test_smoke_has_every_field_finite(smoke):
    assert smoke["smoke"] is True and "CPU" in smoke["shortened"]
    for section in ("step", "agree", "label", "quality"):
        assert "error" not in smoke[section], smoke[section]
    bad = [(p, v) for p, v in _numbers(smoke) if not math.isfinite(v)]
    assert not bad, bad
    rows = smoke["step"]["rows"]
    assert set(rows) == {
        "dk_ce", "dk_fkl", "dk_jsd", "trl_fkl", "trl_jsd", "liger_fkl", "liger_jsd",
    }  # fmt: skip
    for mode, r in rows.items():
        if mode.startswith("liger"):
            assert r == {"mode": mode, "status": LIGER_CPU}
            continue
        for key in ("loss", "first_step_s", "step_s_median", "tokens_per_s", "peak_rss_mb"):
            assert r[key] > 0, (mode, key, r)
    for name in ("raw", "topk", "sampled"):
        assert smoke["label"]["rows"][name]["tokens_per_s"] > 0
    for name in ("topk", "sampled"):
        assert smoke["label"]["rows"][name]["bytes_per_token"] > 0
    arms = smoke["quality"]["arms"]
    assert set(arms) == {"topk", "sampled", "live", "plain"}
    for r in arms.values():
        assert r["val_ce"] > 0 and r["val_kl_to_teacher"] >= 0
    # equal bytes: the sampled store never holds more than the top-k one
    assert 0 < arms["sampled"]["bytes_per_token"] <= arms["topk"]["bytes_per_token"]


def test_smoke_darkknowledge_and_trl_losses_agree(smoke):
    """Forward KL and JSD through darkknowledge's chunked head and through TRL's
    DistillationTrainer loss: the same number on the same models and tokens (the step
    rows, β = 0 and 0.5) and on the same random hidden states and heads, with the same
    gradients (β = 0, 0.5, 0.25, 1)."""
    rows = smoke["step"]["rows"]
    for kind in ("fkl", "jsd"):
        assert rows[f"dk_{kind}"]["loss"] == pytest.approx(rows[f"trl_{kind}"]["loss"], abs=1e-5)
    # β = 0.25 tells β from 1 − β (0.5 is symmetric); β = 1 is the reverse KL
    betas = {"fkl": 0.0, "jsd": 0.5, "jsd25": 0.25, "rkl": 1.0}
    for kind, beta in betas.items():
        a = smoke["agree"][kind]
        assert a["beta"] == beta
        assert a["dk_loss"] > 0
        assert a["trl"]["abs_diff"] <= 1e-5
        assert a["trl"]["grad_hidden_max_abs_diff"] <= 1e-5
        assert a["trl"]["grad_head_max_abs_diff"] <= 1e-5
        assert a["liger"] == {"status": LIGER_CPU}


def test_bad_input_is_one_line_and_exit_2():
    r = _run("--modes", "dk_fkl,nope", timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown section or mode 'nope'" in r.stderr
