"""dk generate --force deletes only a generation this tool made, and only once the new
recipe's prompts, verifier and cache have been read."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import recipe_dict, write_prompts
from darkknowledge.cli import main


def _recipe(tmp_path: Path, prompts: Path, url: str, name: str = "gen") -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(recipe_dict(prompts, [url])))
    return str(p)


def _one_line(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_force_refuses_a_folder_it_did_not_make(tmp_path: Path, capsys):
    # nothing listens there and the prompts file is missing: only the folder check runs
    rec = _recipe(tmp_path, tmp_path / "missing.jsonl", "http://127.0.0.1:9/v1")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "results.jsonl").write_text("my own results\n")
    for force in (["--force"], []):
        assert main(["generate", rec, "--out", str(out), *force]) == 2
        _one_line(capsys, "not a dk generate folder", "thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (out / "results.jsonl").read_text() == "my own results\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "thesis.tex"]


def test_force_replaces_a_generation_it_made(tmp_path: Path, server_factory, capsys):
    srv = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    rec, out = _recipe(tmp_path, prompts, srv.url), tmp_path / "out"
    assert main(["generate", rec, "--out", str(out)]) == 0
    marker = json.loads((out / "recipe.json").read_text())
    assert marker["tool"] == "darkknowledge" and marker["kind"] == "generate"
    results = (out / "results.jsonl").read_bytes()
    # a foreign file beside the generation: --force is refused, nothing deleted
    (out / "notes.md").write_text("mine")
    assert main(["generate", rec, "--out", str(out), "--force", "sampling.n=3"]) == 2
    _one_line(capsys, "notes.md", "nothing was deleted")
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "results.jsonl").read_bytes() == results
    assert json.loads((out / "recipe.json").read_text()) == marker
    (out / "notes.md").unlink()
    # bad new inputs (a missing prompts file): exit 2, the old generation intact
    gone = _recipe(tmp_path, tmp_path / "missing.jsonl", srv.url, "gone")
    assert main(["generate", gone, "--out", str(out), "--force"]) == 2
    _one_line(capsys, "missing.jsonl")
    assert (out / "results.jsonl").read_bytes() == results
    # the generation this tool made: replaced by the new recipe's
    assert main(["generate", rec, "--out", str(out), "--force", "sampling.n=3"]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["samples"]) == 3 for r in rows)
    assert json.loads((out / "recipe.json").read_text())["key"]["sampling"]["n"] == 3
    # an older folder (recipe.json without "tool") is still recognised and replaced
    old = json.loads((out / "recipe.json").read_text())
    (out / "recipe.json").write_text(json.dumps({"key": old["key"], "recipe": old["recipe"]}))
    assert main(["generate", rec, "--out", str(out), "--force"]) == 0
    assert json.loads((out / "recipe.json").read_text())["key"]["sampling"]["n"] == 2
