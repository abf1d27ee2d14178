"""``dk generate`` and ``dk serve-teacher`` (argparse only here; work is imported late)."""

from __future__ import annotations

import logging
from pathlib import Path

COMMANDS = ("generate", "serve-teacher")


def add_blackbox_parsers(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="sample a teacher endpoint, verify, keep the right answers: an SFT dataset",
        description="Resumable: rerun the same command after a crash or a stop; answered "
        "requests come from the cache. The API key comes from teacher.api_key_env "
        "(default DK_TEACHER_API_KEY) or OPENAI_API_KEY, never from a file.",
    )
    g.add_argument("recipe")
    g.add_argument("overrides", nargs="*", help="key.sub=value")
    g.add_argument("--out", help="output folder (default runs/generate/<recipe name>)")
    g.add_argument("--force", action="store_true", help="start over (the cache is kept)")

    s = sub.add_parser(
        "serve-teacher",
        help="serve a local causal LM as an OpenAI-compatible endpoint (/v1/...)",
    )
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001)
    s.add_argument("--model-name", help="the id in /v1/models (default: the folder name)")
    s.add_argument("--max-top-logprobs", type=int, default=20, help="cap on top_logprobs")
    s.add_argument("--max-batch", type=int, default=64, help="sequences generated at once")


def blackbox_main(args) -> int:
    if args.cmd == "generate":
        from .generate import run_generate
        from .recipe import load_generate_recipe

        rec, base = load_generate_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / "generate" / Path(args.recipe).stem
        log = logging.getLogger("darkknowledge.blackbox.client").debug  # dk -v: retries
        print(run_generate(rec, out, base_dir=base, force=args.force, log=log))
        return 0
    if args.cmd == "serve-teacher":
        from .serve import serve_teacher

        return serve_teacher(
            args.model_dir,
            host=args.host,
            port=args.port,
            model_name=args.model_name,
            max_top_logprobs=args.max_top_logprobs,
            max_batch=args.max_batch,
        )
    raise AssertionError(args.cmd)  # pragma: no cover
