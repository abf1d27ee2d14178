"""Numbers that cannot train are refused by the schema with one line (docs/limits.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml"
TEXT = ROOT / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml"
LM = ROOT / "recipes" / "lm" / "shakespeare_char_fkl.yaml"


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        (CLASSIFY, "train.lr=.inf", "train.lr"),
        (CLASSIFY, "train.lr=1e30", "train.lr"),
        (CLASSIFY, "loss.hinton_kd.temperature=1e-300", "loss.hinton_kd.temperature"),
        (CLASSIFY, "loss.hinton_kd.temperature=.inf", "loss.hinton_kd.temperature"),
        (CLASSIFY, "teacher.weights=[.inf, 1, 1]", "teacher.weights"),
        (CLASSIFY, "train.seed=10000000000000000000000", "train.seed"),
        (CLASSIFY, "train.seed=-1", "train.seed"),
        (LM, "distill.loss.temperature=1000", "distill.loss.temperature"),
        (LM, "student.model.config.n_head=3", "n_head=3 does not divide n_embd=64"),
        (LM, "student.model.config.n_embd=-16", "n_embd"),
        (TEXT, "teacher.tiny.num_attention_heads=5", "does not divide hidden_size"),
        (TEXT, "loss.soft.temperature=0", "loss.soft.temperature"),
    ],
)
def test_numbers_that_cannot_train_are_one_line(recipe, override, key, capsys):
    assert main(["validate", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err, err
