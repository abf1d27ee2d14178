"""The family × teacher-kind table of the README: every refused cell is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml"
TEXT = ROOT / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml"
LM = ROOT / "recipes" / "lm" / "shakespeare_char_fkl.yaml"


@pytest.mark.parametrize(
    "recipe, teacher, says",
    [
        (CLASSIFY, "{kind: api, base_url: 'http://127.0.0.1:1/v1'}", "'api'"),
        (TEXT, "{kind: ensemble, source: minilm-l6}", "'ensemble'"),
        (TEXT, "{kind: api, source: minilm-l6}", "'api'"),
        # an ensemble of one is no ensemble; members over other vocabularies: see
        # tests/lm/test_lm_ensemble.py (they are refused once their tokenizers are read)
        (LM, "{kind: ensemble, members: [{model: {path: /}}]}", "teacher.members"),
        (LM, "{kind: api, base_url: 'http://127.0.0.1:1/v1'}", "dk store from-api"),
    ],
)
def test_refused_teacher_kinds_are_one_line(recipe, teacher, says, capsys):
    assert main(["validate", str(recipe), f"teacher={teacher}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
