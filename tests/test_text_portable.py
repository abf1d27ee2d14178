"""Text students as plain transformers sees them: the class names of the recipe (or of
the dataset) travel as id2label / label2id, a model card sits beside the weights, and a
fresh interpreter with only transformers classifies with ``pipeline``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from darkknowledge.errors import DKError
from darkknowledge.families import validate_family
from darkknowledge.hf.text_data import TextSplit, from_datasets
from darkknowledge.hf.text_pipeline import label_names, run_text_recipe

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not SST2.exists(), reason="SST-2 not present"),
]

RECIPE = {
    "family": "text",
    "name": "sst2-portable",
    "data": {"path": str(SST2), "max_length": 16, "train_subset": 32, "dev_subset": 16,
             "test_subset": 16, "label_names": ["negative", "positive"]},
    "teacher": {"source": "tiny:tiny-bert",
                "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                         "num_hidden_layers": 2}},
    "student": {"layers": [0]},
    "loss": {"soft": {"weight": 1.0}, "hard": {"weight": 1.0}},
    "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3},
    "eval": {"latency": False},
}  # fmt: skip

# The interpreter of the probes: this one, or (DK_PORTABLE_PYTHON) another with an
# older transformers, to check that students saved here load there (docs/export.md).
PROBE_PYTHON = os.environ.get("DK_PORTABLE_PYTHON") or sys.executable

PROBE = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from transformers import pipeline
assert "darkknowledge" not in sys.modules
clf = pipeline("text-classification", model=sys.argv[1])
print(json.dumps(clf(["a charming and often affecting journey", "bleak and desperate"])))
"""


def test_text_student_carries_label_names_and_a_card(tmp_path):
    _, rec = validate_family(RECIPE)
    run_text_recipe(rec, tmp_path / "run")
    model_dir = tmp_path / "run" / "students" / "distilled" / "seed0" / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert cfg["label2id"] == {"negative": 0, "positive": 1}
    card = (model_dir / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "sst2-portable" in card
    assert "tiny:tiny-bert" in card and str(SST2) in card and "test accuracy" in card
    p = subprocess.run(
        [PROBE_PYTHON, "-c", PROBE, str(model_dir)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    preds = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(preds) == 2 and {r["label"] for r in preds} <= {"negative", "positive"}


def test_label_names_from_the_dataset_or_refused_when_they_do_not_fit():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]}, feats)
    split = from_datasets(ds)
    assert split.label_names == ["neg", "pos"] and split.subset(2).label_names == ["neg", "pos"]
    _, plain = validate_family({**RECIPE, "data": {"path": str(SST2)}})
    assert label_names(plain, [split], 2) == ["neg", "pos"]
    assert label_names(plain, [split], 3) is None  # names that do not fit are not used
    assert label_names(plain, [TextSplit(["x"], [0])], 2) is None
    _, named = validate_family(RECIPE)
    with pytest.raises(DKError, match=r"2 names .* but the data has 3 classes"):
        label_names(named, [split], 3)
    with pytest.raises(DKError, match="distinct"):
        validate_family({**RECIPE, "data": {"path": str(SST2), "label_names": ["a", "a"]}})
