"""Echo answers a served teacher may get wrong, each refused with one line: the parser of
:mod:`darkknowledge.blackbox.echo` on answers written out by hand (the served path itself
runs against `dk serve-teacher` in tests/engine/test_kill_resume.py)."""

from __future__ import annotations

import math

import pytest
import torch

from darkknowledge.blackbox.echo import EchoScorer
from darkknowledge.errors import DKError
from darkknowledge.hf.io import char_tokenizer


@pytest.fixture(scope="module")
def scorer():
    return EchoScorer(["http://127.0.0.1:9/v1"], "t", char_tokenizer("abc"), 2)


def _answer(tokens, tops):
    return {"choices": [{"text": "", "logprobs": {"tokens": tokens, "top_logprobs": tops}}]}


def test_a_good_answer_from_the_first_label_on(scorer):
    seq = scorer.tok.encode("abca")
    tops = [None, {"b": -0.1, "c": -2.5}, {"c": -0.2, "a": -1.9}, {"a": -0.05, "b": -3.0}]
    ids, lps = scorer._parse(seq, _answer(list("abca"), tops), 0, start=1)
    assert ids.tolist() == [scorer.tok.encode("ca"), scorer.tok.encode("ab")]
    assert torch.allclose(lps, torch.tensor([[-0.2, -1.9], [-0.05, -3.0]]))
    # the token_id:N form names ids directly
    tops[3] = {f"token_id:{seq[0]}": -0.05, "b": -3.0}
    ids, _ = scorer._parse(seq, _answer(list("abca"), tops), 0, start=2)
    assert ids.tolist() == [[seq[0], scorer.tok.encode("b")[0]]]


@pytest.mark.parametrize(
    "tokens, tops, says",
    [
        (list("abc"), [None, {"b": -0.1, "c": -2}, {"c": -0.1, "a": -2}], "4 token ids sent, 3"),
        (list("abcb"), [None, {"b": -0.1, "c": -2}, {"c": -0.1, "a": -2}, {"a": -0.1, "b": -2}],
         "echoed 'b' for the student's 'a'"),
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"c": -0.1}, {"a": -0.1, "b": -2}],
         "1 alternatives where 2"),
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"c": 0.5, "a": -2}, {"a": -0.1, "b": -2}],
         "log-prob of 0.5"),
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"c": math.nan, "a": -2}, {"a": -0.1, "b": -2}],
         "log-prob of nan"),
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"c": "x", "a": -2}, {"a": -0.1, "b": -2}],
         "log-prob of 'x'"),
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"zz": -0.1, "a": -2}, {"a": -0.1, "b": -2}],
         "alternative 'zz' is no token"),
    ],
)  # fmt: skip
def test_a_bad_answer_is_one_line(scorer, tokens, tops, says):
    seq = scorer.tok.encode("abca")
    with pytest.raises(DKError, match=says) as e:
        scorer._parse(seq, _answer(tokens, tops), 0, start=0)
    assert "\n" not in str(e.value)


def test_no_logprobs_is_one_line(scorer):
    with pytest.raises(DKError, match="no logprobs"):
        scorer._parse([0, 1], {"choices": [{"text": ""}]}, 0, start=0)
