"""The text family end to end on real SST-2 sentences: recipe, data, training that
resumes exactly, the stored teacher, export and reload."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from darkknowledge.cli import main  # noqa: E402
from darkknowledge.config import TrainConfig, with_defaults  # noqa: E402
from darkknowledge.errors import DKError  # noqa: E402
from darkknowledge.families import load_family_recipe, validate_family  # noqa: E402
from darkknowledge.hf.io import build_tiny, load_model  # noqa: E402
from darkknowledge.hf.text_data import encode, from_datasets, read_split  # noqa: E402
from darkknowledge.hf.text_pipeline import (  # noqa: E402
    TextTask,
    accuracy,
    predict,
    teacher_source,
)
from darkknowledge.hf.text_recipe import TRAIN_DEFAULTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from darkknowledge.hf.io import load_tokenizer

    try:
        return load_tokenizer(teacher_source("minilm-l6"))
    except DKError as e:
        pytest.skip(str(e))


def _recipe(**over):
    base = {
        "family": "text",
        "data": {"path": str(SST2)},
        "teacher": {"source": "tiny:tiny-bert"},
    }
    base.update(over)
    return base


# ------------------------------------------------------------------ recipe and data


def test_recipe_refuses_unknown_keys_and_empty_losses():
    with pytest.raises(DKError, match="colour"):
        validate_family(_recipe(colour="red"))
    with pytest.raises(DKError, match="at least one term"):
        validate_family(_recipe(loss={"hard": {"weight": 0}}))
    with pytest.raises(DKError, match="names must be unique"):
        validate_family(_recipe(variants=[{"name": "a"}, {"name": "a"}]))
    with pytest.raises(DKError, match="path does not exist"):
        validate_family(_recipe(data={"path": "/no/such/folder"}))


def test_smoke_recipe_validates():
    name, recipe, _ = load_family_recipe(SMOKE)
    assert name == "text" and [v.name for v in recipe.variants] == [
        "distilled",
        "plain",
        "random-init",
    ]


def test_sst2_tsv_and_jsonl(tmp_path):
    dev = read_split(SST2 / "dev.tsv")
    assert len(dev) == 872 and set(dev.labels) == {0, 1}
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    s = read_split(p)
    assert s.texts == ["fine", "bad"] and s.labels == [1, 0]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("words\tlabel\nhi\t1\n", "no text column"),
        ("sentence\ty\nhi\t1\n", "no column 'label'"),
        ("sentence\tlabel\nhi\tpositive\n", "label 'positive' is not an integer"),
        ("sentence\tlabel\nhi\t1\textra\n", ":2: 3 columns, the header has 2"),
    ],
)
def test_bad_tsv_is_one_line(tmp_path, content, match):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(DKError, match=match) as e:
        read_split(p)
    assert "\n" not in str(e.value)


def test_bad_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(DKError, match=r"bad\.jsonl:2: not JSON"):
        read_split(p)


def test_from_datasets():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["good film", "dull"], "label": [1, 0]})
    s = from_datasets(ds)
    assert s.texts == ["good film", "dull"] and s.labels == [1, 0]
    with pytest.raises(DKError, match="no column 'y'"):
        from_datasets(ds, label_key="y")


def test_encode_and_dynamic_padding(tokenizer):
    s = read_split(SST2 / "dev.tsv").subset(16)
    enc = encode(tokenizer, s, 64)
    assert enc.x.shape == (16, 64) and enc.mask.sum(1).max() <= 64
    x, m, y, ids = enc.batch(torch.arange(4))
    assert x.shape[1] == int(enc.mask[:4].sum(1).max()) and m[:, -1].any()
    assert torch.equal(ids, torch.arange(4)) and torch.equal(y, enc.y[:4])
    sub = enc.subset(5, seed=1)
    assert len(sub) == 5 and torch.equal(sub.x, enc.x[sub.ids])


# ------------------------------------------------------------------ training


def test_training_resumes_exactly(tmp_path, tokenizer):
    enc = encode(tokenizer, read_split(SST2 / "dev.tsv").subset(96), 32)
    over = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 2, "eval_every": 3}
    cfg = TrainConfig(**with_defaults(over, TRAIN_DEFAULTS))

    def trainer(work, fail_at=None):
        model = build_tiny(
            "tiny-bert",
            "AutoModelForSequenceClassification",
            seed=0,
            vocab_size=len(tokenizer),
            num_labels=2,
        )

        def step(x, m, y, ids):
            if fail_at is not None and trainer.calls == fail_at:
                raise KeyboardInterrupt
            trainer.calls += 1
            loss = torch.nn.functional.cross_entropy(model(input_ids=x, attention_mask=m).logits, y)
            return loss, {}

        trainer.calls = 0
        return model, TextTask(model, None, enc, enc, cfg, 0, work, step, "t")

    whole, tr = trainer(tmp_path / "a")
    tr.run(resume=False)
    _, tr = trainer(tmp_path / "b", fail_at=5)  # killed during step 6, after the step-4 save
    with pytest.raises(KeyboardInterrupt):
        tr.run(resume=False)
    again, tr = trainer(tmp_path / "b")
    tr.run(resume=True)
    assert tr.total == 6 and trainer.calls == 2  # only steps 5 and 6 ran again
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_smoke_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "random-init" in table
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["students"]) == {"distilled", "plain", "random-init"}
    assert rep["student_layers"] == [0, 2] and rep["teacher_layers"] == 4
    assert rep["size"]["student"]["params"] < rep["size"]["teacher"]["params"]
    # the teacher's logits and pooled hidden states were stored once, and used
    manifest = json.loads((out / "signals" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_examples"] == 256
    assert list(manifest["hidden"]) == ["taps.mean_4"]
    res = json.loads((out / "students" / "distilled" / "seed0" / "result.json").read_text())
    assert res["teacher_signals"] == "store"
    plain = json.loads((out / "students" / "plain" / "seed0" / "result.json").read_text())
    assert plain["teacher_signals"] == "none"
    # the export loads with AutoModelForSequenceClassification and reproduces the accuracy
    from darkknowledge.hf.io import load_tokenizer
    from darkknowledge.hf.text_data import encode as enc_fn

    model_dir = out / "students" / "distilled" / "seed0" / "model"
    model = load_model(model_dir, "AutoModelForSequenceClassification")
    tok = load_tokenizer(model_dir)
    test = read_split(SST2 / "test.tsv").subset(64, 0)
    enc = enc_fn(tok, test, 32)
    assert accuracy(predict(model, enc), enc.y) == res["test_accuracy"]
    assert model.config.num_hidden_layers == 2
    # a second run with --resume reuses everything
    stamp = (out / "students" / "distilled" / "seed0" / "result.json").stat().st_mtime_ns
    assert main(["run", str(SMOKE), "--out", str(out), "--resume"]) == 0
    assert (out / "students" / "distilled" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    # and a fresh run without --resume or --force is refused in one line
    assert main(["run", str(SMOKE), "--out", str(out)]) == 2
    assert "run directory already exists" in capsys.readouterr().err


def test_bad_teacher_source_and_layer_map_are_one_line(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "a"), "teacher.source=/no/model"]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "/no/model" in err and "Traceback" not in err
    bad_map = "loss.cosine.layer_map={9: 4}"
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "b"), bad_map]) == 2
    assert "cosine.layer_map: 9→4 out of range" in capsys.readouterr().err


def test_token_cosine_and_attention_run_the_teacher_online(tmp_path):
    out = tmp_path / "run"
    variant = (
        "variants=[{name: online, loss: {soft: {weight: 1}, "
        "cosine: {pool: tokens, layer_map: {1: 2, 2: 4}}, attention: {layer_map: {2: 4}}}}]"
    )
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        variant,
        "eval.latency=false",
        "train.log_every=1",
    ]
    assert main(args) == 0
    res = json.loads((out / "students" / "online" / "seed0" / "result.json").read_text())
    assert res["teacher_signals"] == "online" and not (out / "signals").exists()
    steps = [
        json.loads(line)
        for line in (out / "students/online/seed0/metrics.jsonl").open()
        if '"lr"' in line
    ]
    # every step logs each term, and each term is finite and positive: a term that was
    # silently zeroed (or dropped) fails here, not only the total
    assert steps and all(
        s[f"loss/{t}"] == s[f"loss/{t}"] and s[f"loss/{t}"] > 0
        for s in steps
        for t in ("soft", "cos", "attn")
    ), steps


def test_dk_label_on_a_text_recipe_then_distil_from_the_store(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["label", str(SMOKE), "--out", str(store)]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_examples"] == 256
    # the same recipe again: reused as is; another teacher: refused naming the key, and
    # nothing touched (the fine-tuned teacher in store/teacher is not reused for it)
    assert main(["-q", "label", str(SMOKE), "--out", str(store)]) == 0
    before = (store / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["-q", "label", str(SMOKE), "--out", str(store), "teacher.finetune.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher.finetune.lr differs" in err, err
    assert (store / "manifest.json").read_bytes() == before
    run = tmp_path / "run"
    over = [f"signals_dir={store}", f"teacher.checkpoint={store / 'teacher' / 'model'}",
            "variants=[{name: distilled}]", "eval.latency=false"]  # fmt: skip
    assert main(["run", str(SMOKE), "--out", str(run), *over]) == 0
    res = json.loads((run / "students" / "distilled" / "seed0" / "result.json").read_text())
    assert res["teacher_signals"] == "store" and not (run / "signals").exists()
    # a recipe whose variants read nothing stored has nothing to label: one line
    capsys.readouterr()
    assert main(["label", str(SMOKE), "--out", str(tmp_path / "s2"),
                 "variants=[{name: plain, loss: {hard: {weight: 1.0}}}]"]) == 2  # fmt: skip
    assert "nothing to label" in capsys.readouterr().err
