"""The embedded black-box recipe (darkknowledge.blackbox.experiment) at full size:
teacher trained here, served by dk serve-teacher, distilled through dk generate into
students trained on verified / unverified / all / answer-only data, several seeds.
Resumable (rerun continues). Writes OUT/summary.json; --page writes the results page.

    OMP_NUM_THREADS=1 nice -n 5 python bench/blackbox_reasoning.py --out runs/blackbox_reasoning --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from darkknowledge.blackbox.experiment import run_experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/blackbox_reasoning")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--json", help="also copy summary.json here (e.g. docs/results/blackbox.json)")
    a = p.parse_args()
    over = {} if a.student_steps is None else {"student_steps": a.student_steps}
    s = run_experiment(Path(a.out), seeds=a.seeds, **over)
    print(json.dumps(s["comparison"], indent=1))
    print(table(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


def table(s: dict) -> str:
    """The results table (markdown): teacher and the four students, mean ± sd over seeds."""
    from darkknowledge.blackbox.experiment import VARIANTS

    c = s["comparison"]["per_variant"]
    t = s["teacher"]
    rows = [
        "| model | training rows | pass@1 | maj@k |",
        "|---|---|---|---|",
        f"| teacher ({s['teacher_params']:,} params) | {s['config']['n_train']} gold | "
        f"{t['pass@1']:.3f} | {t['maj@k']:.3f} |",
    ]
    for v, label in VARIANTS.items():
        (m1, s1), (mk, sk) = c[v]["pass@1"], c[v]["maj@k"]
        rows.append(
            f"| student {v[0]}: {label} | {c[v]['rows']} | {m1:.3f} ± {s1:.3f} | {mk:.3f} ± {sk:.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
