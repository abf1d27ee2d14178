"""Recipe families: dispatch by the top-level ``family:`` key, one-line errors."""

import subprocess
import sys

import pytest

from darkknowledge.errors import DKError
from darkknowledge.families import FAMILIES, family_of, validate_family


def test_default_family_is_classify():
    assert family_of({"data": {}}) == "classify"


def test_unknown_family_is_one_line_error():
    with pytest.raises(DKError, match="unknown family 'nope'; known: "):
        family_of({"family": "nope"})


def test_classify_accepts_explicit_family_key():
    name, recipe = validate_family(
        {
            "family": "classify",
            "data": {"name": "digits"},
            "student": {"model": {"name": "mlp", "hidden": [8]}},
        }
    )
    assert name == "classify"
    assert recipe.student.model.hidden == [8]


def test_every_family_has_schema_and_runner_names():
    for fam in FAMILIES.values():
        assert ":" in fam.schema and ":" in fam.run


def test_cli_unknown_family(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("family: bogus\ndata: {name: digits}\n")
    p = subprocess.run(
        [sys.executable, "-m", "darkknowledge.cli", "validate", str(r)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "unknown family 'bogus'" in p.stderr
