"""Architecture: modules of darkknowledge import downward only, and units never cycle.

Every module under ``src/darkknowledge`` is parsed with :mod:`ast` (nothing is imported).
The walker sees every ``import`` / ``from ... import`` wherever it is written (module
level, inside functions, under ``try``), resolves relative imports against the module's
package, and counts ``importlib.import_module("darkknowledge....")`` calls whose
argument is a string literal. Other strings are not imports: the dotted
``"package.module:attr"`` names in :data:`darkknowledge.families.FAMILIES` (resolved
lazily by the CLI) are skipped.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = "darkknowledge"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

ROOT = "__init__"  # short name of the package root, darkknowledge/__init__.py

# Layer map, TOP to BOTTOM. Names are relative to ``darkknowledge``; ``"x.*"`` is the
# package ``x`` with all its submodules. Each entry is one *unit* (the granularity of
# the cycle check). A module may import from its own layer or any layer below it, and
# units must not import each other in a circle. Every module must be placed (an exact
# name beats ``x.*``, a longer ``x.*`` beats a shorter one); a new module fails
# ``test_every_module_is_placed`` until it is added here. Entries may name modules that
# do not exist yet (``engine.*``, ``__main__``).
LAYERS: dict[str, list[str]] = {
    # entry points: the CLI, the job service, the Python API and the package root that
    # re-exports it, the demo; ``families`` is the registry of recipe families the CLI
    # reads (it resolves the families' dotted names lazily, so it imports none of them)
    "interfaces": [ROOT, "__main__", "cli", "api", "demo", "doctor", "families", "service.*"],
    # one package per recipe family: classify (pipeline.py), text (hf/), causal_lm
    # (lm/), black-box generation and chat SFT (blackbox/). Families do not import
    # each other (see FAMILY_IMPORTS_ALLOWED).
    "families": ["pipeline", "train", "hf.*", "lm.*", "blackbox.*"],
    # the one training engine under the families: the loop, checkpoint, optimizer and
    # schedule, metrics and progress, run folders; evaluation, reports, export
    "engine": ["engine.*", "evaluate", "report", "export"],
    # transports behind the Teacher protocol (a module, an ensemble, a cache, a store)
    "teachers": ["teachers.*"],
    # the signal store written by ``dk label`` (labels with a Teacher, never imports
    # the teachers package: Batch and Teacher live in signals)
    "store": ["store.*"],
    # everything that imports nothing above it: Signals/Batch/Teacher, losses, data,
    # models, the model registry, the classify Recipe schema (config) that the other
    # schemas build on, recipe reading, distributed helpers, errors, JSONL
    "base": [
        "signals",
        "losses.*",
        "data.*",
        "models.*",
        "registry",
        "config",
        "recipe_io",
        "dist",
        "errors",
        "faults",
        "jsonl",
        "rows",  # data files of every format, bounded (text and chat data)
        "console",  # logging set-up and the progress display
    ],
}

# Layers whose units are siloed: an import between two different units of the layer
# fails unless FAMILY_IMPORTS_ALLOWED lists it.
SILOED_LAYERS = ("families",)

# (importer, imported) patterns, same syntax as LAYERS -> the reason it is allowed.
FAMILY_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("lm.*", "hf.io"): "hf.io is the one transformers loader every transformer route shares",
    ("blackbox.*", "hf.io"): "serve-teacher and the experiment load local LMs through hf.io",
    ("pipeline", "train"): "the classify family is two modules: its runner and its engine task",
    ("lm.pipeline", "blackbox.evaluate"): "a causal_lm recipe's eval.sampled is dk eval",
    ("lm.*", "blackbox.echo"): "a causal_lm recipe's teacher kind api is scored through echo",
}

# (importer module, imported module) that break the rules today. Removed by the engine
# refactor; that refactor empties this set. ``test_known_violations_still_exist`` fails
# once one is gone, so the set cannot go stale: delete the entry then.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # the engine refactor emptied it


@dataclass(frozen=True)
class Edge:
    importer: str  # short module names, e.g. "store.label"
    imported: str
    line: int
    kind: str  # "top" (module level), "function" (inside a def) or "importlib"


def _short(full: str, package: str) -> str:
    return ROOT if full == package else full[len(package) + 1 :]


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Full dotted name -> (file, is_package) for every .py file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (path, is_pkg)
    return out


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self) -> None:
        self.depth = 0  # > 0 inside a function body
        self.found: list[tuple[ast.AST, str]] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _kind(self) -> str:
        return "function" if self.depth else "top"

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._kind()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, self._kind()))

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.found.append((node, "importlib"))
        self.generic_visit(node)


def walk_imports(root: Path = SRC, package: str = PACKAGE) -> list[Edge]:
    """Every import of a module of ``package`` by a module of ``package`` (under
    ``root``), resolved to the module that is imported: ``from . import x`` and
    ``from .x import y`` both give ``x`` when ``x`` is a module, ``from . import y`` gives
    the package when ``y`` is a name defined in it. Imports of outside packages are
    dropped. A module's implicit import of its parent packages is not an edge."""
    modules = _modules(root, package)

    def deepest(name: str) -> str | None:  # the longest prefix of name that is a module
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    edges = []
    for full, (path, is_pkg) in modules.items():
        here = full if is_pkg else full.rpartition(".")[0]  # the module's package
        visitor = _ImportVisitor()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for node, kind in visitor.found:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    if node.level > 1:
                        base_parts = base_parts[: -(node.level - 1)]
                    base = ".".join(base_parts)
                    if node.module:
                        base = f"{base}.{node.module}"
                else:
                    base = node.module or ""
                # ``from base import name``: the submodule when it is one, else base
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:  # importlib.import_module("darkknowledge.x") / __import__
                targets = [node.args[0].value]  # type: ignore[attr-defined]
            for t in targets:
                if t != package and not t.startswith(package + "."):
                    continue
                target = deepest(t)
                if target is not None and target != full:
                    edges.append(
                        Edge(_short(full, package), _short(target, package), node.lineno, kind)
                    )
    return sorted(set(edges), key=lambda e: (e.importer, e.imported, e.line))


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        pkg = pattern[:-2]
        return module == pkg or module.startswith(pkg + ".")
    return module == pattern


def place(module: str, layers: dict[str, list[str]] = LAYERS) -> tuple[int, str, str] | None:
    """``(layer index from the top, layer name, unit)`` of a module, or None."""
    best = None
    for i, (layer, entries) in enumerate(layers.items()):
        for entry in entries:
            if _matches(module, entry):
                score = (not entry.endswith(".*"), len(entry))
                if best is None or score > best[0]:
                    best = (score, (i, layer, entry.removesuffix(".*")))
    return None if best is None else best[1]


def _where(e: Edge) -> str:
    return f"{e.importer}:{e.line}" + (f" [{e.kind}]" if e.kind != "top" else "")


def find_violations(
    edges: list[Edge],
    layers: dict[str, list[str]] = LAYERS,
    siloed: tuple[str, ...] = SILOED_LAYERS,
    allowed: dict[tuple[str, str], str] = FAMILY_IMPORTS_ALLOWED,
) -> dict[tuple[str, str], str]:
    """``(importer, imported) -> message`` for every import that goes up a layer, or
    across units of a siloed layer without an ``allowed`` entry."""
    out: dict[tuple[str, str], list[str]] = {}
    for e in edges:
        a, b = place(e.importer, layers), place(e.imported, layers)
        if a is None or b is None:
            continue  # unplaced: test_every_module_is_placed reports it
        if b[0] < a[0]:
            msg = f"{e.importer} -> {e.imported} (layer {a[1]} -> {b[1]})"
        elif (
            a[1] == b[1]
            and a[1] in siloed
            and a[2] != b[2]
            and not any(_matches(e.importer, i) and _matches(e.imported, j) for i, j in allowed)
        ):
            msg = f"{e.importer} -> {e.imported} ({a[1]}: {a[2]} -> {b[2]}, not allowed)"
        else:
            continue
        out.setdefault((e.importer, e.imported), [msg]).append(_where(e))
    return {k: f"{v[0]} at {', '.join(v[1:])}" for k, v in out.items()}


def find_cycles(edges: list[Edge], layers: dict[str, list[str]] = LAYERS) -> list[str]:
    """One cycle path per strongly connected group of units, e.g.
    ``store -> teachers -> store  (store.label:26 -> teachers; teachers.store:11 -> store)``."""
    graph: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for e in edges:
        a, b = place(e.importer, layers), place(e.imported, layers)
        if a is not None and b is not None and a[2] != b[2]:
            graph[a[2]][b[2]].append(e)

    # Tarjan's strongly connected components (iterative: no recursion limit)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

    cycles = []
    for group in sorted(groups):
        # shortest cycle through the group's first unit (breadth-first, inside the group)
        first, members = group[0], set(group)
        prev: dict[str, str] = {}
        frontier, path = [first], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in members:
                        continue
                    if w == first:
                        path = [first]
                        while v != first:
                            path.append(v)
                            v = prev[v]
                        path = [first, *reversed(path[1:]), first]
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path is not None:
                    break
            frontier = nxt
        assert path is not None
        witness = "; ".join(
            f"{_where(graph[u][w][0])} -> {graph[u][w][0].imported}" for u, w in pairwise(path)
        )
        cycles.append(f"{' -> '.join(path)}  ({witness})")
    return cycles


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return walk_imports()


def test_every_module_is_placed(edges):
    modules = {_short(m, PACKAGE) for m in _modules(SRC, PACKAGE)}
    unplaced = sorted(m for m in modules if place(m) is None)
    assert not unplaced, f"modules missing from LAYERS in {__file__}: {unplaced}"


def test_no_cycles_between_units(edges):
    cycles = find_cycles(edges)
    assert not cycles, "import cycles between units:\n" + "\n".join(cycles)


def test_imports_go_down_only(edges):
    found = find_violations(edges)
    new = sorted(msg for key, msg in found.items() if key not in KNOWN_VIOLATIONS)
    assert not new, "imports against the layer map:\n" + "\n".join(new)


def test_known_violations_still_exist(edges):
    """Each KNOWN_VIOLATIONS entry must still be a violation: once the engine refactor
    removes one, delete it from the set (so the set only ever shrinks)."""
    found = find_violations(edges)
    gone = sorted(v for v in KNOWN_VIOLATIONS if v not in found)
    assert not gone, f"no longer violations, remove them from KNOWN_VIOLATIONS: {gone}"


def test_family_allow_list_is_used(edges):
    """Prints the family -> family imports the allow-list lets through (run with -s),
    and fails on an entry that no import needs any more."""
    for (i, j), reason in FAMILY_IMPORTS_ALLOWED.items():
        used = sorted(
            {
                _where(e) + f" -> {e.imported}"
                for e in edges
                if _matches(e.importer, i) and _matches(e.imported, j)
            }
        )
        assert used, f"FAMILY_IMPORTS_ALLOWED[{(i, j)}] is not used any more: remove it"
        print(f"allowed {i} -> {j} ({reason}): {', '.join(used)}")


def test_walker_sees_function_level_and_relative_imports(edges):
    have = {(e.importer, e.imported, e.kind) for e in edges}
    # inside a function: cli imports the families registry lazily (can the test fail?)
    assert ("cli", "families", "function") in have
    # `from .. import dist` in store/label.py: the submodule, not the package root
    assert ("store.label", "dist", "top") in have
    assert not any(e.importer.startswith("store") and e.imported == ROOT for e in edges)
    # `from .store import StoreTeacher` in teachers/__init__.py: relative to the package
    assert ("teachers", "teachers.store", "top") in have
    # the store no longer imports the teachers (Batch and Teacher live in signals)
    assert ("store.label", "signals", "top") in have
    assert not any(
        e.importer.startswith("store") and e.imported.startswith("teachers") for e in edges
    )


def test_families_registry_strings_are_not_imports(edges):
    src = (SRC / "families.py").read_text(encoding="utf-8")
    assert '"darkknowledge.pipeline:run_recipe"' in src  # the registry still names them
    targets = {e.imported for e in edges if e.importer == "families"}
    assert not {t for t in targets if place(t) and place(t)[1] == "families"}, targets


def _fake_package(root: Path) -> Path:
    pkg = root / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from . import high\n",
        "high.py": "import os\n\nfrom .low import helper\nfrom .sub import leaf\n",
        # upward and circular, but only inside a function: still an import
        "low.py": "def helper():\n    from . import high\n    return high\n",
        "sub/__init__.py": "",
        # an importlib literal up two levels; a registry string that is not an import
        "sub/leaf.py": (
            "import importlib\n\n"
            'REGISTRY = {"x": "fakepkg.high:run"}\n\n'
            "def load():\n"
            '    return importlib.import_module("fakepkg.top")\n'
        ),
        "top.py": "from .sub.leaf import load\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text, encoding="utf-8")
    return pkg


def test_synthetic_upward_import_and_cycle_are_reported(tmp_path):
    pkg = _fake_package(tmp_path)
    edges = walk_imports(pkg, "fakepkg")
    assert {(e.importer, e.imported, e.kind) for e in edges} == {
        (ROOT, "high", "top"),
        ("high", "low", "top"),
        ("high", "sub.leaf", "top"),
        ("low", "high", "function"),
        ("sub.leaf", "top", "importlib"),
        ("top", "sub.leaf", "top"),
    }
    layers = {"api": [ROOT, "top"], "middle": ["high", "sub.*"], "bottom": ["low"]}
    found = find_violations(edges, layers, siloed=(), allowed={})
    assert found == {
        ("low", "high"): "low -> high (layer bottom -> middle) at low:2 [function]",
        ("sub.leaf", "top"): "sub.leaf -> top (layer middle -> api) at sub.leaf:6 [importlib]",
    }
    cycles = find_cycles(edges, layers)
    assert cycles == [
        "high -> low -> high  (high:3 -> low; low:2 [function] -> high)",
        "sub -> top -> sub  (sub.leaf:6 [importlib] -> top; top:1 -> sub.leaf)",
    ]
    # siloed layer: two units of one layer importing each other need an allow entry
    silo = {"top": [ROOT, "top"], "families": ["high", "low", "sub.*"]}
    found = find_violations(edges, silo, siloed=("families",), allowed={})
    upward = ("sub.leaf", "top")
    assert set(found) == {("high", "low"), ("high", "sub.leaf"), ("low", "high"), upward}
    assert found[("high", "low")] == "high -> low (families: high -> low, not allowed) at high:3"
    found = find_violations(edges, silo, siloed=("families",), allowed={("high", "sub.*"): "ok"})
    assert set(found) == {("high", "low"), ("low", "high"), upward}
