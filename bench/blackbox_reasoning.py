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
    a = p.parse_args()
    over = {} if a.student_steps is None else {"student_steps": a.student_steps}
    s = run_experiment(Path(a.out), seeds=a.seeds, **over)
    print(json.dumps(s["comparison"], indent=1))


if __name__ == "__main__":
    main()
