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
from .jsonl import too_deep

MAX_RECIPE_BYTES = 1 << 20  # a recipe file (or a recipe submitted to the service)
MAX_DEPTH = 64  # nesting levels of a recipe, aliases expanded
MAX_NODES = 100_000  # values a recipe holds once its aliases are expanded
MAX_OVERRIDE_CHARS = 65_536  # one key.sub=value override


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses what a recipe never needs and a hostile file uses:
    nesting deeper than :data:`MAX_DEPTH` (checked while composing, before Python's
    recursion limit), aliases that expand to more than :data:`MAX_NODES` values (an
    anchor bomb) or into themselves, and a key written twice in one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor names it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first at line {first.line + 1})",
                        key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _check_graph(root) -> None:
    """Depth and size of the composed document with every alias expanded (memoised, so
    an anchor bomb costs its distinct nodes, not its expansion)."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids = _children(node)
        if not done:
            if id(node) in open_:
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to the collection that holds it", node.start_mark
                )
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
            continue
        open_.discard(id(node))
        n = 1 + sum(size[id(k)][0] for k in kids)
        d = 1 + max((size[id(k)][1] for k in kids), default=0)
        if d > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels (aliases expanded)",
                node.start_mark,
            )  # fmt: skip
        if n > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand to more than {MAX_NODES} values", node.start_mark
            )
        size[id(node)] = (n, d)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def parse_yaml(text: str, source: str):
    """``text`` parsed as YAML under the bounds above, or one-line :class:`DKError`."""
    if len(text) > MAX_RECIPE_BYTES:
        raise DKError(f"{source}: larger than {MAX_RECIPE_BYTES >> 20} MB; a recipe is small")
    loader = None
    try:
        loader = _BoundedLoader(text)  # reading: refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        raise DKError(f"{source}: malformed YAML{where}: {_one_line(problem)}") from None
    except RecursionError:  # pragma: no cover - the depth bound comes first
        raise DKError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DKError(f"{path}: no such recipe file")
    if path.is_dir():
        raise DKError(f"{path}: is a folder, not a recipe file")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise DKError(f"{path}: larger than {MAX_RECIPE_BYTES >> 20} MB; a recipe is small")
        raw = path.read_bytes()[: MAX_RECIPE_BYTES + 1]
    except OSError as e:
        raise DKError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DKError(
            f"{path}: line {line}: not a text file (not UTF-8; expected a YAML recipe)"
        ) from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise DKError(f"{path}: the recipe is empty; it needs at least 'data:' and 'student:'")
    if not isinstance(data, dict):
        raise DKError(
            f"{path}: the top level must be a mapping of sections (data:, student:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


# ---------------------------------------------------------------- extends: base recipes

MAX_EXTENDS_DEPTH = 8  # a recipe extends a base that extends a base ... at most this deep
MAX_EXTENDS_FILES = 16  # files read for one recipe's extends, all bases together


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key (recursively); a list, a
    scalar or null replaces. Two mappings whose ``kind:`` differs do not merge: the
    recipe's replaces the base's (``tokenizer: {kind: path, ...}`` over ``{kind: char}``
    keeps none of the char tokenizer's keys). Keys keep the base's order, new keys after.
    Neither argument is changed."""
    import copy

    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    if "kind" in base and "kind" in over and base["kind"] != over["kind"]:
        return copy.deepcopy(over)
    out = {}
    for k in [*base, *(k for k in over if k not in base)]:
        if k not in over:
            out[k] = copy.deepcopy(base[k])
        else:
            out[k] = deep_merge(base[k], over[k]) if k in base else copy.deepcopy(over[k])
    return out


def _extends_list(value: Any, source: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise DKError(
            f"{source}: extends: give a base recipe file (a path relative to this recipe) "
            "or a list of them"
        )
    if len(items) > MAX_EXTENDS_FILES:
        raise DKError(f"{source}: extends: more than {MAX_EXTENDS_FILES} base recipes")
    return items


def resolve_extends(
    data: dict,
    base_dir: Path | None,
    source: str,
    resolve_path: Callable[[Path], Path] | None = None,
    path: Path | None = None,
) -> dict:
    """The recipe ``data`` (read from ``path``, None for a job's recipe) with its ``extends:`` bases merged under it (see
    :func:`deep_merge`); a list of bases applies in order, each later one on top.

    Each base is read with :func:`read_yaml`'s bounds and may extend others (its paths
    relative to its own folder). ``resolve_path`` (the job service) maps or refuses every
    base path first, as it does every other path of a job's recipe. Refused in one line
    naming the file: a missing or unreadable base, a cycle, a chain deeper than
    :data:`MAX_EXTENDS_DEPTH`, more than :data:`MAX_EXTENDS_FILES` files, and a base
    whose ``family:`` differs from the recipe's."""
    chain = (Path(path).resolve(),) if path is not None else ()
    return _extends(data, base_dir, source, resolve_path, chain, 0, [0])


def _extends(data, base_dir, source, resolve_path, chain: tuple[Path, ...], depth, count) -> dict:
    if "extends" not in data:
        return data
    own = {k: v for k, v in data.items() if k != "extends"}
    family, whose = own.get("family"), "this one is"
    merged: dict | None = None
    for item in _extends_list(data["extends"], source):
        path = _base_path(item, base_dir, source, resolve_path)
        if path in chain:
            loop = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
            raise DKError(f"{source}: extends {_short(item)}: a cycle ({loop})")
        if depth >= MAX_EXTENDS_DEPTH:
            raise DKError(
                f"{source}: extends {_short(item)}: bases nested deeper than {MAX_EXTENDS_DEPTH} levels"
            )
        count[0] += 1
        if count[0] > MAX_EXTENDS_FILES:
            raise DKError(
                f"{source}: extends {_short(item)}: more than {MAX_EXTENDS_FILES} base recipes in all"
            )
        base = read_yaml(path)
        base = _extends(
            base, path.parent, str(path), resolve_path, (*chain, path), depth + 1, count
        )
        fam = base.get("family")
        if fam is not None and family is not None and fam != family:
            raise DKError(
                f"{source}: extends {_short(item)}: the base is a {_one_line(repr(fam))} recipe, "
                f"{whose} {_one_line(repr(family))}; a base must be of the recipe's family"
            )
        if family is None and fam is not None:
            family, whose = fam, "an earlier base is"
        merged = base if merged is None else deep_merge(merged, base)
    out = deep_merge(merged, own)
    if too_deep(out, MAX_DEPTH):
        raise DKError(f"{source}: with its bases the recipe nests deeper than {MAX_DEPTH} levels")
    return out


def _base_path(item: str, base_dir, source: str, resolve_path) -> Path:
    p = Path(item)
    if resolve_path is not None:
        # the service: a base of a base may be relative to that base's folder (already
        # confined); the job's own recipe has no folder, so the service's rules apply
        if base_dir is not None and not p.is_absolute() and ":" not in item:
            p = Path(base_dir) / p
        try:
            return Path(resolve_path(p)).resolve()
        except (ValueError, OSError, RuntimeError) as e:
            raise DKError(f"{source}: extends: {_one_line(str(e))}") from None
    try:
        p = p.expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        p = p.resolve()
        found = p.exists()
    except (OSError, ValueError, RuntimeError) as e:  # NUL, a name too long, a link loop
        raise DKError(f"{source}: extends {_short(item)}: not a usable path ({e})") from None
    if not found:
        raise DKError(f"{source}: extends {_short(item)}: no such recipe file ({p})")
    return p


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A recipe file as a dict: its ``extends:`` bases merged under it, then the
    ``key=value`` overrides on top."""
    path = Path(path)
    data = resolve_extends(read_yaml(path), path.resolve().parent, str(path), path=path)
    data = apply_overrides(data, overrides or [])
    if "extends" in data:
        raise DKError(
            f"{path}: extends: only a recipe file extends a base; an override cannot set it"
        )
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict copy.
    A numeric part indexes a list (``teacher.members.0.seed=3``)."""
    import copy

    data = copy.deepcopy(data)
    for ov in overrides:
        if len(ov) > MAX_OVERRIDE_CHARS:
            raise DKError(f"override {ov[:40]!r}...: longer than {MAX_OVERRIDE_CHARS} characters")
        if "=" not in ov:
            raise DKError(f"override {ov!r}: expected key.sub=value (e.g. train.epochs=5)")
        key, _, raw = ov.partition("=")
        parts = key.strip().split(".")
        if not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in parts):
            raise DKError(
                f"override {ov!r}: bad key {key!r}; use dotted names like loss.hinton_kd.alpha"
            )
        if len(parts) > MAX_DEPTH:
            raise DKError(f"override {_short(ov)}: a key deeper than {MAX_DEPTH} levels")
        if not raw.strip():
            value = None
        else:
            value = parse_yaml(raw, f"override {_short(ov)}: the value")
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
        if too_deep(data, MAX_DEPTH):
            raise DKError(f"override {_short(ov)}: the recipe nests deeper than {MAX_DEPTH} levels")
    return data


def _short(text: str, n: int = 60) -> str:
    return repr(text) if len(text) <= n else repr(text[:n]) + "..."


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
    data = read_recipe(path, overrides)
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
