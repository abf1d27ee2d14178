"""Chained arithmetic with worked solutions: a reasoning task whose answers cannot be
guessed and whose solutions a small character-level model can learn.

A problem is a start number and 3–5 operations applied left to right (``+``/``−`` a
2-digit number, ``×`` one digit); the worked solution writes every intermediate result,
the last line is GSM8K's answer marker, so ``dk generate`` and ``dk eval`` judge it with
the ``gsm8k`` verifier (exact match of the final number)::

    Q: 412 +37 -85 *3 +64
    A: 412+37=449 449-85=364 364*3=1092 1092+64=1156
    #### 1156

Every final answer has 3 or 4 digits, so a model that only guesses is right about once
in a thousand tries. :func:`write_splits` writes the splits one experiment uses, from one
seed: ``teacher_train`` (the teacher's gold solutions), ``distill`` (the prompts the
teacher answers for the students), ``dev`` (model selection) and ``test`` (held out from
every stage); no question is in two splits. Each row has the chat fields a ``causal_lm``
recipe reads (``prompt``/``response``), the fields ``dk generate`` and ``dk eval`` read
(``question``/``answer``, ``id``), and each split also comes as final answers only
(``SPLIT_answers.jsonl``: the response is ``#### N``, no working).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..errors import DKError
from ..store.format import atomic_write_bytes

SPLITS = ("teacher_train", "distill", "dev", "test")
SIZES = {"teacher_train": 20000, "distill": 8000, "dev": 500, "test": 1000}
# every character a prompt or solution can hold (the tokenizer's alphabet)
ALPHABET = "0123456789+-*=# \nQA:"
MAX_VALUE = 9999  # intermediate results stay within 4 digits
MIN_FINAL = 100  # final answers have 3 or 4 digits


def prompt_of(question: str) -> str:
    """The text a model sees before its solution (``dk generate``'s template)."""
    return f"Q: {question}\nA:"


def chain_problem(rng: random.Random, steps: int) -> dict:
    """One problem of ``steps`` operations: ``{"question", "answer", "final"}``."""
    x = rng.randint(10, 999)
    ops, work = [str(x)], []
    for _ in range(steps):
        allowed = []
        if x + 10 <= MAX_VALUE:
            allowed.append("+")
        if x - 10 >= 10:
            allowed.append("-")
        if 2 * x <= MAX_VALUE:
            allowed.append("*")
        op = rng.choice(allowed)
        if op == "+":
            n = rng.randint(10, min(99, MAX_VALUE - x))
            y = x + n
        elif op == "-":
            n = rng.randint(10, min(99, x - 10))
            y = x - n
        else:
            n = rng.randint(2, min(9, MAX_VALUE // x))
            y = x * n
        ops.append(f"{op}{n}")
        work.append(f"{x}{op}{n}={y}")
        x = y
    return {"question": " ".join(ops), "answer": " ".join(work) + f"\n#### {x}", "final": x}


def make_splits(seed: int = 0, sizes: dict[str, int] | None = None, steps=(3, 5)) -> dict:
    """The splits as lists of rows, drawn from one seeded stream (the same seed and sizes
    give the same rows); questions are unique over all splits, final answers ≥ 100."""
    sizes = {**SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise DKError(f"unknown split(s) {sorted(unknown)}; the splits are {', '.join(SPLITS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows: list[dict] = []
        while len(rows) < sizes[split]:
            p = chain_problem(rng, rng.randint(*steps))
            if p["final"] < MIN_FINAL or p["question"] in seen:
                continue
            seen.add(p["question"])
            rows.append(row(f"{split}-{len(rows):05d}", p))
        out[split] = rows
    return out


def row(rid: str, p: dict) -> dict:
    """A problem as a data row: chat fields (prompt/response, the response starting with
    the space after ``A:``) and dk generate / dk eval fields (question/answer)."""
    return {"id": rid, "question": p["question"], "answer": p["answer"],
            "prompt": prompt_of(p["question"]), "response": " " + p["answer"]}  # fmt: skip


def answers_only(r: dict) -> dict:
    """The same row with the final answer only (no working)."""
    final = r["answer"].rsplit("#### ", 1)[1]
    return {**r, "answer": f"#### {final}", "response": f" #### {final}"}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_splits(out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict:
    """Write ``SPLIT.jsonl`` and ``SPLIT_answers.jsonl`` for every split, the character
    tokenizer every model of the experiment shares (``tokenizer/``)
    and ``manifest.json`` (seed, sizes, each file's SHA-256). Rewriting with the same seed
    and sizes gives the same bytes."""
    from ..hf.io import char_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed, sizes)
    files = {}
    for split, rows in splits.items():
        files[f"{split}.jsonl"] = _write_jsonl(out / f"{split}.jsonl", rows)
        files[f"{split}_answers.jsonl"] = _write_jsonl(
            out / f"{split}_answers.jsonl", [answers_only(r) for r in rows]
        )
    char_tokenizer(ALPHABET).save_pretrained(str(out / "tokenizer"))
    manifest = {"task": "chained arithmetic, worked solutions", "seed": seed,
                "sizes": {k: len(v) for k, v in splits.items()}, "sha256": files}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m darkknowledge.blackbox.chains OUT [--seed S]``: write the splits."""
    import argparse

    p = argparse.ArgumentParser(description="write the chained-arithmetic splits")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    for s in SPLITS:
        p.add_argument(f"--{s.replace('_', '-')}", type=int, default=SIZES[s], dest=s)
    a = p.parse_args(argv)
    m = write_splits(a.out, a.seed, {s: getattr(a, s) for s in SPLITS})
    print(json.dumps(m["sizes"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
