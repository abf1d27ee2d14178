"""dk eval: a language model judged by sampling and verifying its answers."""

from __future__ import annotations

import json
from pathlib import Path

from darkknowledge.blackbox.sft import train_sft
from darkknowledge.cli import main
from darkknowledge.hf import io as hfio

ROWS = [
    {"question": f"Q: {a} plus {b}\nA:", "answer": str(a + b)} for a in range(3) for b in range(3)
]


def test_eval_scores_a_trained_model_above_an_untrained_one(tmp_path: Path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    tok = hfio.char_tokenizer("".join(r["question"] + " " + r["answer"] for r in ROWS))
    for name, steps in (("untrained", 0), ("trained", 400)):
        m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(tok), n_layer=1,
                            n_embd=32, n_head=2, eos_token_id=tok.eos_token_id, seed=0)  # fmt: skip
        if steps:  # memorise the nine sums (the answer ends with EOS)
            pairs = [(r["question"], " " + r["answer"]) for r in ROWS]
            train_sft(m, tok, pairs, steps=steps, batch_size=9, lr=5e-3, warmup=10)
        hfio.save_pretrained(m, tmp_path / name, tok)
    res = {}
    for name in ("untrained", "trained"):
        args = ["eval", str(tmp_path / name), "--data", str(data), "--verifier", "exact",
                "--k", "3", "--max-new-tokens", "3"]  # fmt: skip
        assert main(args) == 0
        res[name] = json.loads((tmp_path / name / "eval.json").read_text())["models"]["model"]
    assert res["trained"]["greedy"] >= 0.75 and res["untrained"]["greedy"] <= 0.25, res
    assert res["trained"]["pass@1"] > res["untrained"]["pass@1"]
    assert res["trained"]["loss"] < res["untrained"]["loss"] / 4
    # bad input: one line, exit 2
    capsys.readouterr()
    for bad in (["--data", str(tmp_path / "none.jsonl")], ["--data", str(data), "--verifier", "nope"],
                ["--data", str(data), "--k", "0"]):  # fmt: skip
        assert main(["eval", str(tmp_path / "trained"), *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert main(["eval", str(tmp_path), "--data", str(data)]) == 2  # not a model or run
    # --out: a second data file scored beside the first, eval.json left as it was
    before = (tmp_path / "trained" / "eval.json").read_text()
    args = ["eval", str(tmp_path / "trained"), "--data", str(data), "--verifier", "exact",
            "--k", "1", "--max-new-tokens", "3", "--limit", "4", "--out", str(tmp_path / "dev.json")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "dev.json").read_text())["prompts"] == 4
    assert (tmp_path / "trained" / "eval.json").read_text() == before
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "no" / "dev.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # the same rows as CSV (every format darkknowledge.rows reads): the same scores
    import csv

    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    args = ["eval", str(tmp_path / "trained"), "--data", str(tmp_path / "rows.csv"),
            "--verifier", "exact", "--k", "3", "--max-new-tokens", "3"]  # fmt: skip
    assert main(args) == 0
    again = json.loads((tmp_path / "trained" / "eval.json").read_text())["models"]["model"]
    assert {k: again[k] for k in ("greedy", "pass@1", "loss")} == {
        k: res["trained"][k] for k in ("greedy", "pass@1", "loss")
    }
