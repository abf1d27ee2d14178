import json
import os
from pathlib import Path

import pytest

from darkknowledge.blackbox.verifiers import VERIFIERS, build_verifier, normalize_number
from darkknowledge.errors import DKError

# beside the repository, found from this file (not from the working folder)
GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


def gsm8k_rows(n: int) -> list[dict]:
    """The first n GSM8K test rows; CI (DK_TEST_DATA_REQUIRED) fails without them."""
    if not GSM8K.exists():
        msg = f"GSM8K test set not found at {GSM8K}"
        if os.environ.get("DK_TEST_DATA_REQUIRED"):
            pytest.fail(f"{msg}; the shared data is required (DK_TEST_DATA_REQUIRED)")
        pytest.skip(msg)
    with GSM8K.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    assert len(rows) == n, f"{GSM8K} has {len(rows)} rows, fewer than {n}"
    return rows


def test_gsm8k_on_real_references():
    rows = gsm8k_rows(50)
    v = build_verifier("gsm8k")
    for r in rows:
        final = r["answer"].split("####")[-1].strip()
        assert v(f"work...\n#### {final}", r["answer"]).correct
        assert not v(f"#### {final}1", r["answer"]).correct
        assert not v(final, r["answer"]).correct  # no marker, no fallback
    assert build_verifier("gsm8k", {"fallback_last_number": True})(
        "so 18 dollars", rows[0]["answer"]
    ).correct


@pytest.mark.parametrize(
    ("text", "norm"),
    [("$1,234.50.", "1234.5"), ("-3", "-3"), ("7.000", "7"), ("x", None), ("0.0", "0")],
)
def test_normalize_number(text, norm):
    assert normalize_number(text) == norm


def test_exact_and_regex():
    assert build_verifier("exact")("  Paris\n", "Paris").correct
    assert not build_verifier("exact")("paris", "Paris").correct
    assert build_verifier("exact", {"case_sensitive": False})("paris", "Paris").correct
    v = build_verifier("regex", {"pattern": r"answer is (\w+)"})
    assert v("I think the answer is B, no, the answer is C", "C").correct
    assert not v("the answer is B", "C").correct
    vn = build_verifier("regex", {"pattern": r"= (\S+)", "numeric": True})
    assert vn("x = 1,000", "1000").correct


def test_unknown_and_bad_params():
    with pytest.raises(DKError, match="unknown verifier 'nope'"):
        build_verifier("nope")
    with pytest.raises(DKError, match="not a valid regular expression"):
        build_verifier("regex", {"pattern": "("})
    with pytest.raises(DKError, match="bad params"):
        build_verifier("gsm8k", {"bogus": 1})
    assert {"gsm8k", "exact", "regex"} <= set(VERIFIERS.names())
