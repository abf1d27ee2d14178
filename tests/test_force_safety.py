"""--force on store folders (`dk label`, `dk store from-api`) deletes only what this
tool made, only after every input has been checked, and puts the old store back when
the new one fails before its first shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

RECIPE = {
    "data": {"name": "digits", "limit": 300},
    "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [8]},
                "train": {"max_steps": 2, "batch_size": 64}},
    "student": {"model": {"name": "mlp", "hidden": [8]}},
    "label": {"shard_size": 100},
}  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def labelled(tmp_path: Path, capsys):
    """A store `dk label` made (teacher trained into it): (recipe, store, its files)."""
    recipe = tmp_path / "lab.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "store"
    assert main(["label", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    return recipe, out, _files(out)


def test_label_force_refuses_a_folder_with_a_foreign_file(labelled, capsys):
    recipe, out, before = labelled
    (out / "thesis.tex").write_text("years of work")
    assert main(["label", str(recipe), "--out", str(out), "--force", "teacher.seed=1"]) == 2
    _one_line(capsys, str(out), "thesis.tex", "nothing was deleted")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert _files(out) == before | {"thesis.tex": b"years of work"}  # nothing touched
    # a stray file inside shards/ is foreign too
    (out / "thesis.tex").unlink()
    (out / "shards" / "notes.txt").write_text("mine")
    assert main(["label", str(recipe), "--out", str(out), "--force"]) == 2
    _one_line(capsys, "shards/notes.txt")
    assert (out / "shards" / "notes.txt").read_text() == "mine"


def test_label_force_refuses_a_teacher_folder_it_did_not_make(tmp_path: Path, capsys):
    """A folder holding only `teacher/` without dk label's record: not this tool's."""
    recipe = tmp_path / "lab.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "models"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "model.safetensors").write_bytes(b"my own teacher")
    assert main(["label", str(recipe), "--out", str(out), "--force"]) == 2
    _one_line(capsys, "not a darkknowledge store")
    assert (out / "teacher" / "model.safetensors").read_bytes() == b"my own teacher"
    assert not list(tmp_path.glob(".models.replaced"))


def test_label_force_with_bad_inputs_keeps_the_old_store(labelled, tmp_path: Path, capsys):
    recipe, out, before = labelled
    empty = tmp_path / "empty_idx"
    empty.mkdir()  # exists (the recipe validates) but holds no IDX files: fails on load
    bad = [
        ["data.name=idx", f"data.path={empty}"],  # after the old store was moved aside
        ["teacher.seed=1", "label.signal=topk", "label.k=10"],  # after a new teacher trained
        ["data.path=nowhere", "data.name=idx"],  # the recipe itself
    ]
    for over in bad:
        assert main(["-q", "label", str(recipe), "--out", str(out), "--force", *over]) == 2, over
        _one_line(capsys)
        assert _files(out) == before, over  # the old store and its teacher are back
        assert not list(tmp_path.glob(".store.replaced")), over


def test_label_force_replaces_a_store_this_tool_made(labelled, tmp_path: Path, capsys):
    recipe, out, before = labelled
    assert main(["label", str(recipe), "--out", str(out), "--force", "teacher.seed=1"]) == 0
    after = _files(out)
    assert after["manifest.json"] != before["manifest.json"]
    assert after["teacher/model.safetensors"] != before["teacher/model.safetensors"]
    assert json.loads(after["teacher/recipe.json"])["teacher"]["seed"] == 1
    assert not list(tmp_path.glob(".store.replaced"))  # the old store is gone, not kept
    # a store whose manifest was damaged is still recognised by its shards, and replaced
    (out / "manifest.json").write_text("{not json")
    assert main(["label", str(recipe), "--out", str(out), "--force", "teacher.seed=1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    # an unfinished replacement's leftover is never deleted silently
    (tmp_path / ".store.replaced").mkdir()
    (tmp_path / ".store.replaced" / "manifest.json").write_text("{}")
    capsys.readouterr()
    assert main(["label", str(recipe), "--out", str(out), "--force"]) == 2
    _one_line(capsys, ".store.replaced", "did not finish")
    assert (tmp_path / ".store.replaced" / "manifest.json").exists()


# dk store from-api: a hand-written results.jsonl (chat logprobs, K=2) over a char tokenizer


def _api_inputs(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    from darkknowledge.hf.io import char_tokenizer

    tok_dir = tmp_path / "tok"
    char_tokenizer("0123456789").save_pretrained(str(tok_dir))
    rows = []
    for i in range(n):
        content = [
            {"token": str(d), "logprob": -0.1,
             "top_logprobs": [{"token": str(d), "logprob": -0.1},
                              {"token": str((d + 1) % 10), "logprob": -2.5}]}
            for d in (i, i + 1)
        ]  # fmt: skip
        rows.append({"id": str(i), "prompt": "p", "reference": "", "teacher": {"model": "t"},
                     "sampling": {"n": 1}, "samples": [{"index": 0, "text": "x",
                     "verdict": {"correct": True}, "logprobs": {"content": content}}]})  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return results, tok_dir


def test_store_from_api_force(tmp_path: Path, capsys):
    results, tok = _api_inputs(tmp_path)
    out = tmp_path / "api"
    argv = ["store", "from-api", str(results), "--tokenizer", str(tok), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = _files(out)
    assert set(before) == {"manifest.json", "inputs.safetensors", "shards/shard-00000.safetensors"}
    # bad new inputs (missing results): exit 2, the old store as it was
    gone = ["store", "from-api", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tok),
            "--out", str(out), "--force"]  # fmt: skip
    assert main(gone) == 2
    _one_line(capsys)
    assert _files(out) == before
    # a foreign file: refused, nothing deleted
    (out / "thesis.tex").write_text("years of work")
    assert main([*argv, "--force", "--dtype", "fp16"]) == 2
    _one_line(capsys, "thesis.tex")
    assert _files(out) == before | {"thesis.tex": b"years of work"}
    # the store this tool made: replaced
    (out / "thesis.tex").unlink()
    assert main([*argv, "--force", "--dtype", "fp16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "fp16"
    assert not list(tmp_path.glob(".api.replaced"))
