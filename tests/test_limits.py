"""Numbers that cannot train are refused by the schema with one line (docs/limits.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "recipes" / "cnn-ensemble_to_mlp256_digits.yaml"
TEXT = ROOT / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml"
LM = ROOT / "recipes" / "lm" / "shakespeare_char_fkl.yaml"


@pytest.mark.parametrize(
    "recipe, override, key",
    [
        (CLASSIFY, "train.lr=.inf", "train.lr"),
        (CLASSIFY, "train.lr=1e30", "train.lr"),
        (CLASSIFY, "loss.hinton_kd.temperature=1e-300", "loss.hinton_kd.temperature"),
        (CLASSIFY, "loss.hinton_kd.temperature=.inf", "loss.hinton_kd.temperature"),
        (CLASSIFY, "teacher.weights=[.inf, 1, 1]", "teacher.weights"),
        (CLASSIFY, "train.seed=10000000000000000000000", "train.seed"),
        (CLASSIFY, "train.seed=-1", "train.seed"),
        (LM, "distill.loss.temperature=1000", "distill.loss.temperature"),
        (LM, "student.model.config.n_head=3", "n_head=3 does not divide n_embd=64"),
        (LM, "student.model.config.n_embd=-16", "n_embd"),
        (TEXT, "teacher.tiny.num_attention_heads=5", "does not divide hidden_size"),
        (TEXT, "loss.soft.temperature=0", "loss.soft.temperature"),
    ],
)
def test_numbers_that_cannot_train_are_one_line(recipe, override, key, capsys):
    assert main(["validate", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err, err


def _mlp_recipe(tmp_path: Path, teacher: dict | None, hidden: list[int]) -> Path:
    import yaml

    r = {"data": {"name": "digits", "limit": 200},
         "student": {"model": {"name": "mlp", "hidden": hidden}},
         "train": {"steps": 2, "batch_size": 32}, "eval": {"latency": False}}  # fmt: skip
    if teacher is not None:
        r["teacher"] = teacher
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def test_a_model_beyond_the_memory_is_refused_before_it_is_built(tmp_path, capsys):
    recipe = _mlp_recipe(tmp_path, None, [10**11])
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model mlp" in err and "GiB are available" in err, err


@pytest.mark.parametrize("bad", ["nan", "int"])
def test_a_teacher_checkpoint_that_cannot_teach_is_one_line(bad, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from darkknowledge.config import MLPConfig
    from darkknowledge.registry import build_model

    sd = build_model(MLPConfig(name="mlp", hidden=[8]), (1, 8, 8), 10).state_dict()
    k = next(iter(sd))
    sd[k] = sd[k].clone().fill_(float("nan")) if bad == "nan" else sd[k].to(torch.int64)
    save_file(sd, str(tmp_path / "t.safetensors"))
    teacher = {"kind": "module", "model": {"name": "mlp", "hidden": [8]},
               "checkpoint": str(tmp_path / "t.safetensors")}  # fmt: skip
    recipe = _mlp_recipe(tmp_path, teacher, [8])
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    want = "NaN or infinite" if bad == "nan" else "int64"
    assert err.count("\n") == 1 and want in err and k in err, err


@pytest.mark.parametrize(
    "template",
    ["{question.__class__.__init__.__globals__}", "{question[0]}", "{question!r}", "{0}"],
)
def test_a_prompt_template_is_plain_field_substitution(template, tmp_path, capsys):
    import yaml

    (tmp_path / "p.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    rec = {"family": "generate", "prompts": {"path": str(tmp_path / "p.jsonl"), "template": template},
           "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
           "verifier": {"name": "exact"}}  # fmt: skip
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(rec))
    assert main(["validate", str(tmp_path / "g.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only plain {field} substitution" in err, err
