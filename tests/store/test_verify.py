"""Stores are verified: shard SHA-256, shard paths inside the store, one manifest schema.

Each case is a reproduction from a hostile tester: a store is labelled once, copied, and
the copy damaged (flipped bytes, a shard path out of the folder, contradictory manifest
values); `dk store info`, `dk run` and the Python API must refuse it with one line."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.cli import main
from darkknowledge.errors import DKError
from darkknowledge.store import LabelSpec, label, open_store
from darkknowledge.store import format as store_format
from darkknowledge.teachers import ModuleTeacher

BASE = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}},
    "train": {"epochs": 1, "batch_size": 64},
    "eval": {"latency": False},
}
TEACHER = {"kind": "module", "model": {"name": "mlp", "hidden": [16]},
           "train": {"max_steps": 3, "batch_size": 64}}  # fmt: skip


@pytest.fixture(autouse=True)
def new_process():
    """Each check runs as a fresh `dk` process would: nothing hashed yet in this one."""
    getattr(store_format, "_VERIFIED", {}).clear()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A dense store of the digits transfer set in 3 shards, labelled by `dk label`."""
    root = tmp_path_factory.mktemp("made")
    lab = root / "lab.yaml"
    lab.write_text(yaml.safe_dump(BASE | {"teacher": TEACHER, "label": {"shard_size": 400}}))
    assert main(["label", str(lab), "--out", str(root / "store")]) == 0
    return root


def copy_store(made: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(made / "store", dst, ignore=shutil.ignore_patterns("teacher"))
    return dst


def run_recipe_for(store: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(BASE | {"teacher": {"kind": "store", "path": str(store)}}))
    return run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def flip_two_bytes(shard: Path) -> None:
    """Two bytes in the middle of the shard's data (its header still parses)."""
    data = bytearray(shard.read_bytes())
    mid = len(data) - (len(data) - 8 - int.from_bytes(data[:8], "little")) // 2
    data[mid] ^= 0x40
    data[mid + 1] ^= 0x01
    shard.write_bytes(bytes(data))


def edit_manifest(store: Path, change) -> None:
    m = json.loads((store / "manifest.json").read_text())
    change(m)
    (store / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------- shard SHA-256


def test_tampered_shard_is_named_by_dk_run_and_store_info_verify(made, tmp_path, capsys):
    store = copy_store(made, tmp_path)
    flip_two_bytes(store / "shards" / "shard-00001.safetensors")
    run = run_recipe_for(store, tmp_path)
    assert main(["run", str(run), "--out", str(tmp_path / "r")]) == 2  # never trains on it
    err = one_line_error(capsys)
    assert "shard-00001.safetensors: shard is damaged or was altered" in err
    assert not (tmp_path / "r" / "student" / "model.safetensors").exists()
    # `dk store info` reads headers only; with --verify it hashes every shard
    assert main(["store", "info", str(store)]) == 0
    capsys.readouterr()
    assert main(["store", "info", str(store), "--verify"]) == 2
    err = one_line_error(capsys)
    assert "shard-00001.safetensors: shard is damaged or was altered" in err
    assert main(["store", "info", str(made / "store"), "--verify"]) == 0  # the intact one
    assert "verified   SHA-256 of 3 file(s)" in capsys.readouterr().out


def test_a_lazily_read_store_checks_each_shard_at_its_first_use(made, tmp_path):
    store = copy_store(made, tmp_path)
    flip_two_bytes(store / "shards" / "shard-00002.safetensors")
    lazy = open_store(store, preload_bytes=0)  # larger than RAM would allow: memory-mapped
    ids = lazy.ids
    assert lazy.get(ids[:5]).logits.shape == (5, 10)  # shard 0 is intact
    with pytest.raises(DKError, match=r"shard-00002\.safetensors: shard is damaged"):
        lazy.get(ids[-3:])
    with pytest.raises(DKError, match=r"shard-00002\.safetensors: shard is damaged"):
        open_store(store)  # preloaded: every shard is checked at open


def test_each_shard_is_hashed_once_per_process(made, tmp_path, monkeypatch):
    store = copy_store(made, tmp_path)
    hashed = []
    real = store_format.sha256_file

    def counting(p, *a):
        hashed.append(p.name)
        return real(p, *a)

    monkeypatch.setattr(store_format, "sha256_file", counting)
    monkeypatch.setattr(sys.modules["darkknowledge.store.label"], "sha256_file", counting)
    a = open_store(store)
    b = open_store(store, preload_bytes=0)
    b.get(b.ids)
    open_store(store).get(a.ids[:7])
    assert sorted(hashed) == [f"shard-0000{i}.safetensors" for i in range(3)]
    # a file rewritten since is hashed again
    f = store / "shards" / "shard-00000.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    open_store(store)
    assert hashed[3:] == ["shard-00000.safetensors"]
    # a store this process has just labelled is not hashed a second time at open
    hashed.clear()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    spec = LabelSpec(signal="dense", k=None, shard_size=10)
    label(ModuleTeacher(net), torch.randn(30, 1, 4, 4), torch.arange(30), tmp_path / "s", spec,
          progress=False)  # fmt: skip
    assert hashed == [f"shard-0000{i}.safetensors" for i in range(3)]  # by the labeller only


# ---------------------------------------------------------------- shard paths


def _outside_copy(store: Path, tmp_path: Path) -> Path:
    """A valid copy of shard 0 outside the store (same bytes, so the same SHA-256)."""
    out = tmp_path / "outside"
    out.mkdir()
    shutil.copy(store / "shards" / "shard-00000.safetensors", out / "shard-00000.safetensors")
    (store / "shards" / "shard-00000.safetensors").unlink()
    return out / "shard-00000.safetensors"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_shard_paths_stay_inside_the_store(made, tmp_path, capsys, how):
    store = copy_store(made, tmp_path)
    target = _outside_copy(store, tmp_path)
    if how == "dotdot":
        rel = os.path.relpath(target, store / "shards")
        assert rel.startswith("..")
        edit_manifest(store, lambda m: m["shards"][0].update(file=rel))
        want = f"shards[0].file: {rel!r} is not a plain file name inside the store folder"
    elif how == "absolute":
        edit_manifest(store, lambda m: m["shards"][0].update(file=str(target)))
        want = f"shards[0].file: {str(target)!r} is not a plain file name"
    elif how == "symlink":
        (store / "shards" / "shard-00000.safetensors").symlink_to(target)
        want = "shard-00000.safetensors: shard shard-00000.safetensors leads outside the store"
    else:  # the whole shards/ folder is a link out of the store
        for p in (store / "shards").iterdir():
            shutil.move(p, target.parent / p.name)
        (store / "shards").rmdir()
        (store / "shards").symlink_to(target.parent)
        want = "shard-00000.safetensors: shard shard-00000.safetensors leads outside the store"
    assert main(["store", "info", str(store)]) == 2
    assert want in one_line_error(capsys)
    run = run_recipe_for(store, tmp_path)
    assert main(["run", str(run), "--out", str(tmp_path / "r")]) == 2
    assert want in one_line_error(capsys)


def test_a_manifest_that_is_a_link_out_of_the_store_is_refused(made, tmp_path, capsys):
    store = copy_store(made, tmp_path)
    shutil.move(store / "manifest.json", tmp_path / "elsewhere.json")
    (store / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    assert main(["store", "info", str(store)]) == 2
    assert "manifest.json: manifest.json leads outside the store" in one_line_error(capsys)


# ---------------------------------------------------------------- the manifest schema


def _set(key, value):
    def change(m):
        node, *path = m, *key.split(".")
        for p in path[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = path[-1]
        if value is _DEL:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


_DEL = object()
BOGUS = [
    ("signal", "bogus", "signal: Input should be 'dense', 'topk', 'head' or 'sampled'"),
    ("vocab", -3, "vocab: Input should be greater than 0"),
    ("vocab", 0, "vocab: Input should be greater than 0"),
    ("shard_size", 0, "shard_size: Input should be greater than 0"),
    ("num_examples", -1, "num_examples: Input should be greater than 0"),
    ("shards.0.rows", 0, "shards[0].rows: Input should be greater than 0"),
    ("shards.0.bytes", -5, "shards[0].bytes: Input should be greater than 0"),
    ("vocab", "10", "vocab: Input should be a valid integer"),
    ("vocab", _DEL, "vocab: missing key"),
    ("fingerprint.teacher", _DEL, "fingerprint.teacher: missing key"),
    ("shards.0.sha256", _DEL, "shards[0].sha256: missing key"),
    ("evil", 1, "evil: unknown key"),
    ("shards.0.sha256", "0" * 12, "shards[0].sha256: String should match pattern"),
    ("dtype", "int4", "dtype: Input should be"),
    ("k", 3, "k: set on a dense store (top-k stores only)"),
    ("temperature", 2.0, "temperature: set on a dense store"),
    ("fingerprint.signal", "topk", "fingerprint.signal: 'topk' contradicts signal 'dense'"),
    ("spec.shard_size", 100, "spec.shard_size: 100 contradicts shard_size"),
    ("shards.0.rows", 401, "shards[0].rows: 401, the layout gives 400"),
    ("num_examples", 5000, "shards: 3 listed, 5000 examples in shards of 400 make 13"),
    ("shards.1.file", "shard-00000.safetensors", "shards[1].file: 'shard-00000.safetensors' is listed twice"),
    ("task", "sequence", "a sequence store's shard has no (rows, T) mask"),
    ("vocab", 11, "tensor 'logits' is F16 [400, 10], the manifest says F16 [400, 11]"),
    ("dtype", "fp32", "fingerprint.dtype: 'fp16' contradicts dtype 'fp32'"),
    ("hidden", {"0": [16]}, "hidden: ['0'] contradicts fingerprint.hidden []"),
    ("format", "darkknowledge.store/v0", "not a darkknowledge.store/v1 manifest"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "msg"),
    BOGUS,
    ids=[f"{k}={'<deleted>' if v is _DEL else repr(v)}" for k, v, _ in BOGUS],
)
def test_bogus_manifest_values_get_one_line(made, tmp_path, capsys, key, value, msg):
    store = copy_store(made, tmp_path)
    edit_manifest(store, _set(key, value))
    assert main(["store", "info", str(store)]) == 2
    err = one_line_error(capsys)
    assert msg in err, err
    with pytest.raises(DKError):
        open_store(store)


def test_header_and_file_size_disagreements_get_one_line(made, tmp_path, capsys):
    store = copy_store(made, tmp_path)
    shard = store / "shards" / "shard-00001.safetensors"
    # shorter than its header says (the manifest's byte count made to match)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    edit_manifest(store, _set("shards.1.bytes", len(data) - 100))
    assert main(["store", "info", str(store)]) == 2
    assert "shard-00001.safetensors: truncated shard (tensor 'logits' runs past the end)" in (
        one_line_error(capsys)
    )
    # a header whose offsets do not hold the shape it names
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["logits"]["shape"] = [400, 20]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n :])
    edit_manifest(store, _set("shards.1.bytes", len(data)))
    assert main(["store", "info", str(store)]) == 2
    assert "tensor 'logits': its offsets do not hold its shape [400, 20]" in one_line_error(capsys)
    # a header that is not safetensors at all
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       " + data[24:])
    assert main(["store", "info", str(store)]) == 2
    assert "the header is not an object" in one_line_error(capsys)


def test_every_manifest_the_code_writes_validates(tmp_path):
    """label.py validates each manifest before writing it; here the writers' outputs
    (every signal kind, unfinished and finished) are read back through the schema."""
    from darkknowledge.blackbox.logprob_store import logprobs_to_store
    from darkknowledge.store.manifest import parse_manifest

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 40))  # fmt: skip
    x, ids = torch.randn(20, 1, 4, 4), torch.arange(20)
    kinds = {
        "dense": LabelSpec(signal="dense", k=None, shard_size=8),
        "dense_hidden": LabelSpec(signal="dense", k=None, hidden=("2",), shard_size=8),
        "topk": LabelSpec(signal="topk", k=4, shard_size=8, temperature=2.0),
        "topk_prior_hidden": LabelSpec(signal="topk", k=4, tail_prior=True, hidden=("1",)),
        "head": LabelSpec(signal="head", dtype="fp32", shard_size=8),
        "auto": LabelSpec(k=4),
    }
    for name, spec in kinds.items():
        label(ModuleTeacher(net), x, ids, tmp_path / name, spec, progress=False)
    # top-k from an API's top_logprobs (dk store from-api), a sequence store with a mask
    rows = [{"id": str(i), "samples": [{"index": 0, "logprobs": {
        "tokens": [f"token_id:{t}" for t in range(3 + i)],
        "top_logprobs": [{f"token_id:{(t + j) % 50}": -0.5 - j for j in range(3)}
                         for t in range(3 + i)]}}]} for i in range(4)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Tok:
        name_or_path = "tiny-tok"

        def __len__(self):
            return 50

        def get_vocab(self):
            return {f"t{i}": i for i in range(50)}

    api = logprobs_to_store(tmp_path / "results.jsonl", tmp_path / "api", Tok())
    assert api.k == 3 and api.task == "sequence"
    for name in [*kinds, "api"]:
        raw = json.loads((tmp_path / name / "manifest.json").read_text())
        m = parse_manifest(raw, name)
        assert m.complete and open_store(tmp_path / name).verify_all() >= 1
        # the first manifest a labeller writes (before any shard) validates as well
        first = {k: v for k, v in raw.items()
                 if k not in ("num_positions", "hidden", "spec", "tail_prior", "head")}  # fmt: skip
        parse_manifest(first | {"complete": False, "shards": []}, name)
    head = json.loads((tmp_path / "head" / "manifest.json").read_text())["head"]
    assert head["shape"] == [40, 32]
