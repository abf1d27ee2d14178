"""Markdown rows for a Hinton (2015) results page from ``dk run --seeds`` summaries.

Each SUMMARY is a run folder's summary.json (rows plain / student / teacher / student+shift,
mean ± sd over seeds); ``--teacher`` adds a teacher row from bench/hinton_teacher_eval.py's
JSON (a store-trained run has none of its own). Prints test errors and accuracy per seed,
mean ± sd, the distillation gain in pooled sd and the gap closed,
(plain − distilled) / (plain − teacher).

    .venv/bin/python bench/hinton_rows.py runs/x/summary.json [--teacher t.json] [--label 2×800]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summary", nargs="+")
    p.add_argument("--teacher", help="JSON from bench/hinton_teacher_eval.py")
    p.add_argument("--label", nargs="*", help="one label per summary")
    a = p.parse_args(argv)
    teacher_err = None
    print("| row | test errors per seed | errors mean ± sd | accuracy % mean ± sd |")
    print("|---|---|---|---|")
    if a.teacher:
        t = json.loads(Path(a.teacher).read_text())["teacher"]
        teacher_err = t["errors"]
        print(f"| teacher | {t['errors']} | {t['errors']} | {100 * t['accuracy']:.2f} |")
    for i, f in enumerate(a.summary):
        s = json.loads(Path(f).read_text())
        lab = a.label[i] if a.label else Path(f).parent.name
        rows = s["rows"]
        if "teacher" in rows and teacher_err is None:
            teacher_err = rows["teacher"]["errors_mean"]
        for name, r in rows.items():
            errs = ", ".join(str(e) for e in r["errors"])
            print(
                f"| {lab} {name} | {errs} | {r['errors_mean']:.1f} ± {r['errors_sd']:.1f} | "
                f"{r['acc_mean']:.2f} ± {r['acc_sd']:.2f} |"
            )
        if "plain" in rows and "student" in rows:
            pe, de = rows["plain"]["errors_mean"], rows["student"]["errors_mean"]
            gap = (
                "" if teacher_err is None else f", gap closed {(pe - de) / (pe - teacher_err):.0%}"
            )
            print(
                f"\n{lab}: gain {s['gain_points']:+.2f} points = "
                f"{s['gain_over_pooled_sd']:.1f} pooled sd{gap}\n"
            )
        if "student+shift" in rows:
            by = rows["student+shift"].get("errors_by_class_mean")
            print(
                f"\n{lab}: errors by class mean, student: {rows['student'].get('errors_by_class_mean')}"
            )
            print(f"{lab}: errors by class mean, student+shift: {by}\n")


if __name__ == "__main__":
    main()
