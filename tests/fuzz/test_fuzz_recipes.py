"""``dk validate`` on mutated recipes of every family and on mutated overrides: valid,
or exit status 2 with one line; never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzzlib import (
    TOKENS,
    assert_cli_ok_or_one_line,
    cases,
    json_values,
    mutated_bytes,
    mutated_tree,
    paths_of,
    recipe_fixture,
    run_cli,
    yaml_dump,
)
from hypothesis import given
from hypothesis import strategies as st

FAMILIES = ["classify", "text", "causal_lm", "generate"]
BASES = {f: recipe_fixture(f) for f in FAMILIES}
TMP = Path(tempfile.mkdtemp(prefix="dk-fuzz-recipes-"))


def validate(text: bytes, *overrides: str) -> tuple[int, str]:
    f = TMP / "recipe.yaml"
    f.write_bytes(text)
    return run_cli(["validate", str(f), "--quiet", *overrides])


def test_the_fixtures_are_valid():
    for fam, base in BASES.items():
        rc, err = validate(yaml_dump(base))
        assert rc == 0, (fam, err)


@pytest.mark.parametrize("family", FAMILIES)
@cases(100)
@given(data=st.data())
def test_text_mutations_of_a_recipe(family, data):
    text = data.draw(mutated_bytes(yaml_dump(BASES[family])))
    assert_cli_ok_or_one_line(*validate(text))


@pytest.mark.parametrize("family", FAMILIES)
@cases(60)
@given(data=st.data())
def test_value_mutations_of_a_recipe(family, data):
    tree = data.draw(mutated_tree(BASES[family]))
    assert_cli_ok_or_one_line(*validate(yaml_dump(tree)))


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


KEYS = sorted({_dotted(p) for f in FAMILIES for p in paths_of(BASES[f]) if p})


@cases(200)
@given(
    family=st.sampled_from(FAMILIES),
    key=st.one_of(
        st.sampled_from(KEYS),
        st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(KEYS), st.text(max_size=6)),
        st.text(max_size=20),
    ),
    sep=st.sampled_from(["=", "=", "", "==", " = "]),
    value=st.one_of(
        st.builds(lambda v: yaml_dump(v).decode().strip(), json_values),
        st.text(max_size=20),
        st.sampled_from(TOKENS),
    ),
)
def test_overrides(family, key, sep, value):
    assert_cli_ok_or_one_line(*validate(yaml_dump(BASES[family]), f"{key}{sep}{value}"))
