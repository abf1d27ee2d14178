import json

import pytest

from darkknowledge.blackbox.verifiers import VERIFIERS, build_verifier, normalize_number
from darkknowledge.errors import DKError


def test_gsm8k_on_real_references():
    rows = [json.loads(x) for x in open("../shared/data/gsm8k/test.jsonl").readlines()[:50]]
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
