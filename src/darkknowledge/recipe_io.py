"""Reading recipes: YAML file + ``key.sub=value`` overrides → a validated :class:`Recipe`.
Every failure becomes a :class:`DKError` with one line naming the key or file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import Recipe
from .errors import DKError


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DKError(f"{path}: no such recipe file")
    if path.is_dir():
        raise DKError(f"{path}: is a folder, not a recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DKError(f"{path}: not a text file (expected a YAML recipe)") from None
    except OSError as e:
        raise DKError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DKError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        raise DKError(f"{path}: the recipe is empty; it needs at least 'data:' and 'student:'")
    if not isinstance(data, dict):
        raise DKError(
            f"{path}: the top level must be a mapping of sections (data:, student:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict copy.
    A numeric part indexes a list (``teacher.members.0.seed=3``)."""
    import copy

    data = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise DKError(f"override {ov!r}: expected key.sub=value (e.g. train.epochs=5)")
        key, _, raw = ov.partition("=")
        parts = key.strip().split(".")
        if not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in parts):
            raise DKError(
                f"override {ov!r}: bad key {key!r}; use dotted names like loss.hinton_kd.alpha"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise DKError(f"override {ov!r}: the value is not valid YAML") from None
        node: Any = data
        for i, p in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, p, here, ov)
            elif isinstance(node, dict):
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
            else:
                raise DKError(f"override {ov!r}: {'.'.join(parts[:i])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            idx = int(_list_index(node, last, key, ov))
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise DKError(f"override {ov!r}: {'.'.join(parts[:-1])} is a value, not a section")
    return data


def _list_index(node: list, p: str, here: str, ov: str) -> int:
    if not p.isdigit() or int(p) >= len(node):
        raise DKError(f"override {ov!r}: {here}: index {p} is not in 0..{len(node) - 1}")
    return int(p)


def _list_item(node: list, p: str, here: str, ov: str):
    return node[_list_index(node, p, here, ov)]


def format_validation_error(err: ValidationError, data: Any, source: str) -> str:
    """One line for the first problem (plus a count of the others)."""
    lines = [_one(e, data) for e in err.errors()]
    more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
    return f"{source}: {lines[0]}{more}"


def _one(e: dict, data: Any) -> str:
    loc: list[str] = []
    node = data
    for part in e["loc"]:
        # pydantic puts a discriminated union's tag into the location; the user never
        # wrote it, so skip it when the current node doesn't have it as a key.
        if (
            isinstance(node, dict)
            and isinstance(part, str)
            and part not in node
            and (node.get("name") == part or node.get("kind") == part)
        ):
            continue
        loc.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    where = ".".join(loc) or "(top level)"
    kind = e["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = e.get("input")
    if kind == "value_error":
        return f"{where}: {msg}"
    show = (
        ""
        if kind.startswith("union_tag") or isinstance(got, (dict, list)) or got is None
        else f" (got {got!r})"
    )
    return f"{where}: {msg}{show}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """Validate a recipe file with overrides. Returns (recipe, the raw merged dict)."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    family = data.get("family", "classify")
    if family != "classify":
        raise DKError(
            f"{path}: family {family!r}: this command takes classify recipes only "
            f"(dk run and dk validate take every family)"
        )
    data = {k: v for k, v in data.items() if k != "family"}
    return validate_recipe(data, base_dir=path.resolve().parent, source=str(path)), data


def validate_recipe(
    data: dict,
    base_dir: str | Path | None = None,
    source: str = "recipe",
    resolve_path: Callable[[Path], Path] | None = None,
) -> Recipe:
    """``resolve_path``, when given, replaces the usual resolution of every path in the
    recipe (the job service uses it to confine paths to its data roots)."""
    ctx = {"base_dir": base_dir, "resolve_path": resolve_path}
    try:
        return Recipe.model_validate(data, context=ctx)
    except ValidationError as e:
        raise DKError(format_validation_error(e, data, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (absolute paths, defaults filled in)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def first_difference(a, b, prefix: str = "") -> str:
    """The dotted key of the first difference between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "(top level)"
