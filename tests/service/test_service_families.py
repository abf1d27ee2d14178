"""Jobs of every training family over HTTP: a causal_lm and a text job finish, their
students download as save_pretrained ZIPs that load with transformers alone in a fresh
process, and a server killed mid-job resumes both to the weights of an uninterrupted job."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import Server, wait_job

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"
SST2 = SHARED / "sst2"
pytestmark = pytest.mark.skipif(
    not (SHAKES.exists() and SST2.exists()), reason="TinyShakespeare / SST-2 not present"
)


def _lm(steps: int) -> dict:
    fast = {
        "steps": steps,
        "batch_size": 4,
        "warmup": 2,
        "eval_every": steps,
        "checkpoint_every": 5,
    }
    return {
        "family": "causal_lm",
        "data": {"kind": "text", "path": "data:shakes.txt", "block_size": 16, "val_blocks": 4},
        "tokenizer": {"kind": "char"},
        "teacher": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
                    "train": {**fast, "steps": 6}},
        "student": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                              "dropout": 0.1}},
        "train": fast,
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
    }  # fmt: skip


def _text(epochs: int) -> dict:
    return {
        "family": "text",
        "data": {"path": "data:sst2", "max_length": 16, "train_subset": 64, "dev_subset": 16,
                 "test_subset": 16},
        "teacher": {"source": "tiny:tiny-bert",
                    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2},
                    "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3}},
        "student": {"layers": [0, 2]},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 4},
        "variants": [{"name": "distilled"}],
        "eval": {"latency": False},
    }  # fmt: skip


def _data(srv: Server) -> None:
    (srv.data_root / "shakes.txt").write_text(SHAKES.read_text()[:20_000])
    (srv.data_root / "sst2").mkdir(exist_ok=True)
    for split in ("train", "dev", "test"):
        lines = (SST2 / f"{split}.tsv").read_text().splitlines()[:120]
        (srv.data_root / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


LOAD = """
import sys, torch, transformers
auto = getattr(transformers, sys.argv[2])
m = auto.from_pretrained(sys.argv[1]); tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("First Citizen: we", return_tensors="pt")
out = m(**ids)
assert "darkknowledge" not in sys.modules
print(tuple(out.logits.shape))
"""


def _kill_at_checkpoint(srv: Server, c, recipe: dict, ckpt: str) -> dict:
    """Submit, SIGKILL the whole server once the student has a checkpoint, restart."""
    job = c.post("/jobs", json={"recipe": recipe})
    assert job.status_code == 201, job.text
    job = job.json()
    path = srv.job_dir(job["id"]) / "run" / ckpt
    deadline = time.time() + 240
    while not path.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert path.exists(), srv.log()
    srv.kill()
    assert not (path.parent / "result.json").exists(), "finished before the kill; make it longer"
    srv.start()
    return job


def test_causal_lm_and_text_jobs_finish_download_and_resume_after_sigkill(db_url, tmp_path):
    srv = Server(tmp_path, db_url, workers=1)
    _data(srv)
    srv.start()
    try:
        token = srv.token("alice")
        with srv.client(token) as c:
            lm = _kill_at_checkpoint(srv, c, _lm(300), "student/checkpoint.pt")
        with srv.client(token) as c:
            assert wait_job(c, lm["id"], timeout=300)["state"] == "succeeded", srv.log()
            text = _kill_at_checkpoint(srv, c, _text(6), "students/distilled/seed0/checkpoint.pt")
        with srv.client(token) as c:
            done = wait_job(c, text["id"], timeout=300)
            assert done["state"] == "succeeded", c.get(f"/jobs/{text['id']}/logs").text
            clean_lm = c.post("/jobs", json={"recipe": _lm(300)}).json()
            clean_text = c.post("/jobs", json={"recipe": _text(6)}).json()
            for j in (clean_lm, clean_text):
                assert wait_job(c, j["id"], timeout=300)["state"] == "succeeded"
            zips = {}
            for j in (lm, text, clean_lm, clean_text):
                r = c.get(f"/jobs/{j['id']}/student")
                assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
                zips[j["id"]] = zipfile.ZipFile(io.BytesIO(r.content))
    finally:
        srv.stop()
    for (killed, clean, auto) in ((lm, clean_lm, "AutoModelForCausalLM"),
                                  (text, clean_text, "AutoModelForSequenceClassification")):  # fmt: skip
        dirs = []
        for j in (killed, clean):
            d = tmp_path / f"student{j['id']}"
            zips[j["id"]].extractall(d)
            dirs.append(d)
        a = load_file(str(dirs[0] / "model.safetensors"))
        b = load_file(str(dirs[1] / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), auto
        # a fresh interpreter, transformers only
        res = subprocess.run([sys.executable, "-c", LOAD, str(dirs[0]), auto],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
