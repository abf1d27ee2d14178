"""Synthetic multi-step arithmetic word problems with chain-of-thought solutions, in
GSM8K's format (``question``, ``answer`` = worked steps + ``#### N``). Terse on purpose:
short sequences keep character-level models trainable on a CPU in minutes."""

from __future__ import annotations

import random

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Liz", "Max"]
ITEMS = ["apples", "books", "coins", "eggs", "pens", "shells", "stamps", "cards"]
ADD = ["buys", "finds", "gets", "wins"]
SUB = ["loses", "sells", "eats", "gives away"]


def problem(rng: random.Random, steps: int) -> dict:
    """One problem with ``steps`` operations after the start (each +, − or ×2), e.g.
    ``Ann has 7 eggs, buys 5, loses 3. How many?`` → ``7+5=12 12-3=9\\n#### 9``."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, 12)
    clauses, work = [f"{name} has {x} {item}"], []
    for _ in range(steps):
        op = rng.choice("++--*") if x <= 12 else rng.choice("+--")
        if op == "-" and x < 3:
            op = "+"
        if op == "+":
            n = rng.randint(1, 9)
            clauses.append(f"{rng.choice(ADD)} {n}")
            y = x + n
            work.append(f"{x}+{n}={y}")
        elif op == "-":
            n = rng.randint(1, x - 1)
            clauses.append(f"{rng.choice(SUB)} {n}")
            y = x - n
            work.append(f"{x}-{n}={y}")
        else:
            clauses.append("doubles them")
            y = 2 * x
            work.append(f"{x}*2={y}")
        x = y
    return {
        "question": ", ".join(clauses) + ". How many?",
        "answer": " ".join(work) + f"\n#### {x}",
    }


def problems(n: int, seed: int, steps: tuple[int, int] = (2, 3)) -> list[dict]:
    rng = random.Random(seed)
    return [problem(rng, rng.randint(*steps)) for _ in range(n)]


def prompt_of(question: str) -> str:
    """The text a model sees before its solution (the completions API's prompt)."""
    return f"Q: {question}\nA:"
