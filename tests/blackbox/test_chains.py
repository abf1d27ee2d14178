"""The chained-arithmetic task: deterministic, disjoint splits whose gold solutions are
right, judged by the gsm8k verifier that dk generate and dk eval use."""

from __future__ import annotations

import json
import re

from darkknowledge.blackbox.chains import ALPHABET, SPLITS, answers_only, make_splits, write_splits
from darkknowledge.blackbox.verifiers import build_verifier
from darkknowledge.lm.data import read_chat

SMALL = {"teacher_train": 300, "distill": 200, "dev": 50, "test": 500}


def _solve(question: str) -> tuple[int, list[str]]:
    """Left-to-right evaluation of ``412 +37 -85 *3``, with the worked steps."""
    first, *ops = question.split()
    x, work = int(first), []
    for op in ops:
        n = int(op[1:])
        y = {"+": x + n, "-": x - n, "*": x * n}[op[0]]
        work.append(f"{x}{op[0]}{n}={y}")
        x = y
    return x, work


def test_splits_are_deterministic_disjoint_and_right():
    a, b = make_splits(0, SMALL), make_splits(0, SMALL)
    assert a == b
    assert make_splits(1, SMALL)["test"] != a["test"]
    assert {k: len(v) for k, v in a.items()} == SMALL
    seen: dict[str, str] = {}
    for split in SPLITS:
        for r in a[split]:
            assert r["question"] not in seen, (r["question"], seen.get(r["question"]), split)
            seen[r["question"]] = split
            final, work = _solve(r["question"])
            assert 3 <= len(work) <= 5 and 100 <= final <= 9999
            assert r["answer"] == " ".join(work) + f"\n#### {final}"
            assert r["prompt"] == f"Q: {r['question']}\nA:" and r["response"] == " " + r["answer"]
            assert set(r["prompt"] + r["response"]) <= set(ALPHABET)
            assert all(0 <= int(v) <= 9999 for v in re.findall(r"=(\d+)", r["answer"]))
    # all three operations occur, and final answers are spread (not guessable)
    ops = "".join(r["question"] for r in a["test"])
    assert all(ops.count(o) > 200 for o in "+-*")
    finals = [_solve(r["question"])[0] for r in a["test"]]
    assert max(finals.count(f) for f in set(finals)) <= 5


def test_verifier_accepts_gold_and_rejects_a_wrong_answer():
    verify = build_verifier("gsm8k")
    for r in make_splits(3, SMALL)["dev"]:
        final = int(r["answer"].rsplit("#### ", 1)[1])
        assert verify(r["response"], r["answer"]).correct
        assert verify(answers_only(r)["response"], r["answer"]).correct
        wrong = r["response"].rsplit("#### ", 1)[0] + f"#### {final + 1}"
        assert not verify(wrong, r["answer"]).correct
        assert not verify(r["response"].rsplit("\n", 1)[0], r["answer"]).correct  # no marker


def test_written_files_are_reproducible_and_readable(tmp_path):
    m1 = write_splits(tmp_path / "a", 0, SMALL)
    m2 = write_splits(tmp_path / "b", 0, SMALL)
    assert m1 == m2 and m1["sizes"] == SMALL
    for split in SPLITS:
        rows = read_chat(tmp_path / "a" / f"{split}.jsonl", "prompt", "response")
        assert len(rows) == SMALL[split] and rows[0][1].startswith(" ")
        short = read_chat(tmp_path / "a" / f"{split}_answers.jsonl", "prompt", "response")
        assert all(re.fullmatch(r" #### \d{3,4}", r) for _, r in short)
        first = json.loads((tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()[0])
        assert first["id"] == f"{split}-00000"
    from darkknowledge.hf.io import load_tokenizer

    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    p, r = rows[0]
    ids = tok(p + r, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == p + r


def test_shipped_recipes_validate_on_the_written_splits(reasoning_recipes):
    """recipes/reasoning/*.yaml read runs/reasoning/data (relative paths): copied into a
    tree of the same shape over small splits (the ``reasoning_recipes`` fixture), every
    one validates."""
    from darkknowledge.families import load_family_recipe

    dst = reasoning_recipes
    names = sorted(p.name for p in dst.glob("*.yaml"))
    assert {"student_gold.yaml", "student_answers.yaml", "teacher_gold.yaml",
            "generate.yaml"} <= set(names)  # fmt: skip
    for name in names:
        family, recipe, _ = load_family_recipe(dst / name)
        if family == "generate":  # the prompts and the fields it reads from them
            row = json.loads(recipe.prompts.path.read_text().splitlines()[0])
            assert {recipe.prompts.prompt_field, recipe.prompts.answer_field,
                    recipe.prompts.id_field} <= set(row)  # fmt: skip
            assert recipe.prompts.template.format(**row) == row["prompt"]
            continue
        assert family == "causal_lm" and recipe.data.train.exists(), name
        assert recipe.tokenizer.path.name == "tokenizer"
