"""Every shipped recipe validates (recursive glob, count asserted)."""

from pathlib import Path

import pytest

from darkknowledge.families import load_family_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))


def test_recipes_exist():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path, request):
    if "fashion" in path.name and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    if path.parent.name == "reasoning":  # the splits and later stages' outputs they read
        path = request.getfixturevalue("reasoning_recipes") / path.name
    family, recipe, _ = load_family_recipe(path)
    assert family != "classify" or recipe.student is not None


def test_top_level_fashion_recipe_is_the_published_one():
    """recipes/cnn-ensemble_to_mlp800_fashion.yaml must be the recipe behind
    docs/results/hinton2015/fashion.md (recipes/hinton2015/...), bar its name."""
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    name = "cnn-ensemble_to_mlp800_fashion.yaml"
    top, published = (
        load_family_recipe(ROOT / "recipes" / d / name)[1].model_dump(exclude={"name"})
        for d in ("", "hinton2015")
    )
    assert top == published
