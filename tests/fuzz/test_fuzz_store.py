"""Signal store manifests and shard headers, mutated: ``parse_manifest`` and
``dk store info`` accept them or refuse them with one line; never a traceback."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from fuzzlib import (
    accepted_or_dkerror,
    assert_cli_ok_or_one_line,
    cases,
    mutated_bytes,
    mutated_tree,
    run_cli,
)
from hypothesis import given
from hypothesis import strategies as st

from darkknowledge.store import format as store_format
from darkknowledge.store.manifest import parse_manifest

RECIPE = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [8]},
                "train": {"max_steps": 2, "batch_size": 64}},
    "label": {"shard_size": 500, "signal": "topk", "k": 4},
    "train": {"epochs": 1, "batch_size": 64},
    "eval": {"latency": False},
}  # fmt: skip
JSON_TOKENS = ['"', "{", "}", "[", "]", ",", ":", "null", "-1", "0", "1e999", "true",
               '"shards"', '"../x"', "\\u0000", "[" * 40, "é", "NaN", "Infinity"]  # fmt: skip


@pytest.fixture(scope="module")
def store() -> Path:
    """A small top-k store (digits, 2 shards), labelled once by ``dk label``."""
    root = Path(tempfile.mkdtemp(prefix="dk-fuzz-store-"))
    (root / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    rc, err = run_cli(["label", str(root / "r.yaml"), "--out", str(root / "store")])
    assert rc == 0, err
    shutil.rmtree(root / "store" / "teacher", ignore_errors=True)
    yield root / "store"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def manifest(store) -> dict:
    return json.loads((store / "manifest.json").read_text())


def test_the_fixture_is_valid(store, manifest):
    assert parse_manifest(manifest, "m").complete
    rc, err = run_cli(["store", "info", str(store), "--verify"])
    assert rc == 0, err


@cases(160)
@given(data=st.data())
def test_parse_manifest_on_mutated_values(manifest, data):
    accepted_or_dkerror(parse_manifest, data.draw(mutated_tree(manifest, max_ops=2)), "m")


@pytest.fixture
def scratch(store, tmp_path) -> Path:
    """A copy of the store for one test (its shards are small)."""
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return dst


@cases(60)
@given(data=st.data())
def test_store_info_on_mutated_manifest_bytes(scratch, store, data):
    raw = (store / "manifest.json").read_bytes()
    (scratch / "manifest.json").write_bytes(data.draw(mutated_bytes(raw, JSON_TOKENS)))
    if hasattr(store_format, "_VERIFIED"):
        store_format._VERIFIED.clear()
    assert_cli_ok_or_one_line(*run_cli(["store", "info", str(scratch)]))


@cases(60)
@given(data=st.data(), verify=st.booleans(), shard=st.integers(0, 1))
def test_store_info_on_mutated_shard_headers(scratch, store, data, verify, shard):
    name = sorted((store / "shards").iterdir())[shard].name
    raw = (store / "shards" / name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = data.draw(mutated_bytes(raw[8 : 8 + n], JSON_TOKENS))
    if data.draw(st.booleans()):  # the length field as written, or as the new header's
        head = len(header).to_bytes(8, "little")
    else:
        head = data.draw(st.sampled_from([raw[:8], b"\xff" * 8, bytes(8), b"\x10"]))
    (scratch / "shards" / name).write_bytes(head + header + raw[8 + n :])
    if hasattr(store_format, "_VERIFIED"):
        store_format._VERIFIED.clear()
    args = ["store", "info", str(scratch), *(["--verify"] if verify else [])]
    assert_cli_ok_or_one_line(*run_cli(args))
