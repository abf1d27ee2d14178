"""``sft.jsonl`` in TRL's dialects (``select.format``): ``messages`` and
``prompt_completion`` rows from the tiny served model, with the system prompt the
teacher was sent, read by the causal_lm chat reader and taken unchanged by TRL's
``SFTTrainer`` (``datasets.load_dataset("json", ...)``, no conversion)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from darkknowledge.blackbox.generate import sft_row
from darkknowledge.blackbox.synthetic import problems
from darkknowledge.cli import main
from darkknowledge.errors import DKError
from darkknowledge.lm.data import read_jsonl, render

SYSTEM = "Add up. End with #### and the number."  # characters the tiny model knows
# serve-teacher without a chat template feeds the contents joined by newlines; this one
# renders the same text, with EOS closing the assistant turn
TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def _generate(url: str, d: Path, fmt: str) -> list[dict]:
    """dk generate (chat API, a system prompt, every sample kept) into ``d/o`` with
    ``select.format: fmt``; the rows of its sft.jsonl."""
    prompts = d / "p.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps(r) + "\n" for r in problems(3, 4)))
    rec = {
        "prompts": {"path": str(prompts), "system": SYSTEM},
        "teacher": {"base_url": url, "model": "tiny", "api": "chat"},
        "sampling": {"n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 0},
        "select": {"keep": "all", "format": fmt},
    }
    (d / "r.yaml").write_text(yaml.safe_dump(rec))
    assert main(["generate", str(d / "r.yaml"), "--out", str(d / "o")]) == 0
    return [json.loads(x) for x in (d / "o" / "sft.jsonl").read_text().splitlines()]


def _tokenizer(model_dir: Path):
    from darkknowledge.hf.io import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.chat_template = TEMPLATE
    return tok


def test_sft_formats_and_the_chat_reader(served, teacher_dir, tmp_path):
    url, _ = served
    plain = _generate(url, tmp_path, "response")
    msgs = _generate(url, tmp_path, "messages")
    # the format is not part of the run: the second run only rewrote sft.jsonl
    assert (
        json.loads((tmp_path / "o" / "summary.json").read_text())["this_run"]["http_requests"] == 0
    )
    pc = _generate(url, tmp_path, "prompt_completion")
    assert len(plain) == len(msgs) == len(pc) == 6
    for a, m, c in zip(plain, msgs, pc, strict=True):
        assert list(m)[:3] == ["id", "sample", "messages"] and list(c)[:2] == ["id", "sample"]
        assert (a["id"], a["sample"]) == (m["id"], m["sample"]) == (c["id"], c["sample"])
        system, user = (
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": a["prompt"]},
        )
        answer = {"role": "assistant", "content": a["response"]}
        assert m["messages"] == [system, user, answer]
        assert c["prompt"] == [system, user] and c["completion"] == [answer]
        assert m["verdict"] == a["verdict"] and c["sampling"] == a["sampling"]

    # the chat reader takes all three: the same responses; the conversational forms keep
    # the system turn, and the chat template renders it in front of the prompt
    read = {}
    for name, rows in (("response", plain), ("messages", msgs), ("prompt_completion", pc)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        read[name] = read_jsonl(f, "prompt", "response")
    assert [r for _, r in read["messages"]] == [r["response"] for r in plain]
    assert read["messages"] == read["prompt_completion"]
    assert read["messages"][0][0] == [system, {"role": "user", "content": plain[0]["prompt"]}]
    tok = _tokenizer(teacher_dir)
    (p0, r0), (p1, r1) = read["response"][0], read["messages"][0]
    ids0, n0 = render(tok, p0, r0, 10_000)
    ids1, n1 = render(tok, p1, r1, 10_000)
    assert ids0[n0:] == ids1[n1:]  # the same response tokens
    assert tok.decode(ids1[:n1]) == f"{SYSTEM}\n{p0}\n"
    assert tok.decode(ids0[:n0]) == f"{p0}\n"
    # without a chat template: the contents joined by newlines, as serve-teacher does
    tok.chat_template = None
    ids2, n2 = render(tok, p1, r1, 10_000)
    assert tok.decode(ids2[:n2]) == f"{SYSTEM}\n{p0}"

    # a completions teacher was sent plain text: prompt/completion strings, no system
    row = {"id": "7", "prompt": "Q: 1+1?\nA:", "reference": "#### 2",
           "teacher": {"model": "t", "api": "completions"}, "sampling": {}}  # fmt: skip
    s = {"index": 1, "text": " 2", "verdict": {"correct": True}}
    assert sft_row(row, s, "prompt_completion", SYSTEM) == {
        "id": "7", "sample": 1, "prompt": "Q: 1+1?\nA:", "completion": " 2",
        "reference": "#### 2", "teacher": row["teacher"], "sampling": {},
        "verdict": {"correct": True},
    }  # fmt: skip
    assert sft_row(row, s, "messages", SYSTEM)["messages"][0]["role"] == "user"

    # one-line errors naming file:line
    bad = tmp_path / "bad.jsonl"
    for rows, want in [
        ([msgs[0], {"id": "x", "messages": [user]}], r"bad.jsonl:2: 'messages' must end with an assistant"),
        ([msgs[0], plain[0]], r"bad.jsonl:2: no 'messages' field"),
        ([plain[0], msgs[0]], r"bad.jsonl:2: a 'messages' row"),
        ([pc[0] | {"completion": [answer, answer]}], r"bad.jsonl:1: 'completion' must be one assistant turn"),
        ([{"messages": [{"role": "user"}, answer]}], r"bad.jsonl:1: 'messages': every message needs"),
        ([{"id": 1, "text": "x"}], r"bad.jsonl:1: no 'response' \(data.response_key\), 'messages'"),
    ]:  # fmt: skip
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DKError, match=want):
            read_jsonl(bad, "prompt", "response")


def test_causal_lm_trains_on_messages_rows(served, teacher_dir, tmp_path):
    """`dk run` (causal_lm, chat data) on the messages form, system turn and all."""
    _generate(served[0], tmp_path, "messages")
    rec = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(tmp_path / "o" / "sft.jsonl"), "max_length": 96},
        "student": {"model": {"path": str(teacher_dir)}},
        "train": {"steps": 2, "batch_size": 2, "warmup": 1, "eval_every": 2,
                  "checkpoint_every": 2},
        "distill": {"mode": "none"},
    }  # fmt: skip
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(rec))
    assert main(["run", str(tmp_path / "sft.yaml"), "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_trl_sft_trainer_takes_sft_jsonl_unchanged(served, teacher_dir, tmp_path, fmt):
    """TRL 1.16's SFTTrainer trains on dk generate's sft.jsonl as written: loaded with
    ``datasets.load_dataset("json", ...)``, 2 steps on the tiny model, a finite loss."""
    import trl  # noqa: F401  (the interop-test extra: missing fails, never skips)
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from darkknowledge.hf.io import load_model

    _generate(served[0], tmp_path, fmt)
    ds = load_dataset(
        "json", data_files=str(tmp_path / "o" / "sft.jsonl"), split="train",
        cache_dir=str(tmp_path / "hf"),
    )  # fmt: skip
    assert ds.num_rows == 6 and {"id", "sample"} <= set(ds.column_names)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, max_length=128, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=load_model(teacher_dir, "AutoModelForCausalLM"),
        args=args,
        train_dataset=ds,
        processing_class=_tokenizer(teacher_dir),
    )
    # TRL rendered the system turn the teacher was sent
    first = trainer.train_dataset[0]
    assert trainer.processing_class.decode(first["input_ids"]).startswith(SYSTEM + "\n")
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert math.isfinite(out.training_loss) and all(math.isfinite(x) and x > 0 for x in losses)
