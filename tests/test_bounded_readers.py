"""Readers are bounded (docs/limits.md): recipe YAML in depth, alias expansion, size and
duplicate keys; JSON and JSONL in depth, line size and encoding. Each bad input is one
line on stderr and exit status 2 through the CLI, in this process."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from darkknowledge import jsonl
from darkknowledge.cli import main
from darkknowledge.recipe_io import MAX_RECIPE_BYTES

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml"

BOMB = """\
family: generate
prompts: {path: p.jsonl}
teacher: {base_url: "http://127.0.0.1:9/v1", model: m}
l1: &l1 [x, x, x, x, x, x, x, x, x, x]
l2: &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1]
l3: &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2]
l4: &l4 [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3]
l5: &l5 [*l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4]
l6: &l6 [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5]
l7: &l7 [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6]
l8: &l8 [*l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7]
verifier: {name: exact, params: {bomb: [*l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8]}}
"""


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def validate(path: Path, *overrides: str) -> int:
    return main(["validate", str(path), *overrides])


@pytest.mark.parametrize(
    "text, needle",
    [
        ("data: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper than 64 levels"),
        ("data: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", "nested deeper than 64 levels"),
        ("".join("  " * i + f"k{i}:\n" for i in range(100)), "nested deeper than 64 levels"),
        ("a: &a [1, *a]\n", "alias refers to the collection that holds it"),
        ("data: {name: digits}\nstudent: {}\ndata: {name: idx}\n", "duplicate key 'data'"),
        ("data:\n  name: digits\n  name: idx\n", "duplicate key 'name' (first at line 2)"),
    ],
    ids=["deep-flow-lists", "deep-flow-maps", "deep-block", "self-alias", "dup-top", "dup-inner"],
)
def test_yaml_recipe_bounds(tmp_path, capsys, text, needle):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    assert validate(f) == 2
    err = one_line(capsys)
    assert needle in err, err


def test_duplicate_key_names_key_and_line(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("data: {name: digits}\nstudent:\n  model: {name: mlp}\ntrain: {}\ntrain: {}\n")
    assert validate(f) == 2
    assert "line 5" in (err := one_line(capsys)) and "'train'" in err and "line 4" in err, err


def test_anchor_bomb_in_a_free_form_field_is_refused_without_growing_memory(tmp_path, capsys):
    """9·10⁸ values once expanded, in a generate recipe's verifier.params (dict[str, Any])."""
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        assert validate(f) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "aliases expand to more than" in one_line(capsys)
    assert peak < 20 << 20 and time.monotonic() - t0 < 10, (peak, time.monotonic() - t0)


def test_a_few_aliases_are_still_fine(tmp_path, capsys):
    # anchors themselves are not refused: the same model twice through one alias
    f3 = tmp_path / "r3.yaml"
    f3.write_text(
        "data: {name: digits}\n"
        "student: {model: &m {name: mlp, hidden: [8]}}\n"
        "teacher: {kind: module, model: *m}\n"
    )
    assert validate(f3, "--quiet") == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == "OK"


def test_recipe_file_over_one_megabyte_is_refused(tmp_path, capsys):
    f = tmp_path / "big.yaml"
    f.write_text("data: {name: digits}\n# " + "x" * MAX_RECIPE_BYTES + "\n")
    assert validate(f) == 2
    assert "larger than 1 MB" in one_line(capsys)


def test_non_utf8_recipe_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"data: {name: digits}\nstudent: {}\n# caf\xe9\n")
    assert validate(f) == 2
    err = one_line(capsys)
    assert str(f) in err and "line 3" in err and "UTF-8" in err, err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.seed=" + "[" * 20_000, "nested deeper than 64 levels"),
        ("train" + ".a" * 100 + "=1", "a key deeper than 64 levels"),
        ("train.seed=" + "1" * 70_000, "longer than 65536 characters"),
        ("train.seed=&a [*a]", "alias refers to the collection"),
        ("train.seed={a: 1, a: 2}", "duplicate key 'a'"),
    ],
    ids=["deep-value", "deep-key", "long", "self-alias", "dup-key"],
)
def test_override_bounds(capsys, override, needle):
    assert validate(CLASSIFY, override) == 2
    err = one_line(capsys)
    assert needle in err and len(err) < 400, err


def _generate_recipe(tmp_path: Path, prompts: bytes) -> Path:
    (tmp_path / "p.jsonl").write_bytes(prompts)
    f = tmp_path / "g.yaml"
    f.write_text(
        "family: generate\nprompts: {path: p.jsonl, template: '{question}', answer_field: null}\n"
        "teacher: {base_url: 'http://127.0.0.1:9/v1', model: m}\n"
    )
    return f


@pytest.mark.parametrize(
    "prompts, needle",
    [
        (b'{"question": "ok"}\n' + b"[" * 20_000 + b"]" * 20_000 + b"\n", ":2: JSON nested deeper"),
        (
            b'{"question": "ok"}\n{"question": ' + b"[" * 100 + b"]" * 100 + b"}\n",
            ":2: JSON nested",
        ),
        (b'{"question": "ok"}\n{"question": "caf\xe9"}\n', ":2: not UTF-8"),
        (b'{"question": "ok"}\n{"question": "' + b"x" * (17 << 20) + b'"}\n', ":2: line longer"),
        (b'{"question": "ok"}\n{"question": \n', ":2: not JSON"),
    ],
    ids=["deep-20000", "deep-100", "latin1", "long-line", "torn"],
)
def test_jsonl_bounds_through_dk_generate(tmp_path, capsys, prompts, needle):
    f = _generate_recipe(tmp_path, prompts)
    assert main(["generate", str(f), "--out", str(tmp_path / "out")]) == 2
    err = one_line(capsys)
    assert needle in err and "p.jsonl" in err, err


def test_deep_json_helpers():
    with pytest.raises(jsonl.DKError, match="nested deeper than 64"):
        jsonl.loads("[" * 20_000 + "]" * 20_000, "x")
    assert jsonl.loads("[" * 64 + "]" * 64, "x") is not None
    with pytest.raises(jsonl.DKError, match="nested deeper than 64"):
        jsonl.loads("[" * 65 + "]" * 65, "x")
    loop: list = []
    loop.append(loop)
    assert not jsonl.too_deep([loop], 64)  # a cycle is walked once, never forever


def test_tsv_non_utf8_and_oversized_field_name_the_line(tmp_path):
    from darkknowledge.errors import DKError
    from darkknowledge.hf.text_data import read_split

    f = tmp_path / "d.tsv"
    f.write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    with pytest.raises(DKError, match=r"d.tsv:3: not UTF-8"):
        read_split(f)
    f.write_bytes(b"sentence\tlabel\n" + b"x" * 200_000 + b"\t1\n")
    with pytest.raises(DKError, match=r"d.tsv:2: not a TSV row"):
        read_split(f)


def test_a_gzip_bomb_in_an_idx_file_stops_at_the_cap(tmp_path, monkeypatch):
    """A gzipped IDX file is decompressed in pieces and refused past IDX_MAX_BYTES, so a
    small file that expands to gigabytes is one line, not all of the memory."""
    import gzip

    from darkknowledge.data import vision
    from darkknowledge.errors import DKError

    monkeypatch.setattr(vision, "IDX_MAX_BYTES", 1 << 20)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes(64 << 20)))  # 64 MB of zeros, ~64 KB on disk
    with pytest.raises(DKError, match="decompresses to more than"):
        vision.read_idx(bomb)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(bytes(1000))[:-12])
    with pytest.raises(DKError, match="corrupt gzip"):
        vision.read_idx(cut)
