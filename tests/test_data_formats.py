"""Text and chat data in the ecosystem's formats (darkknowledge.rows): SST-2's TSV loads
as before, the same rows written as CSV, JSONL, a JSON array, Parquet and a datasets
save_to_disk folder load identically, and bad files are one line naming file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from darkknowledge import rows  # noqa: E402
from darkknowledge.errors import DKError  # noqa: E402
from darkknowledge.hf.text_data import read_split  # noqa: E402
from darkknowledge.lm.data import read_chat, read_keys  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def sst2_dev():
    path = SST2 / "dev.tsv"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _write_all(folder: Path, records: list[dict], label_names=None) -> dict[str, Path]:
    """The same records as every format; ``label_names``: the label is a ClassLabel."""
    keys = list(records[0])
    out = {"jsonl": folder / "d.jsonl", "json": folder / "d.json", "csv": folder / "d.csv"}
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    out["json"].write_text(json.dumps(records, indent=1))
    with open(out["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(records)
    features = None
    if label_names:
        features = datasets.Features(
            {k: datasets.Value("string") for k in keys if k != "label"}
            | {"label": datasets.ClassLabel(names=label_names)}
        )
    ds = datasets.Dataset.from_list(records, features=features)
    out["parquet"] = folder / "d.parquet"
    ds.to_parquet(str(out["parquet"]))
    out["saved"] = folder / "saved"
    ds.save_to_disk(str(out["saved"]))
    return out


def test_sst2_tsv_loads_as_before(sst2_dev):
    split = read_split(sst2_dev)
    lines = sst2_dev.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel" and len(split) == len(lines) - 1 == 872
    naive = [line.rsplit("\t", 1) for line in lines[1:]]  # no tab inside a sentence
    assert split.texts == [t.strip() for t, _ in naive]
    assert split.labels == [int(y) for _, y in naive] and split.label_names is None


def test_every_format_gives_the_same_split(sst2_dev, tmp_path):
    want = read_split(sst2_dev).subset(200)
    recs = [{"sentence": t, "label": y} for t, y in zip(want.texts, want.labels, strict=True)]
    for fmt, path in _write_all(tmp_path, recs, NAMES).items():
        got = read_split(path)
        assert (got.texts, got.labels) == (want.texts, want.labels), fmt
        # a datasets ClassLabel carries the class names along
        assert got.label_names == (NAMES if fmt in ("parquet", "saved") else None), fmt


def test_a_datasetdict_folder_is_the_text_recipes_data_path(sst2_dev, tmp_path):
    from darkknowledge.families import load_family_recipe
    from darkknowledge.hf.text_pipeline import _data

    want = read_split(sst2_dev).subset(100)
    ds = datasets.Dataset.from_dict({"sentence": want.texts, "label": want.labels})
    datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}).save_to_disk(tmp_path)
    smoke = Path(__file__).resolve().parents[1] / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml"
    ov = [f"data.path={tmp_path}", "data.train=train", "data.dev=validation", "data.test=test"]
    _, recipe, _ = load_family_recipe(smoke, ov)
    train, dev, _ = _data(recipe)
    seed = recipe.data.subset_seed
    assert (train.texts, train.labels) == (want.texts, want.labels)  # train_subset 256 > 100
    assert dev.texts == want.subset(64, seed).texts  # dev_subset: 64
    with pytest.raises(DKError, match=r"a DatasetDict folder .*splits: train, validation, test"):
        read_split(tmp_path)


def test_chat_rows_and_store_keys_in_every_format(tmp_path):
    recs = [
        {"id": "q1", "sample": 0, "prompt": "2+2?", "response": 'it is "4",\nsurely'},
        {"id": "q2", "sample": 3, "prompt": "3+3?", "response": "6"},
    ]
    for fmt, path in _write_all(tmp_path, recs).items():
        assert read_chat(path, "prompt", "response") == [(r["prompt"], r["response"]) for r in recs]
        assert read_keys(path, "id", "sample") == [("q1", 0), ("q2", 3)], fmt
    with pytest.raises(DKError, match=r"d\.parquet: no column 'question' \(columns: id, sample"):
        read_chat(tmp_path / "d.parquet", "question", "response")


def _one_line(fn, *args) -> str:
    with pytest.raises(DKError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files_are_one_line_naming_file_and_row(tmp_path, monkeypatch):
    f = tmp_path / "a.csv"
    f.write_text('sentence,label\n"a, b",1\nc\n')
    assert _one_line(read_split, f).endswith("a.csv:3: 1 columns, the header has 2")
    f.write_text('sentence,label\n"never closed,1\n')
    assert "a.csv:" in _one_line(read_split, f)
    f = tmp_path / "a.json"
    f.write_text('[{"sentence": "x", "label": 0}, 7]')
    assert _one_line(read_split, f).endswith("a.json: row 2: expected a JSON object")
    f.write_text("[" * 100 + "]" * 100)
    assert "nested deeper than" in _one_line(read_split, f)
    f = tmp_path / "a.xml"
    f.write_text("<x/>")
    assert "unknown data format (expected .jsonl, .json, .csv" in _one_line(read_split, f)

    paths = _write_all(
        tmp_path, [{"sentence": "fine", "label": 1}, {"sentence": "x" * 99, "label": 0}]
    )
    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 50)  # a value over the per-line bound
    for fmt in ("parquet", "saved"):
        assert _one_line(read_split, paths[fmt]).endswith(": row 2: 'sentence' longer than 0 MB")
    monkeypatch.undo()
    assert "d.parquet: no column 'label2'" in _one_line(
        read_split, paths["parquet"], None, "label2"
    )
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert "bad.parquet: not a readable Parquet file" in _one_line(
        read_split, tmp_path / "bad.parquet"
    )

    nested = tmp_path / "n.parquet"
    datasets.Dataset.from_dict({"sentence": [["a"]], "label": [0]}).to_parquet(str(nested))
    assert "column 'sentence' holds list" in _one_line(read_split, nested)

    state = paths["saved"] / "state.json"
    st = json.loads(state.read_text())
    st["_data_files"] = [{"filename": "../d.parquet"}]
    state.write_text(json.dumps(st))
    assert 'names "../d.parquet", not a file here' in _one_line(read_split, paths["saved"])
    assert "no state.json" in _one_line(read_split, tmp_path)
