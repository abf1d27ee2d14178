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
    # -inf (JSON's -Infinity: an impossible token) reads as the servers' finite floor
    tops[3] = {"a": -0.05, "b": -math.inf}
    _, lps = scorer._parse(seq, _answer(list("abca"), tops), 0, start=2)
    assert lps.tolist() == [[pytest.approx(-0.05), -9999.0]]


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
        (list("abca"), [None, {"b": -0.1, "c": -2}, {"token_id:999": -0.1, "a": -2},
                        {"a": -0.1, "b": -2}], "alternative 'token_id:999' is no token"),
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


def test_tokens_that_decode_alike_are_told_apart(served):
    """Byte pieces of one character (or ``▁the`` and ``the``) decode to one text: asked
    for as token ids, dk serve-teacher returns all K alternatives, each by its id, and
    the scorer reads the served model's own top K."""
    from darkknowledge.blackbox.sampler import Token
    from darkknowledge.blackbox.serve import _legacy_lp

    t = Token(5, "x", 0, -0.1, [("\ufffd", -0.5), ("\ufffd", -1.0), ("y", -2.0)], [7, 8, 9])
    assert len(_legacy_lp([t])["top_logprobs"][0]) == 2  # as texts: two merged
    lp = _legacy_lp([t], as_ids=True)
    assert lp["tokens"] == ["token_id:5"]
    assert lp["top_logprobs"] == [{"token_id:7": -0.5, "token_id:8": -1.0, "token_id:9": -2.0}]

    url, gen = served
    sc = EchoScorer([url], "tiny", gen.tok, 5)
    sc.probe()
    assert sc.as_ids and sc._body([1, 2])["return_tokens_as_token_ids"] is True
    seq = gen.encode("Q: Ann has 3 eggs.")
    ((ids, lps),) = sc([seq])
    with torch.no_grad():
        want = torch.log_softmax(gen.model(torch.tensor([seq])).logits[0, :-1].float(), -1)
    assert torch.equal(ids, want.topk(5).indices)
    assert torch.allclose(lps, want.topk(5).values, atol=1e-4)
    assert sc._ids is None  # no map of every token's text was needed


def test_a_server_without_token_ids_is_asked_for_texts():
    """A server that refuses ``return_tokens_as_token_ids`` (its 400 names the field):
    the probe asks again for token texts; any other refusal is the error."""
    from darkknowledge.blackbox.client import TeacherRejected

    class Fake(EchoScorer):
        async def _score_all(self, seqs, starts):
            if self.as_ids:
                raise TeacherRejected(f"rejected (400): {self.refuse}")
            return []

        async def _send(self, bodies):
            toks = [self.tok.decode([i]) for i in bodies[0]["prompt"]]
            return [({"choices": [{"text": "", "logprobs": {"tokens": toks}}]}, False)]

    sc = Fake(["http://127.0.0.1:9/v1"], "t", char_tokenizer("abc"), 2)
    sc.refuse = "unknown field return_tokens_as_token_ids"
    assert sc.probe() is False
    assert not sc.as_ids and "return_tokens_as_token_ids" not in sc._body([0, 1])
    sc = Fake(["http://127.0.0.1:9/v1"], "t", char_tokenizer("abc"), 2)
    sc.refuse = "logprobs=2 is above this server's cap"
    with pytest.raises(TeacherRejected, match="cap"):
        sc.probe()


def test_a_batch_without_labels_asks_nothing(scorer):
    """A micro-batch with no labelled position (rows whose answers came out empty): an
    empty target, and no request (the endpoint here does not answer)."""
    from darkknowledge.blackbox.echo import batch_target

    x = torch.zeros(2, 5, dtype=torch.long)
    y = torch.full((2, 5), -100)
    ids, lps, tail = batch_target(scorer, x, y, y != -100)
    assert ids.shape == lps.shape == (0, 2) and tail.shape == (0,)
