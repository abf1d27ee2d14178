"""One run contract: `dk run --seeds 2`, `dk report` and `dk eval` on a recipe of every
family (a causal_lm recipe's own evaluation is `dk eval`'s: `eval.sampled`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"


def _classify(tmp: Path) -> Path:
    r = {"data": {"name": "digits", "limit": 300},
         "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [16]}, "train": {"steps": 10}},
         "student": {"model": {"name": "mlp", "hidden": [8]}},
         "train": {"steps": 5, "batch_size": 32}, "eval": {"latency": False}}  # fmt: skip
    f = tmp / "classify.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def _text(tmp: Path) -> Path:
    r = {"family": "text",
         "data": {"path": str(SHARED / "sst2"), "max_length": 16, "train_subset": 32,
                  "dev_subset": 16, "test_subset": 16},
         "teacher": {"source": "tiny:tiny-bert",
                     "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}},
         "student": {"layers": [0, 2]}, "train": {"epochs": 1, "batch_size": 16},
         "eval": {"latency": False}}  # fmt: skip
    f = tmp / "text.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def _lm(tmp: Path) -> Path:
    text = tmp / "shakes.txt"
    text.write_text(SHAKES.read_text()[:5_000])
    tiny = {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
    fast = {"steps": 3, "batch_size": 2, "warmup": 1, "eval_every": 3}
    qa = tmp / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"question": q, "answer": a}) + "\n"
            for q, a in (("ROMEO:", "O"), ("First Citizen:", "B"))
        )
    )
    r = {"family": "causal_lm",
         "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 2},
         "tokenizer": {"kind": "char"}, "teacher": {"model": tiny, "train": fast},
         "student": {"model": tiny}, "train": fast, "distill": {"mode": "token"},
         "eval": {"sampled": {"data": str(qa), "verifier": "exact", "k": 2,
                              "max_new_tokens": 3}}}  # fmt: skip
    f = tmp / "lm.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


@pytest.mark.skipif(not SHAKES.exists(), reason="shared data not present")
@pytest.mark.parametrize("family", ["classify", "text", "causal_lm"])
def test_seeds_and_report_on_every_family(family, tmp_path: Path, capsys):
    recipe = {"classify": _classify, "text": _text, "causal_lm": _lm}[family](tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    if family == "classify":
        summary = json.loads((out / "summary.json").read_text())
        assert summary["seeds"] == [0, 1] and "student" in summary["rows"]
        run = out / "seed_1"
    else:
        report = json.loads((out / "report.json").read_text())
        seeds = report["seeds"] if family == "text" else [int(s) for s in report["students"]]
        assert seeds == [0, 1], report
        run = out
    (run / "curves.png").unlink(missing_ok=True)
    assert main(["report", str(run)]) == 0  # the family's table again, from the run folder
    again = capsys.readouterr().out
    assert again.strip() and (family == "classify" or again.splitlines()[-3] in printed)
    # one report contract: report.json with a row per model, report.md, training curves
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert any(k.startswith("student") or k.startswith("distilled") for k in rows), rows
    assert (run / "curves.png").stat().st_size > 5_000  # drawn again by dk report
    assert "curves.png" in (run / "report.md").read_text()
    # dk eval: the saved models reloaded as a user loads them, scored again
    ev = ["eval", str(run)] + (["--data", str(tmp_path / "qa.jsonl"), "--verifier", "exact",
                                "--k", "2", "--max-new-tokens", "3"] if family == "causal_lm" else [])  # fmt: skip
    assert main(ev) == 0
    got = json.loads((run / "eval.json").read_text())["models"]
    if family == "classify":  # the same weights and test split: the report's accuracy
        rep = json.loads((run / "report.json").read_text())["rows"]["student"]
        assert got["student"]["accuracy"] == rep["accuracy"] and got["student"]["n"] == rep["n"]
    elif family == "text":
        for s in (0, 1):
            d = out / "students" / "distilled" / f"seed{s}"
            res = json.loads((d / "result.json").read_text())
            assert got[f"distilled/seed{s}"]["test_accuracy"] == res["test_accuracy"]
        assert "teacher" in got
    else:  # eval.sampled ran after training: its rows are in the report, one per seed
        sampled = report["eval"]
        assert sorted(sampled["models"]) == ["seed_0", "seed_1"] and sampled["k"] == 2
        assert sorted(got) == ["seed_0", "seed_1"]
        for r in got.values():
            assert 0 <= r["pass@1"] <= 1 and r["loss"] > 0
