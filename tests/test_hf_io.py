"""The shared transformers adapter: tiny models by name, tokenizers, save/reload."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from darkknowledge.errors import DKError  # noqa: E402
from darkknowledge.hf.io import (  # noqa: E402
    build_tiny,
    load_model,
    load_tokenizer,
    save_pretrained,
    whole_copy,
)

GPT2_TOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "gpt2"


def test_tiny_models_are_seeded():
    a = build_tiny("tiny-llama", "AutoModelForCausalLM", seed=3)
    b = build_tiny("tiny-llama", "AutoModelForCausalLM", seed=3)
    c = build_tiny("tiny-llama", "AutoModelForCausalLM", seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_save_and_reload_same_logits(tmp_path):
    m = build_tiny("tiny-bert", "AutoModelForSequenceClassification", num_labels=2).eval()
    save_pretrained(m, tmp_path / "m")
    r = load_model(tmp_path / "m", "AutoModelForSequenceClassification").eval()
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, r(input_ids=x).logits)


def test_missing_model_folder_is_one_line(tmp_path):
    with pytest.raises(DKError, match="cannot load model") as e:
        load_model(tmp_path / "nothing-here")
    assert "\n" not in str(e.value)


def test_unknown_tiny_name():
    with pytest.raises(DKError, match="unknown tiny model"):
        build_tiny("huge-bert")


@pytest.mark.skipif(not GPT2_TOK.exists(), reason="shared GPT-2 tokenizer not present")
def test_gpt2_bpe_tokenizer_from_vocab_and_merges():
    tok = load_tokenizer(GPT2_TOK)
    assert len(tok) == 50257
    assert tok.decode(tok("To be, or not to be")["input_ids"]) == "To be, or not to be"


def test_char_tokenizer_round_trip_and_reload(tmp_path):
    from darkknowledge.hf.io import char_tokenizer

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = char_tokenizer(text)
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    tok.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again(text)["input_ids"] == ids
    assert tok("~")["input_ids"] == [tok.unk_token_id]


def test_whole_copy_keeps_weights_dtype_generation_config_and_rng():
    """The unsharded copy made after FSDP training: the same weights, in the model's
    dtype (bf16 stays bf16), with its generation config; its throw-away random init
    leaves the caller's RNG stream alone."""
    m = build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=3).to(torch.bfloat16)
    m.generation_config.max_new_tokens = 7
    full = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    copy = whole_copy(m, full)
    assert torch.equal(torch.get_rng_state(), before)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert copy.generation_config.max_new_tokens == 7
    for k, v in copy.state_dict().items():
        assert torch.equal(v, full[k]), k
