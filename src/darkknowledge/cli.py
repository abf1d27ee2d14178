"""``dk``: the command line. Every command calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import DKError


class _NoDefault(tuple):
    def __contains__(self, v):  # by identity: 0 is a default, False is not
        return any(v is x for x in self)


_NO_DEFAULT = _NoDefault((None, False, argparse.SUPPRESS))


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default in _NO_DEFAULT or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    """-q/-v on ``dk`` and on every subcommand (``dk -q run r.yaml``, ``dk run r.yaml
    -q``); a subcommand's copy leaves the value alone unless given (SUPPRESS)."""
    kw = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only errors and the command's result", **kw)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug lines too, and the progress bars and info logs of "
                   "transformers and datasets", **kw)  # fmt: skip


def _subparsers(p: argparse.ArgumentParser):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in dict.fromkeys(a.choices.values()):  # aliases: once
                yield sp
                yield from _subparsers(sp)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dk", description="darkknowledge: knowledge distillation")
    p.add_argument("--version", action="version", version=f"darkknowledge {__version__}")
    _verbosity(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe: train the teacher(s) if needed, distil, report")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.seed=2")
    r.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run")
    r.add_argument("--force", action="store_true", help="delete an existing run directory first")
    r.add_argument(
        "--seeds",
        metavar="N|S,S,...",
        help="run student seeds 0..N-1 into OUT/seed_<s> (teacher trained once) and "
        "print mean ± sd; a comma list (e.g. 1,2 or 2,) runs exactly those seeds, so that "
        "one study can be spread over processes and summed up with --resume",
    )

    v = sub.add_parser("validate", help="check a recipe and print it resolved")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")

    d = sub.add_parser("demo", help="teacher ensemble → plain vs distilled students on digits")
    d.add_argument("--out", default="runs/demo", help="where the demo writes its report")
    d.add_argument("--seeds", type=int, default=3)

    lb = sub.add_parser("label", help="run a recipe's teacher once and store its signals")
    lb.add_argument("recipe")
    lb.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. label.k=16")
    lb.add_argument("--out", help="store folder (default: stores/<recipe name>)")
    lb.add_argument(
        "--force",
        action="store_true",
        help="relabel over an existing store (its teacher retrained if the recipe changed)",
    )

    ev = sub.add_parser(
        "eval", help="a language-model student: pass@1, maj@k, greedy accuracy, held-out loss"
    )
    ev.add_argument("path", metavar="RUN_DIR|MODEL_DIR")
    ev.add_argument(
        "--data",
        help="JSONL rows with a prompt and an answer (language models; a classify or text "
        "run is scored on its recipe's test split)",
    )
    ev.add_argument("--verifier", default="gsm8k", help="gsm8k, exact or regex (default gsm8k)")
    ev.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    ev.add_argument("--temperature", type=float, default=0.6, help="(default 0.6)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    ev.add_argument("--prompt-key", default="question", help="(default question)")
    ev.add_argument("--answer-key", default="answer", help="(default answer)")
    ev.add_argument("--template", default="{prompt}", help="plain {prompt} substitution")
    ev.add_argument("--limit", type=int, help="the first N rows only")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--out", metavar="JSON", help="write the result here (default: RUN_DIR|MODEL_DIR/eval.json)"
    )

    st = sub.add_parser("store", help="inspect a signal store")
    st_sub = st.add_subparsers(dest="store_cmd", required=True, metavar="SUBCOMMAND")
    si = st_sub.add_parser("info", help="manifest, examples, bytes, bytes per example/token")
    si.add_argument("path")
    si.add_argument("--json", action="store_true", help="print the facts as JSON")
    si.add_argument(
        "--verify",
        action="store_true",
        help="also check every shard's SHA-256 against the manifest (reads the whole store)",
    )
    sc = st_sub.add_parser(
        "check",
        help="a signal doctor: refuse or warn before training (exit 2 on any refusal)",
    )
    sc.add_argument("path", metavar="STORE")
    sc.add_argument(
        "--against",
        metavar="RECIPE",
        help="also check the store against a classify or causal_lm recipe: vocabulary, "
        "tokenizer, alignment, temperature, KD weight",
    )
    sc.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    sa = st_sub.add_parser(
        "from-api",
        help="turn the top_logprobs that dk generate captured into a top-k + tail store",
    )
    sa.add_argument("results", help="results.jsonl of a dk generate run (with top_logprobs)")
    sa.add_argument("--tokenizer", required=True, help="the tokenizer teacher and student share")
    sa.add_argument("--out", required=True, help="store folder")
    sa.add_argument("--samples", choices=["all", "correct"], default="all")
    sa.add_argument("--dtype", choices=["q8", "fp16", "fp32"], default="q8",
                    help="how the log-probs are kept (default: %(default)s)")  # fmt: skip
    sa.add_argument("--force", action="store_true", help="rewrite an existing store")

    ex = sub.add_parser(
        "export",
        help="an image (classify) student as torch.export (.pt2) or ONNX, with its input "
        "shape, preprocessing and class names in a JSON beside it",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a classify run (or its student/ folder)")
    ex.add_argument("--format", choices=["torch.export", "onnx"], default="torch.export")
    ex.add_argument("--out", help="folder for the files (default: RUN_DIR/export)")
    ex.add_argument("--class-names", metavar="A,B,...", help="class names in id order")

    rep = sub.add_parser("report", help="print a finished run's report (and re-draw its plots)")
    rep.add_argument("run_dir")

    from .service.cli import add_serve_parser  # argparse only: no service imports yet

    add_serve_parser(sub)
    from .blackbox.cli import add_blackbox_parsers

    add_blackbox_parsers(sub)
    for sp in [p, *_subparsers(p)]:
        if sp is not p:
            _verbosity(sp, top=False)
        sp.formatter_class = _HelpFormatter
        for a in sp._actions:  # an option with a default but no help still shows it
            if a.option_strings and not a.help and a.default not in _NO_DEFAULT:
                a.help = "(default: %(default)s)"
    return p


def _seed_list(text: str) -> list[int]:
    """``--seeds``: ``N`` is seeds 0..N-1; a comma list (``1,2``, ``2,``) is exactly those."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items or not all(p.isdecimal() for p in items):
        raise DKError(
            f"--seeds {text}: give a number of seeds ≥ 1, or a comma list of seeds ≥ 0 such as 1,2"
        )
    nums = [int(p) for p in items]
    if "," not in text:
        if nums[0] < 1:
            raise DKError(f"--seeds {text}: give a number of seeds ≥ 1")
        return list(range(nums[0]))
    if len(set(nums)) != len(nums):
        raise DKError(f"--seeds {text}: a seed is listed twice")
    return nums


def _eval_run_dir(run: Path, out: str | None = None) -> bool:
    """``dk eval`` of a classify or text run folder (False: not one of those)."""
    import json

    from .blackbox.evaluate import eval_target
    from .families import evaluator, validate_family
    from .recipe_io import read_yaml
    from .report import run_family
    from .store.format import atomic_write_bytes

    if not (run / "run.json").exists():
        return False
    fam = run_family(run)
    fn = evaluator(fam)
    if fn is None:
        return False
    data = read_yaml(run / "config.yaml")  # the resolved recipe the run was written from
    if fam != "classify":
        data = {"family": fam, **{k: v for k, v in data.items() if k != "family"}}
    _, recipe = validate_family(data, base_dir=run, source=str(run / "config.yaml"))
    target = eval_target(run, out)
    res = fn(recipe, run)
    atomic_write_bytes(target, json.dumps(res, indent=2).encode())
    keys = [k for k in next(iter(res["models"].values())) if k != "model"]
    print(f"{'model':<24}" + "".join(f"{k:>14}" for k in keys))
    for name, r in res["models"].items():
        print(
            f"{name:<24}"
            + "".join(f"{r[k]:>14.4f}" if isinstance(r[k], float) else f"{r[k]:>14}" for k in keys)
        )
    print(f"\neval: {target}")
    return True


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    from . import dist

    if dist.left_group():
        # A process that left a torch.distributed group exits here, without the
        # interpreter's teardown: on CPU/gloo the group's C++ threads occasionally
        # abort the process there ("terminate called without an active exception",
        # exit -6) after all work is done, which the launcher reports as a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (dk run r.yaml --out x train.seed=2).
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = ("run", "validate", "label", "generate")
        check = args.cmd == "store" and args.store_cmd == "check"
        if (args.cmd not in takes and not check) or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.quiet and args.verbose:
        parser.error("give -q or -v, not both")
    from . import console

    try:
        console.configure(
            console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL
        )
    except DKError as e:
        return _failure(e)
    return _run_command(args)


def _run_command(args) -> int:
    from .engine import rundir
    from .store import folder

    try:
        rc = _dispatch(args)
        rundir.commit_replaced()  # a run replaced with --force: the new one finished
        folder.commit_replaced()  # the same for a store
        return rc
    except BaseException:
        # the new run failed before its first checkpoint (a store: its first shard): the
        # run or store it replaced comes back
        rundir.restore_replaced()
        folder.restore_replaced()
        return _failure(sys.exc_info()[1])


def _failure(e: BaseException) -> int:
    if isinstance(e, DKError):
        from .dist import EchoedError

        if not isinstance(e, EchoedError):  # process 0 already printed it
            print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    if isinstance(e, MemoryError):
        print(
            "error: out of memory; lower train.batch_size or use a smaller model", file=sys.stderr
        )
        return 1
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    raise e


def _family(recipe_path: str) -> str:
    from .families import family_of
    from .recipe_io import read_recipe

    return family_of(read_recipe(recipe_path), recipe_path)


def _dispatch(args) -> int:
    from . import dist

    if args.cmd in ("run", "label") and dist.launched():
        # under accelerate launch / torchrun: one process of several; process 0 prints
        try:
            if dist.is_main():
                rc = _dispatch_one(args)
            else:
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    rc = _dispatch_one(args)
            dist.barrier()  # leave together: no process tears the group down under another
            return rc
        finally:
            dist.shutdown()
    return _dispatch_one(args)


def _refuse(message: str):
    raise DKError(message)


def _dispatch_one(args) -> int:
    if args.cmd == "validate":
        import yaml

        from .families import load_family_recipe

        name, recipe, _ = load_family_recipe(args.recipe, args.overrides)
        if args.quiet:
            print("OK")
        else:
            dumped = recipe.model_dump(mode="json")
            if name != "classify":
                dumped = {"family": name, **dumped}
            print(yaml.safe_dump(dumped, sort_keys=False), end="")
        return 0
    if args.cmd == "run" and _family(args.recipe) != "classify":
        from . import dist
        from .families import load_family_recipe, runner

        fam = _family(args.recipe)
        if fam not in ("causal_lm", "text") and dist.launched() and dist.state().world > 1:
            dist.on_main(
                _refuse,
                f"family {fam!r} runs in one process; launch it without "
                "accelerate launch / torchrun",
            )

        name, recipe, _ = load_family_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
        seeds = _seed_list(args.seeds) if args.seeds is not None else None
        print(runner(name)(recipe, out, resume=args.resume, force=args.force, seeds=seeds))
        return 0
    if args.cmd == "run":
        from .pipeline import run_recipe
        from .recipe_io import load_recipe
        from .report import table

        recipe, _ = load_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
        if args.seeds is not None:
            from .pipeline import run_seeds
            from .report import seeds_table

            summary = run_seeds(
                args.recipe,
                args.overrides,
                _seed_list(args.seeds),
                out,
                resume=args.resume,
                force=args.force,
            )
            print(seeds_table(summary))
            print(f"\nsummary: {out / 'summary.json'}")
            return 0
        res = run_recipe(recipe, out, resume=args.resume, force=args.force)
        print(table(res.report))
        print(f"\nreport: {out / 'report.md'}")
        return 0
    if args.cmd == "label":
        from .families import load_family_recipe
        from .store.info import format_info

        fam, recipe, _ = load_family_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("stores") / Path(args.recipe).stem
        if fam == "causal_lm":
            from .lm.pipeline import label_lm_recipe

            store = label_lm_recipe(recipe, out, force=args.force)
        elif fam == "classify":
            from .pipeline import label_recipe

            store = label_recipe(recipe, out, force=args.force)
        elif fam == "text":
            from .hf.text_pipeline import label_text_recipe

            store = label_text_recipe(recipe, out, force=args.force)
        else:
            raise DKError(
                f"dk label takes classify and causal_lm recipes; a {fam} recipe "
                + (
                    "labels its store inside dk run (OUT/signals)"
                    if fam == "text"
                    else "has no teacher to label with"
                )
            )
        print(format_info(store.info()))
        return 0
    if args.cmd == "store":
        import json

        from .store import open_store
        from .store.info import format_info

        if args.store_cmd == "from-api":
            from .blackbox.logprob_store import logprobs_to_store
            from .hf.io import load_tokenizer

            store = logprobs_to_store(
                args.results,
                args.out,
                load_tokenizer(args.tokenizer),
                samples=args.samples,
                dtype=args.dtype,
                force=args.force,
            )
            print(format_info(store.info()))
            return 0
        if args.store_cmd == "check":
            from .doctor import check

            if args.overrides and args.against is None:
                raise DKError("dk store check: key=value overrides need --against RECIPE")
            findings = check(args.path, args.against, args.overrides)
            for f in findings:
                print(f)
            refused = sum(f.level == "refuse" for f in findings)
            warned = len(findings) - refused
            if refused:
                print(f"{args.path}: {refused} refusal(s), {warned} warning(s): fix the store "
                      "or the recipe before training", file=sys.stderr)  # fmt: skip
                return 2
            print(f"ok: {args.path}" + (f" ({warned} warning(s))" if warned else ""))
            return 0
        store = open_store(args.path, preload_bytes=0, verify=False)  # headers only
        info = store.info()
        if args.verify:
            info["verified_files"] = store.verify_all()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    if args.cmd == "export":
        from .export import export_student

        names = None
        if args.class_names is not None:
            names = [n.strip() for n in args.class_names.split(",")]
        path = export_student(args.run_dir, args.format, args.out, names)
        print(f"{path}\n{path.with_name(path.name + '.json')}")
        return 0
    if args.cmd == "report":
        from .report import load_report, run_family, table, write_report

        report = load_report(args.run_dir)
        fam = run_family(args.run_dir)
        if fam == "causal_lm":
            from .lm.pipeline import format_report
            from .lm.pipeline import write_report as write_lm_report

            print(format_report(report, Path(args.run_dir)))
            print(f"\nreport: {write_lm_report(report, Path(args.run_dir))}")
            return 0
        if fam == "text":
            from .hf.text_pipeline import write_report as write_text_report

            print(write_text_report(report, Path(args.run_dir)))
            print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
            return 0
        write_report(report, args.run_dir)
        print(table(report))
        print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
        return 0
    if args.cmd == "eval":
        from .blackbox.evaluate import eval_models, eval_target, format_eval

        if _eval_run_dir(Path(args.path), args.out):
            return 0
        if args.data is None:
            raise DKError(
                "dk eval: --data JSONL (prompts and answers) is needed for a language model"
            )

        res = eval_models(
            Path(args.path), Path(args.data), verifier=args.verifier, k=args.k,
            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            prompt_key=args.prompt_key, answer_key=args.answer_key, template=args.template,
            limit=args.limit, seed=args.seed, out_file=args.out,
        )  # fmt: skip
        print(format_eval(res))
        print(f"\neval: {eval_target(args.path, args.out)}")
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
    if args.cmd in ("generate", "serve-teacher"):
        from .blackbox.cli import blackbox_main

        return blackbox_main(args)
    raise AssertionError(args.cmd)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
