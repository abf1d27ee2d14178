"""Recipe families: which schema validates a recipe and which runner runs it.

A recipe's optional top-level ``family:`` key picks the family; without it a recipe is a
``classify`` recipe (the core pipeline: :class:`darkknowledge.config.Recipe`). Each family
lives in its own package and registers here with two dotted names:

- ``schema``: a pydantic model class; it is validated with the recipe minus ``family``
  (context: ``base_dir`` for relative paths).
- ``run``: (every family but ``classify``, which the CLI runs itself) ``run(recipe, out: Path, *, resume: bool, force: bool, seeds: list[int] | None)
  -> str``, which returns the text ``dk run`` prints.

A family whose package is not installed (an optional extra) gets a one-line error naming
the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import DKError


@dataclass(frozen=True)
class Family:
    schema: str
    run: str
    extra: str | None = None  # pip extra that provides its dependencies
    help: str = ""
    # ``dk eval RUN_DIR``: ``eval(recipe, run_dir: Path) -> dict`` (causal_lm: dk eval's
    # sampling evaluation, which needs --data)
    eval: str | None = None


FAMILIES: dict[str, Family] = {
    "classify": Family(
        "darkknowledge.config:Recipe",
        "darkknowledge.pipeline:run_recipe",
        eval="darkknowledge.pipeline:eval_run",
        help="image/tabular classification (the core pipeline)",
    ),
    # DistilBERT-style transformer compression and text classification (issue 5)
    "text": Family(
        "darkknowledge.hf.text_recipe:TextRecipe",
        "darkknowledge.hf.text_pipeline:run_text_recipe",
        extra="hf",
        eval="darkknowledge.hf.text_pipeline:eval_text_run",
        help="transformer encoders: layer-copy students, triple loss, text classification",
    ),
    # causal language models: token-level KD, GKD, sequence-level KD (issue 6)
    # black-box distillation data: sample an OpenAI-compatible endpoint, verify, keep (issue 7)
    "generate": Family(
        "darkknowledge.blackbox.recipe:GenerateRecipe",
        "darkknowledge.blackbox.generate:run_generate_family",
        help="sample a teacher endpoint, verify the answers, write an SFT dataset",
    ),
    "causal_lm": Family(
        "darkknowledge.lm.recipe:LMRecipe",
        "darkknowledge.lm.pipeline:run_lm_recipe",
        extra="hf",
        help="causal language models: token-level KD, on-policy (GKD), sequence-level KD",
    ),
}


def _resolve(dotted: str, family: str, extra: str | None) -> Any:
    mod, _, attr = dotted.partition(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod or mod.startswith(e.name + ".")):
            raise DKError(f"family {family!r} is not available in this build ({mod})") from None
        hint = f"; install it with: pip install 'darkknowledge[{extra}]'" if extra else ""
        raise DKError(f"family {family!r} needs the package {e.name!r}{hint}") from None
    return getattr(module, attr)


def family_of(data: dict, source: str = "recipe") -> str:
    name = data.get("family", "classify")
    if not isinstance(name, str) or name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise DKError(f"{source}: family: unknown family {name!r}; known: {known}")
    return name


def validate_family(
    data: dict, base_dir: str | Path | None = None, source: str = "recipe", resolve_path=None
):
    """Validate a recipe dict of any family. Returns (family name, recipe object).
    ``resolve_path``: maps (or refuses) every path of the recipe (the job service)."""
    from .recipe_io import format_validation_error, validate_recipe

    name = family_of(data, source)
    body = {k: v for k, v in data.items() if k != "family"}
    if name == "classify":
        return name, validate_recipe(
            body, base_dir=base_dir, source=source, resolve_path=resolve_path
        )
    fam = FAMILIES[name]
    schema = _resolve(fam.schema, name, fam.extra)
    try:
        ctx = {"base_dir": base_dir, "resolve_path": resolve_path}
        return name, schema.model_validate(body, context=ctx)
    except ValidationError as e:
        raise DKError(format_validation_error(e, body, source)) from None


def load_family_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read a recipe file of any family with overrides: (family name, recipe, raw dict)."""
    from .recipe_io import read_recipe

    path = Path(path)
    data = read_recipe(path, overrides)
    name, recipe = validate_family(data, base_dir=path.resolve().parent, source=str(path))
    return name, recipe, data


def runner(name: str):
    fam = FAMILIES[name]
    return _resolve(fam.run, name, fam.extra)


def evaluator(name: str):
    """The family's ``dk eval RUN_DIR`` function, or None (causal_lm: by sampling)."""
    fam = FAMILIES[name]
    return _resolve(fam.eval, name, fam.extra) if fam.eval else None
