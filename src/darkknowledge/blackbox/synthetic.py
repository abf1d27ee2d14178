"""Synthetic multi-step arithmetic word problems with chain-of-thought solutions, in
GSM8K's format (``question``, ``answer`` = worked steps + ``#### N``)."""

from __future__ import annotations

import random

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Liz", "Max"]
ITEMS = ["apples", "books", "coins", "eggs", "pens", "shells", "stamps", "cards"]
ADD = ["buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more"]
SUB = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]


def problem(rng: random.Random, steps: int) -> dict:
    """One problem with ``steps`` operations after the start (each +, − or ×2)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, 30)
    sents = [f"{name} has {x} {item}."]
    work = []
    for s in range(steps):
        op = rng.choice("+-*") if x <= 40 else rng.choice("+-")
        if op == "-" and x < 3:
            op = "+"
        pron = "she" if name in ("Ann", "Dee", "Fay", "Ivy", "Kim", "Liz") else "he"
        subj = f"Then {pron}" if s else pron.capitalize()
        if op == "+":
            n = rng.randint(2, 25)
            verb = rng.choice(ADD).format(n=n)
            y = x + n
            work.append(f"{x}+{n}={y}.")
        elif op == "-":
            n = rng.randint(1, x - 1)
            verb = rng.choice(SUB).format(n=n)
            y = x - n
            work.append(f"{x}-{n}={y}.")
        else:
            verb = "doubles them"
            y = 2 * x
            work.append(f"{x}*2={y}.")
        sents.append(f"{subj} {verb}.")
        x = y
    q = " ".join(sents) + f" How many {item} does {name} have?"
    return {"question": q, "answer": " ".join(work) + f"\n#### {x}"}


def problems(n: int, seed: int, steps: tuple[int, int] = (2, 3)) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng, rng.randint(*steps)) for _ in range(n)]


def prompt_of(question: str) -> str:
    """The text a model sees before its solution (the completions API's prompt)."""
    return f"Q: {question}\nA:"
