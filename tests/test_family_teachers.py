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
    ],
)
def test_refused_teacher_kinds_are_one_line(recipe, teacher, says, capsys):
    assert main(["validate", str(recipe), f"teacher={teacher}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_causal_lm_takes_a_served_teacher(capsys):
    """The causal_lm × API cell: a served teacher scores tokens through echo (token KD
    here; GKD in tests/engine/test_kill_resume.py), but cannot write text (seqkd)."""
    api = "teacher={kind: api, base_url: 'http://127.0.0.1:1/v1', model: t}"
    assert main(["validate", str(LM), api]) == 0
    assert main(["validate", str(LM), api, "distill.mode=seqkd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distill.mode token or gkd" in err, err
