"""``dk``: the command line. Every command calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DKError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dk", description="darkknowledge: knowledge distillation")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe: train the teacher(s) if needed, distil, report")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.seed=2")
    r.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run")
    r.add_argument("--force", action="store_true", help="delete an existing run directory first")

    v = sub.add_parser("validate", help="check a recipe and print it resolved")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--quiet", "-q", action="store_true", help="print only OK or the error")

    d = sub.add_parser("demo", help="teacher ensemble → plain vs distilled students on digits")
    d.add_argument("--out", default="runs/demo", help="where the demo writes its report")
    d.add_argument("--seeds", type=int, default=3)

    rep = sub.add_parser("report", help="print a finished run's report (and re-draw its plots)")
    rep.add_argument("run_dir")

    from .service.cli import add_serve_parser  # argparse only: no service imports yet

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except DKError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            "error: out of memory; lower train.batch_size or use a smaller model", file=sys.stderr
        )
        return 1
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.cmd == "validate":
        from .recipe_io import dump_recipe, load_recipe

        recipe, _ = load_recipe(args.recipe, args.overrides)
        print("OK" if args.quiet else dump_recipe(recipe), end="\n" if args.quiet else "")
        return 0
    if args.cmd == "run":
        from .pipeline import run_recipe
        from .recipe_io import load_recipe
        from .report import table

        recipe, _ = load_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
        res = run_recipe(recipe, out, resume=args.resume, force=args.force)
        print(table(res.report))
        print(f"\nreport: {out / 'report.md'}")
        return 0
    if args.cmd == "report":
        from .report import load_report, table, write_report

        report = load_report(args.run_dir)
        write_report(report, args.run_dir)
        print(table(report))
        print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
        return 0
    if args.cmd == "demo":
        from .demo import run_demo

        if args.seeds < 2:
            raise DKError("--seeds: need at least 2 seeds to report a standard deviation")
        print(run_demo(Path(args.out), args.seeds))
        return 0
    if args.cmd == "serve":
        from .service.cli import serve_main

        return serve_main(args)
    raise AssertionError(args.cmd)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
