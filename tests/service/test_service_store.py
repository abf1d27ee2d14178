"""Jobs that distil from a signal store (``teacher: {kind: store}``) over HTTP: the store
uploaded as a dataset or kept in a data root. A manifest whose shards lead out of the
store (``..``, an absolute path, a link) fails the job with one line, and the file out
there (a valid copy of the shard, same SHA-256) is never used."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import TINY, wait_job

KD = {**TINY, "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}}}
LABEL = {
    **TINY,
    "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [16]},
                "train": {"max_steps": 3, "batch_size": 64}},
}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A dense store of the digits transfer set (what TINY's data gives a job)."""
    from darkknowledge.pipeline import label_recipe
    from darkknowledge.recipe_io import validate_recipe

    out = tmp_path_factory.mktemp("label") / "store"
    label_recipe(validate_recipe(LABEL), out)
    shutil.rmtree(out / "teacher")  # a store is its manifest and shards
    return out


def zipped(folder: Path, manifest: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(folder))
                data = p.read_bytes()
                if rel == "manifest.json" and manifest is not None:
                    data = json.dumps(manifest).encode()
                z.writestr(rel, data)
    return buf.getvalue()


def upload(c, data: bytes) -> dict:
    r = c.post("/datasets", params={"filename": "store.zip"}, content=data)
    assert r.status_code == 201, r.text
    return r.json()


def run_job(c, path: str) -> tuple[dict, str]:
    r = c.post("/jobs", json={"recipe": {**KD, "teacher": {"kind": "store", "path": path}}})
    assert r.status_code == 201, r.text
    done = wait_job(c, r.json()["id"])
    return done, c.get(f"/jobs/{done['id']}/logs").text


def test_a_job_distils_from_an_uploaded_store(server, alice, store):
    with server.client(alice) as c:
        ds = upload(c, zipped(store))
        done, log = run_job(c, ds["ref"])
        assert done["state"] == "succeeded", log
        plan = json.loads((server.job_dir(done["id"]) / "plan.json").read_text())
        assert [p["name"] for p in plan["phases"]] == ["distil"]  # no teacher phase
        report = c.get(f"/jobs/{done['id']}/report").json()
        assert set(report["rows"]) == {"student"} and report["rows"]["student"]["accuracy"] > 0.15


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_an_uploaded_manifest_naming_a_file_outside_fails_the_job(server, alice, store, how):
    # a valid shard outside every data root, with the SHA-256 the manifest names
    outside = server.root / f"outside-{how}"
    outside.mkdir()
    target = outside / "shard-00000.safetensors"
    shutil.copy(store / "shards" / "shard-00000.safetensors", target)
    manifest = json.loads((store / "manifest.json").read_text())
    datasets = server.data_dir / "datasets"
    with server.client(alice) as c:
        ds_id = "0" * 32  # where the upload lands is known only after it: aim from datasets/
        rel = os.path.relpath(target, datasets / ds_id / "shards")
        manifest["shards"][0]["file"] = rel if how == "dotdot" else str(target)
        ds = upload(c, zipped(store, manifest))
        assert (datasets / ds["id"]).is_dir() and rel.startswith("../../../")
        done, log = run_job(c, ds["ref"])
    assert done["state"] == "failed", log
    err = done["error"]
    assert "shards[0].file:" in err and "is not a plain file name inside the store folder" in err
    assert "\n" not in err and "Traceback" not in log and "AttributeError" not in log


def test_a_store_in_a_data_root_with_a_link_out_fails_the_job(server, alice, store):
    evil = server.data_root / "evil_store"
    shutil.copytree(store, evil)
    outside = server.root / "outside-link"
    outside.mkdir()
    shard = evil / "shards" / "shard-00000.safetensors"
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)
    with server.client(alice) as c:
        done, log = run_job(c, "data:evil_store")
    assert done["state"] == "failed", log
    assert "shard shard-00000.safetensors leads outside the store folder" in done["error"]
    assert "Traceback" not in log
