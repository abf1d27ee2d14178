"""``extends:``: a recipe on top of base recipes (deep merge, then overrides), what is
refused in one line, the job service's confinement of base paths, and the shipped
TinyShakespeare recipes resolving exactly as they did before they shared a base."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main
from darkknowledge.families import load_family_recipe
from darkknowledge.recipe_io import MAX_EXTENDS_DEPTH, deep_merge, read_recipe

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "recipes" / "lm"
# the resolved recipes of recipes/lm/ before they extended a base (dumped from the files
# at the parent commit; "<repo>" stands for the repository's folder)
EXPECTED = json.loads((ROOT / "tests" / "lm" / "shakespeare_resolved.json").read_text())

TINY = {
    "data": {"name": "digits"},
    "student": {"model": {"name": "mlp", "hidden": [16]}},
    "train": {"epochs": 2, "batch_size": 64},
}


def _write(folder: Path, name: str, data) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _refused(path: Path, capsys, *overrides: str) -> str:
    assert main(["validate", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_lm_recipes_resolve_as_before(name):
    path = LM / name
    assert "extends:" in path.read_text() and len(path.read_text().splitlines()) <= 12
    fam, recipe, _ = load_family_recipe(path)
    got = json.loads(json.dumps({"family": fam, **recipe.model_dump(mode="json")}))
    assert json.loads(json.dumps(got).replace(str(ROOT), "<repo>")) == EXPECTED[name]


def test_deep_merge_mappings_merge_lists_and_scalars_replace():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"k": 1}}, "b": 2, "t": {"kind": "char", "n": 1}}
    over = {"a": {"y": [3], "z": {"j": 2}}, "b": None, "c": 4, "t": {"kind": "path", "p": "q"}}
    got = deep_merge(base, over)
    assert got == {
        "a": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}},
        "b": None,
        "t": {"kind": "path", "p": "q"},  # another kind: replaced, not merged
        "c": 4,
    }
    assert base["a"]["y"] == [1, 2]  # the inputs are left alone


def test_bases_apply_in_order_then_the_recipe_then_overrides(tmp_path):
    _write(tmp_path, "sub/root.yaml", {**TINY, "train": {"epochs": 1, "batch_size": 8}})
    _write(tmp_path, "sub/a.yaml", {"extends": "root.yaml", "train": {"epochs": 3}})
    _write(tmp_path, "b.yaml", {"train": {"epochs": 5, "lr": 0.5}})
    r = _write(tmp_path, "r.yaml", {"extends": ["sub/a.yaml", "b.yaml"], "train": {"lr": 0.1}})
    data = read_recipe(r, ["train.batch_size=16"])
    assert data["train"] == {"epochs": 5, "batch_size": 16, "lr": 0.1}
    assert "extends" not in data and data["student"] == TINY["student"]


def test_refused_in_one_line_naming_the_file(tmp_path, capsys):
    missing = _write(tmp_path, "m.yaml", {**TINY, "extends": "nope.yaml"})
    assert "m.yaml: extends 'nope.yaml': no such recipe file" in _refused(missing, capsys)

    _write(tmp_path, "c1.yaml", {"extends": "c2.yaml"})
    _write(tmp_path, "c2.yaml", {"extends": "c1.yaml"})
    cyc = _write(tmp_path, "c0.yaml", {**TINY, "extends": "c1.yaml"})
    err = _refused(cyc, capsys)
    assert "c2.yaml: extends 'c1.yaml': a cycle" in err and "c1.yaml ->" in err

    for i in range(MAX_EXTENDS_DEPTH + 1):
        _write(tmp_path, f"d{i}.yaml", {"extends": f"d{i + 1}.yaml"})
    _write(tmp_path, f"d{MAX_EXTENDS_DEPTH + 1}.yaml", TINY)
    assert "deeper than 8 levels" in _refused(tmp_path / "d0.yaml", capsys)

    _write(tmp_path, "lm.yaml", {"family": "causal_lm"})
    other = _write(tmp_path, "o.yaml", {**TINY, "family": "classify", "extends": "lm.yaml"})
    err = _refused(other, capsys)
    assert "o.yaml: extends 'lm.yaml'" in err and "'causal_lm' recipe" in err

    bad = _write(tmp_path, "bad.yaml", {**TINY, "extends": 3})
    assert "bad.yaml: extends: give a base recipe file" in _refused(bad, capsys)
    folder = _write(tmp_path, "f.yaml", {**TINY, "extends": "."})
    assert "is a folder" in _refused(folder, capsys)
    nul = _write(tmp_path, "n.yaml", {**TINY, "extends": "a\x00b"})
    assert "n.yaml: extends" in _refused(nul, capsys)
    plain = _write(tmp_path, "p.yaml", TINY)
    assert "an override cannot set it" in _refused(plain, capsys, "extends=m.yaml")


@pytest.fixture(scope="module")
def service():
    from fastapi.testclient import TestClient

    from darkknowledge.service.app import create_app
    from darkknowledge.service.auth import create_token
    from darkknowledge.service.settings import ServiceSettings

    root = Path(tempfile.mkdtemp(prefix="dk-extends-"))
    data = root / "data"
    _write(data, "base.yaml", TINY)
    _write(data, "sub/mid.yaml", {"extends": "../base.yaml", "train": {"epochs": 3}})
    _write(data, "sub/out.yaml", {"extends": "../../outside.yaml"})
    _write(root, "outside.yaml", TINY)
    settings = ServiceSettings(data_dir=root / "svc", workers=0, data_roots={"data": data})
    app = create_app(settings)
    with app.state.sessions() as db:
        token = create_token(db, "t")
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, root, app


def test_service_confines_bases_to_the_data_roots(service):
    from darkknowledge.service.db import Job

    client, root, app = service

    def post(extends):
        return client.post("/api/v1/jobs", json={"recipe": {"extends": extends}})

    r = post("data:sub/mid.yaml")  # a base of a base: relative to its own folder, inside
    assert r.status_code == 201, r.text
    with app.state.sessions() as db:  # the job runs the merged recipe
        assert db.get(Job, r.json()["id"]).resolved["train"]["epochs"] == 3
    for bad in ["/etc/passwd", "../../x.yaml", str(root / "outside.yaml"), "data:sub/out.yaml",
                "data:../outside.yaml"]:  # fmt: skip
        r = post(bad)
        detail = r.json()["detail"]
        assert r.status_code == 422 and "\n" not in detail, (bad, r.text)
        assert detail.startswith("recipe: extends: ") or "data:sub/out.yaml" in bad, detail
        assert "data root" in detail, detail
