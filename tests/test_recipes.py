"""Every shipped recipe validates (recursive glob, count asserted)."""

from pathlib import Path

import pytest

from darkknowledge.families import load_family_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))


def test_recipes_exist():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path):
    if "fashion" in path.name and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    _, recipe, _ = load_family_recipe(path)  # any family (classify, text, ...)
    assert recipe.student is not None
