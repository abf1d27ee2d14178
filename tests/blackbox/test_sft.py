import pytest
import torch

from darkknowledge.blackbox.sft import (
    IGNORE,
    encode_pair,
    pass_and_majority,
    response_loss,
    train_sft,
)
from darkknowledge.blackbox.synthetic import problems, prompt_of
from darkknowledge.errors import DKError
from darkknowledge.hf.io import build_tiny, char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(
        "".join(prompt_of(r["question"]) + r["answer"] for r in problems(50, 0)) + "0123456789#"
    )


def test_loss_is_on_the_response_only(tok):
    ids, labels = encode_pair(tok, "Q: 1+1\nA:", " 2", max_len=64)
    n_prompt = len("Q: 1+1\nA:")
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tok.eos_token_id
    # changing the prompt's targets cannot change the loss; changing the response's can
    m = build_tiny(
        "tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2
    )
    m.eval()  # no dropout: equal inputs give equal losses
    x = torch.tensor([ids])
    lab = torch.tensor([labels])
    base = response_loss(m, x, lab, torch.ones_like(x))
    lab2 = lab.clone()
    lab2[0, 1] = IGNORE  # a prompt position: already ignored
    assert torch.equal(response_loss(m, x, lab2, torch.ones_like(x)), base)
    lab3 = lab.clone()
    lab3[0, -1] = IGNORE
    assert not torch.equal(response_loss(m, x, lab3, torch.ones_like(x)), base)
    # all masked: zero with a gradient
    z = response_loss(m, x, torch.full_like(lab, IGNORE), torch.ones_like(x))
    z.backward()
    assert z.item() == 0.0


def test_training_lowers_the_response_loss(tok):
    rows = problems(64, 1)
    pairs = [(prompt_of(r["question"]), " " + r["answer"]) for r in rows]
    m = build_tiny(
        "tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2
    )
    losses = train_sft(m, tok, pairs, steps=30, batch_size=8, lr=5e-3, warmup=3)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    with pytest.raises(DKError, match="no training rows"):
        train_sft(m, tok, [], steps=1)


def test_pass_and_majority():
    v = lambda p, e="7": {"correct": p == e, "predicted": p, "expected": e}  # noqa: E731
    r = pass_and_majority([[v("7"), v("7"), v("3"), v(None)], [v("1"), v("2"), v("2"), v("7")]])
    assert r["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert r["maj@k"] == 0.5 and r["k"] == 4  # first: 7 wins; second: 2 wins (wrong)
