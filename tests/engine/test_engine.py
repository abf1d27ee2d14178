"""The one engine: one backward, one set of recipe classes, one loss vocabulary, one
checkpoint format, one schedule builder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from darkknowledge.config import EvalConfig, TrainConfig
from darkknowledge.engine import checkpoint
from darkknowledge.engine.optim import Schedule, build_optimizer
from darkknowledge.errors import DKError

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"


def test_one_backward_in_the_package():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "src").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if ".backward(" in line
    ]
    assert hits == ["src/darkknowledge/engine/loop.py:" + hits[0].rsplit(":", 1)[1]], hits


def test_every_family_uses_the_same_train_and_eval_classes():
    from darkknowledge.config import MemberConfig, Recipe
    from darkknowledge.hf.text_recipe import TeacherConfig as TextTeacher
    from darkknowledge.hf.text_recipe import TextRecipe
    from darkknowledge.lm.recipe import LMRecipe, TeacherSpec

    def ann(model, field):
        a = model.model_fields[field].annotation
        args = [x for x in getattr(a, "__args__", (a,)) if x is not type(None)]
        assert len(args) == 1, (model, field, a)
        return args[0]

    for recipe in (Recipe, TextRecipe, LMRecipe):
        assert ann(recipe, "train") is TrainConfig, recipe
        assert ann(recipe, "eval") is EvalConfig, recipe
    # and a teacher trained first uses the same class
    assert ann(MemberConfig, "train") is TrainConfig
    assert ann(TeacherSpec, "train") is TrainConfig
    assert ann(TextTeacher, "finetune") is TrainConfig


def test_schedules_pinned_values():
    p = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    m = torch.nn.Module()
    m.w, m.b = p
    cases = {
        # (schedule, warmup, min_lr): rates at steps 0, 1, 5, 9 of 10 (lr 1.0)
        ("constant", 0, 0.0): [1.0, 1.0, 1.0, 1.0],
        ("constant", 2, 0.0): [1 / 3, 2 / 3, 1.0, 1.0],
        ("cosine", 0, 0.0): [1.0, 0.5 * (1 + math.cos(math.pi / 10)), 0.5, 0.5 * (1 + math.cos(0.9 * math.pi))],
        ("cosine", 2, 0.1): [1 / 3, 2 / 3, 0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 8)), 0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8))],
        ("linear", 2, 0.0): [0.5, 1.0, 5 / 8, 1 / 8],
        ("linear", 0.06, 0.0): [1.0, 1.0, 5 / 9, 1 / 9],  # w = max(1, int(0.6))
    }  # fmt: skip
    for (name, w, min_lr), want in cases.items():
        cfg = TrainConfig(epochs=None, steps=10, lr=1.0, schedule=name, warmup=w, min_lr=min_lr)
        opt = build_optimizer(m, cfg)
        s = Schedule(opt, cfg, 10)
        got = [s.lr(i) for i in (0, 1, 5, 9)]
        assert got == pytest.approx(want, abs=1e-12), (name, w, got)


def test_weight_decay_grouping_in_one_place():
    m = torch.nn.Linear(3, 2)  # weight (2, 3) decays under 'matrices', bias never
    opt = build_optimizer(m, TrainConfig(weight_decay=0.1, decay="matrices", beta2=0.95))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    opt = build_optimizer(m, TrainConfig(weight_decay=0.1, decay="all", optimizer="sgd"))
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    assert isinstance(opt, torch.optim.SGD)


def test_checkpoints_of_another_format_are_refused_with_one_line(tmp_path: Path):
    good = tmp_path / "checkpoint.pt"
    checkpoint.save(good, {"step": 3, "model": {"w": torch.ones(2)}})
    assert checkpoint.load(good)["step"] == 3
    old = tmp_path / "old.pt"  # the format before the one engine: no marker
    torch.save({"step": 3, "model": {}, "optimizer": {}, "torch_rng": torch.get_rng_state()}, old)
    with pytest.raises(DKError, match="before the one engine") as e:
        checkpoint.load(old)
    assert "\n" not in str(e.value)
    pickled = tmp_path / "pickled.pt"  # the old text family's ckpt.pt held arbitrary objects
    torch.save({"best_state": None, "extra": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(DKError, match=r"cannot resume|older darkknowledge") as e:
        checkpoint.load(pickled)
    assert "\n" not in str(e.value)
    newer = tmp_path / "newer.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 99}, newer)
    with pytest.raises(DKError, match="version 99"):
        checkpoint.load(newer)


def test_a_run_folder_from_before_the_engine_is_refused_on_resume(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "digits"},
                "student": {"model": {"name": "mlp", "hidden": [8]}},
                "train": {"steps": 2},
                "eval": {"latency": False},
            }
        )
    )
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {name: digits}\n")  # an old run: no run.json
    torch.save({"step": 1}, run / "student" / "checkpoint.pt")
    res = subprocess.run(
        [sys.executable, "-m", "darkknowledge.cli", "run", str(recipe), "--out", str(run), "--resume"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "before the one engine" in res.stderr, res.stderr
    assert (run / "student" / "checkpoint.pt").exists()  # nothing of the old run was touched


# ---------------------------------------------------------------- one new divergence


@pytest.fixture
def squared_hellinger():
    """A divergence added in one place (this file): H²(p, q) = 1 − Σ √(p·q)."""
    from darkknowledge.losses.registry import DIVERGENCES, register_divergence

    @register_divergence("sq_hellinger_test", cite="Hellinger (1909)")
    def _h2(s, t):
        return (1.0 - torch.exp(0.5 * (s + t)).sum(-1)).clamp_min(0.0)

    yield "sq_hellinger_test"
    DIVERGENCES.pop("sq_hellinger_test")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_new_divergence_is_usable_from_every_family(squared_hellinger, tmp_path: Path):
    from darkknowledge.families import runner, validate_family

    name = squared_hellinger
    # classify: the term by name in loss:
    r = {
        "data": {"name": "digits", "limit": 300},
        "teacher": {"kind": "module", "model": {"name": "mlp", "hidden": [16]},
                    "train": {"steps": 10, "batch_size": 32}},
        "student": {"model": {"name": "mlp", "hidden": [8]}},
        "loss": {name: {"temperature": 2.0}, "ce": {"weight": 0.5}},
        "train": {"steps": 4, "batch_size": 32, "log_every": 1},
        "eval": {"latency": False},
    }  # fmt: skip
    fam, rec = validate_family(r)
    runner(fam) if fam != "classify" else None
    from darkknowledge.pipeline import run_recipe

    run_recipe(rec, tmp_path / "classify")
    logged = [m for m in _metrics(tmp_path / "classify" / "student" / "metrics.jsonl") if "lr" in m]
    assert all(m[f"loss/{name}"] > 0 for m in logged), logged
    # text: the term by name in loss:, on the task logits
    text = {
        "family": "text",
        "data": {"path": str(SHARED / "sst2"), "max_length": 16, "train_subset": 64,
                 "dev_subset": 16, "test_subset": 16},
        "teacher": {"source": "tiny:tiny-bert",
                    "tiny": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}},
        "student": {"layers": [0, 2]},
        "loss": {name: {"temperature": 2.0}, "hard": {"weight": 1.0}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 1},
        "eval": {"latency": False},
    }  # fmt: skip
    fam, rec = validate_family(text)
    runner(fam)(rec, tmp_path / "text")
    seed_dir = tmp_path / "text" / "students" / "distilled" / "seed0"
    logged = [m for m in _metrics(seed_dir / "metrics.jsonl") if "lr" in m]
    assert logged and all(m[f"loss/{name}"] > 0 for m in logged), logged
    # causal_lm: the divergence as distill.loss.kind
    if not SHAKES.exists():
        pytest.skip("TinyShakespeare not present")
    f = tmp_path / "shakes.txt"
    f.write_text(SHAKES.read_text()[:5000])
    tiny = {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
    fast = {"steps": 3, "batch_size": 2, "warmup": 1, "eval_every": 3, "log_every": 1}
    lm = {
        "family": "causal_lm",
        "data": {"kind": "text", "path": str(f), "block_size": 16, "val_blocks": 2},
        "tokenizer": {"kind": "char"},
        "teacher": {"model": tiny, "train": fast},
        "student": {"model": tiny},
        "train": fast,
        "distill": {"mode": "token", "loss": {"kind": name}},
    }
    fam, rec = validate_family(lm)
    runner(fam)(rec, tmp_path / "lm")
    logged = [m for m in _metrics(tmp_path / "lm" / "student" / "metrics.jsonl") if "lr" in m]
    assert logged and all(m["loss"] > 0 for m in logged), logged
    # and a name nobody registered is one line in every family
    for raw in (r | {"loss": {"nope_kl": {}}}, text | {"loss": {"nope_kl": {}}},
                lm | {"distill": {"mode": "token", "loss": {"kind": "nope_kl"}}}):  # fmt: skip
        with pytest.raises(DKError, match="nope_kl") as e:
            validate_family(raw)
        assert "\n" not in str(e.value)


def test_a_non_finite_loss_stops_the_run_with_one_line_keeping_the_last_checkpoint(tmp_path):
    from darkknowledge.config import DigitsData, MLPConfig
    from darkknowledge.data import load_data
    from darkknowledge.losses import CE, LossStack
    from darkknowledge.registry import build_model
    from darkknowledge.train import fit

    d = load_data(DigitsData(name="digits", limit=200))
    m = build_model(MLPConfig(name="mlp", hidden=[8]), d.train.input_shape, 10)
    with pytest.raises(DKError, match=r"step \d+: the training loss is (nan|inf)") as e:
        # lr 1e30 (past the schema's limit: the run-time guard is what is tested) diverges
        # within a few steps; checkpoints every step
        cfg = TrainConfig(steps=50, batch_size=32, schedule="constant", checkpoint_every=1)
        cfg = cfg.model_copy(update={"lr": 1e30})
        fit(m, d.train, cfg, LossStack.of(CE()), run_dir=tmp_path)
    assert "\n" not in str(e.value) and "checkpoint" in str(e.value)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())  # the last good one
    # and a non-finite number in a recipe never gets that far
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="less than or equal to 10"):
        TrainConfig(lr=1e30)
