"""`dk store check`: the signal doctor. A good store passes (exit 0, no refusal); each
fault class, planted in a copy of a good store (shard values edited and the manifest's
SHA-256 re-hashed, so that only the doctor can see it) or in the recipe it is checked
against, gets exit 2 and its one `refuse:` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from darkknowledge.cli import main
from darkknowledge.store import open_store
from darkknowledge.store.format import FORMAT, MANIFEST, sha256_file, shard_name

SHAKES = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"

CLASSIFY = {
    "data": {"name": "digits", "limit": 300},
    "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [16]},
                "train": {"max_steps": 5, "batch_size": 64}},
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "loss": {"hinton_kd": {"temperature": 2.0, "alpha": 0.5}},
    "label": {"signal": "topk", "k": 4, "temperature": 2.0, "dtype": "fp32", "shard_size": 64},
}  # fmt: skip


def _lm_recipe(text: Path) -> dict:
    return {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 2,
                 "sampling": "blocks"},
        "tokenizer": {"kind": "char"},
        "teacher": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
                    "train": {"steps": 4, "batch_size": 4, "warmup": 1}},
        "student": {"model": {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}},
        "distill": {"mode": "token"},
        "label": {"signal": "topk", "k": 8, "dtype": "fp32", "shard_size": 128},
    }  # fmt: skip


@pytest.fixture(scope="module")
def classify_store(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("classify")
    r = d / "c.yaml"
    r.write_text(yaml.safe_dump(CLASSIFY))
    assert main(["-q", "label", str(r), "--out", str(d / "store")]) == 0
    return d / "store", r


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory) -> tuple[Path, Path]:
    if not SHAKES.exists():
        pytest.skip("TinyShakespeare not present")
    d = tmp_path_factory.mktemp("lm")
    text = d / "t.txt"
    text.write_text(SHAKES.read_text()[:6_000])
    r = d / "l.yaml"
    r.write_text(yaml.safe_dump(_lm_recipe(text)))
    assert main(["-q", "label", str(r), "--out", str(d / "store")]) == 0
    return d / "store", r


def _check(capsys, *args) -> tuple[int, list[str], list[str]]:
    """(exit code, refuse lines, warn lines) of `dk store check ARGS`."""
    capsys.readouterr()
    rc = main(["store", "check", *map(str, args)])
    out = capsys.readouterr().out.splitlines()
    return (
        rc,
        [x for x in out if x.startswith("refuse: ")],
        [x for x in out if x.startswith("warn: ")],
    )


def _refused(capsys, *args) -> str:
    """The one refuse line of a check that must exit 2."""
    rc, refuse, _ = _check(capsys, *args)
    assert rc == 2 and len(refuse) == 1, (rc, refuse)
    return refuse[0]


def _broken(store: Path, to: Path, edit, shard: int = 0, rehash: bool = True) -> Path:
    """A copy of ``store`` whose shard ``shard`` went through ``edit(tensors)``; its
    manifest re-hashed (``rehash``) so that the store still opens and verifies."""
    shutil.copytree(store, to)
    f = to / "shards" / shard_name(shard)
    t = {k: v.copy() for k, v in load_file(str(f)).items()}
    edit(t)
    save_file(t, str(f), metadata={"format": FORMAT})
    if rehash:
        m = json.loads((to / MANIFEST).read_text())
        m["shards"][shard].update(sha256=sha256_file(f), bytes=f.stat().st_size)
        (to / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))
        open_store(to)  # opens and verifies: only the doctor sees the fault
    return to


def test_good_stores_pass(classify_store, lm_store, capsys):
    for store, recipe in (classify_store, lm_store):
        for args in ((store,), (store, "--against", recipe)):
            rc, refuse, warn = _check(capsys, *args)
            assert rc == 0 and refuse == [] and warn == [], (args, refuse, warn)
    assert main(["store", "check", str(lm_store[0]), "distill.loss.kd_weight=0"]) == 2
    assert "need --against" in capsys.readouterr().err  # overrides without a recipe


def _nan(t):
    t["tail_mass"][0, 3] = np.nan


def _tail(t):
    t["tail_mass"][1, 2] = 1.5


def _positive(t):
    t["topk_logprobs"][2, 5, 0] = 0.5


def _unsorted(t):  # the same distribution, its first two entries swapped
    for k in ("topk_logprobs", "topk_ids"):
        t[k][3, 4, [0, 1]] = t[k][3, 4, [1, 0]]


def _sum(t):  # still sorted and ≤ 0, but e⁻¹ of the mass is gone
    t["topk_logprobs"][4, 6] -= 1.0


def _masked(t):
    t["mask"][:] = 0


@pytest.mark.parametrize(
    "edit, expect",
    [
        (_nan, "NaN/inf in the stored signals at 1 position(s) (first: shard-00000.safetensors, "
               "example id 0, position 3)"),
        (_tail, "tail mass outside [0, 1] at 1 position(s)"),
        (_positive, "top-k log-prob > 0 at 1 position(s)"),
        (_unsorted, "not sorted (descending) at 1 position(s)"),
        (_sum, "do not sum to 1 (top-k + tail, or softmax) at 1 position(s)"),
        (_masked, "shard-00000.safetensors: every position of its 128 example(s) is masked"),
    ],
)  # fmt: skip
def test_broken_values_are_refused(lm_store, tmp_path, capsys, edit, expect):
    bad = _broken(lm_store[0], tmp_path / "bad", edit)
    assert expect in _refused(capsys, bad)


def test_an_example_with_no_valid_position_is_a_warning(lm_store, tmp_path, capsys):
    def one(t):
        t["mask"][7] = 0

    bad = _broken(lm_store[0], tmp_path / "bad", one, shard=1)
    rc, refuse, warn = _check(capsys, bad)
    assert rc == 0 and refuse == []
    assert warn == [
        "warn: no valid position (every position masked) at 1 example(s) "
        "(first: shard-00001.safetensors, example id 135)"
    ]


def test_an_altered_shard_is_refused(lm_store, tmp_path, capsys):
    bad = _broken(lm_store[0], tmp_path / "bad", _sum, rehash=False)
    rc, refuse, _ = _check(capsys, bad, "--against", lm_store[1])
    assert rc == 2 and len(refuse) == 2, refuse  # the hash, and the values still scanned
    assert "shard-00000.safetensors: shard is damaged or was altered" in refuse[0]
    assert "do not sum to 1" in refuse[1] and "example id 4, position 6" in refuse[1]


def test_classify_recipe_faults(classify_store, capsys):
    store, r = classify_store
    cases = {
        "loss.hinton_kd.temperature=3": "refuse: temperature: the top-k store holds "
        "probabilities at 2, loss.hinton_kd.temperature is 3",
        "loss.hinton_kd.weight=0": "refuse: KD weight is 0 (loss terms hinton_kd)",
        "data.limit=200": "refuse: fingerprint field 'data' differs: the store was labelled on "
        "other inputs than the recipe's 180 transfer examples (the store has 270)",
    }
    for override, expect in cases.items():
        assert _refused(capsys, store, "--against", r, override).startswith(expect), override


def test_a_one_hot_teacher_is_kd_equals_ce(classify_store, tmp_path, capsys):
    from darkknowledge.data import load_data
    from darkknowledge.recipe_io import load_recipe

    store, r = classify_store
    recipe, _ = load_recipe(r)
    t = load_data(recipe.data).transfer
    label = dict(zip(t.ids.tolist(), t.y.tolist(), strict=True))
    shards = len(list((store / "shards").glob("*.safetensors")))
    bad = tmp_path / "onehot"
    shutil.copytree(store, bad)
    for i in range(shards):  # every row: all mass on its label

        def hot(ts):
            y = np.array([label[int(e)] for e in ts["ids"]])
            others = np.array([[c for c in range(10) if c != yy][:3] for yy in y])
            ts["topk_ids"][:] = np.concatenate([y[:, None], others], 1)
            ts["topk_logprobs"][:] = np.array([0.0, -30.0, -31.0, -32.0], dtype=np.float32)
            ts["tail_mass"][:] = 0.0

        _broken(bad, tmp_path / f"step{i}", hot, shard=i)
        shutil.rmtree(bad)
        (tmp_path / f"step{i}").rename(bad)
    rc, refuse, warn = _check(capsys, bad)  # no labels without a recipe: nothing to say
    assert rc == 0 and refuse == [] and warn == []
    rc, refuse, warn = _check(capsys, bad, "--against", r)
    assert rc == 0 and refuse == [] and len(warn) == 1
    assert "on the label at 270 of 270 labelled positions" in warn[0] and "KD = CE" in warn[0]


def test_lm_recipe_faults(lm_store, tmp_path, capsys):
    store, r = lm_store
    text = Path(yaml.safe_load(r.read_text())["data"]["path"]).read_text()
    assert "#" not in text and "@" not in text
    more, other = tmp_path / "more.txt", tmp_path / "other.txt"
    more.write_text(text + "#")  # one more character: one more token
    other.write_text(text.replace("e", "#"))  # as many tokens, other strings
    shifted = tmp_path / "shifted.txt"
    shifted.write_text(text[1:] + text[0])  # the same tokenizer, every block moved by one
    cases = {
        f"data.path={more}": "refuse: vocabulary: the store holds 57-way token signals, the "
        "student's tokenizer has 58 tokens",
        f"data.path={other}": "refuse: tokenizer: the store was labelled with another tokenizer",
        "data.block_size=8": "refuse: alignment: the store's examples are 16 tokens long, the "
        "recipe's blocks 8",
        # the store keeps its token ids (dk label): the first misaligned position is named
        f"data.path={shifted}": "refuse: alignment: example 0, position 0: the recipe's token",
        "distill.loss.temperature=2": "refuse: temperature: the top-k store holds probabilities "
        "at 1, distill.loss.temperature is 2",
        "distill.loss.kd_weight=0": "refuse: KD weight is 0 (distill.loss.kd_weight: 0)",
    }
    for override, expect in cases.items():
        assert _refused(capsys, store, "--against", r, override).startswith(expect), override


def test_a_dense_store_with_an_infinite_logit_is_refused(classify_store, tmp_path, capsys):
    r = classify_store[1]
    dense = tmp_path / "dense"
    label = ["-q", "label", str(r), "--out", str(dense), "label.signal=dense"]
    assert main(label) == 0
    rc, refuse, warn = _check(capsys, dense, "--against", r, "loss.hinton_kd.temperature=3")
    assert rc == 0 and refuse == warn == []  # a dense store: the loss picks its temperature

    def inf(t):
        t["logits"][5, 2] = np.inf

    bad = _broken(dense, tmp_path / "bad", inf, shard=2)
    line = _refused(capsys, bad)
    assert line.startswith("refuse: NaN/inf in the stored signals at 1 position(s)")
    assert line.endswith(f"(first: shard-00002.safetensors, example id {_id(dense, 2, 5)})")


def _id(store: Path, shard: int, row: int) -> int:
    return int(load_file(str(store / "shards" / shard_name(shard)))["ids"][row])
