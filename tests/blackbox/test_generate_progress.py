"""dk generate's progress off a terminal: prompts done/total, accepted samples, tokens,
cost (when priced), rate and ETA."""

from __future__ import annotations

import itertools
import re

import yaml

from conftest import recipe_dict, write_prompts
from darkknowledge.cli import main

LINE = re.compile(
    r"^\[\d\d:\d\d:\d\d\] generate: prompt (\d+/\d+), accepted (\d+), tokens (\d+), "
    r"cost \$[\d.]+, .* prompts/s, ETA \S+$"
)


def test_generate_prints_progress_lines(tmp_path, server_factory, monkeypatch, capsys):
    monkeypatch.setenv("DK_PROGRESS_EVERY_S", "0")
    srv = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    rec = recipe_dict(prompts, [srv.url], budget={"price_output_per_m": 2.0})
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(rec))
    out = tmp_path / "out"
    assert main(["generate", str(p), "--out", str(out), "prompts.limit=8"]) == 0
    lines = capsys.readouterr().err.splitlines()
    got = [(m[1], int(m[2]), int(m[3])) for x in lines if (m := LINE.match(x))]
    assert [g[0] for g in got] == [f"{i}/8" for i in range(1, 9)], lines
    assert got[-1][1] == 8  # keep: correct, and the fault server's sample 0 is right
    assert all(a[2] <= b[2] for a, b in itertools.pairwise(got))  # tokens only grow
    # a rerun over more prompts starts from the 8 done (and their accepted samples)
    assert main(["generate", str(p), "--out", str(out), "prompts.limit=12"]) == 0
    got = [(m[1], int(m[2])) for x in capsys.readouterr().err.splitlines() if (m := LINE.match(x))]
    assert [g[0] for g in got] == ["9/12", "10/12", "11/12", "12/12"] and got[-1][1] == 12
