"""A short model card (``README.md``) beside a saved student: what it was distilled from,
by which recipe, on which data, and how well it did. The YAML header is the one the
Hugging Face hub reads (library, pipeline tag, tags)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, separators=(", ", ": ")) + "`"
    return str(v)


def write_card(
    folder: str | os.PathLike,
    *,
    pipeline_tag: str,
    recipe: str,
    family: str,
    teacher: str,
    data: str,
    facts: dict | None = None,
    metrics: dict | None = None,
    notes: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write ``folder/README.md`` (atomically); returns its path. ``metrics`` and
    ``facts`` are name → value rows; ``notes`` are sentences listed under *Use*."""
    folder = Path(folder)
    rows = [("recipe", recipe), ("family", family), ("teacher", teacher), ("data", data)]
    rows += list((facts or {}).items())
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags: [darkknowledge, knowledge-distillation]",
        "---",
        "",
        f"# {recipe}: distilled student",
        "",
        f"A student model distilled by darkknowledge {__version__} (`dk run`, family `{family}`).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {_value(v)} |" for k, v in rows),
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items() if v is not None]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("{pipeline_tag}", model="path/to/this/folder")',
        "```",
        "",
        *(f"- {n}" for n in notes),
    ]
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
