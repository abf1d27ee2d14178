"""Every shipped recipe validates (recursive glob, count asserted)."""

from pathlib import Path

import pytest

from darkknowledge.families import load_family_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))


def test_recipes_exist():
    assert len(RECIPES) > 0


def _later_stages(path: Path, tmp: Path) -> list[str]:
    """Overrides for the reasoning recipes whose inputs the experiment's later stages write
    (the generated traces, the arms' rows, the log-prob store, trained models) while they
    are absent: the distillation split's rows and an empty folder stand in for them, so
    everything else in the recipe is still validated."""
    from darkknowledge.recipe_io import read_recipe

    data, out = read_recipe(path), []
    keys = ("data.train", "teacher.path", "teacher.model.path", "student.model.path")
    for key in keys:
        v = data
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, str) and not (path.parent / v).exists():
            assert "runs/reasoning/" in v, f"{key}: {v} is not a later stage's output"
            stand_in = ROOT / "runs/reasoning/data/distill.jsonl" if key == "data.train" else tmp
            out.append(f"{key}={stand_in}")
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path, tmp_path):
    if "fashion" in path.name and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    if (
        path.parent.name == "reasoning"
        and not (ROOT / "runs/reasoning/data/manifest.json").exists()
    ):
        # the splits the recipes read, as `python -m darkknowledge.blackbox.chains
        # runs/reasoning/data` writes them (seeded: the same bytes every time; ~3 s)
        from darkknowledge.blackbox.chains import write_splits

        write_splits(ROOT / "runs/reasoning/data")
    overrides = _later_stages(path, tmp_path) if path.parent.name == "reasoning" else []
    family, recipe, _ = load_family_recipe(path, overrides)
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
