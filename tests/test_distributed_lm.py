"""Two processes on CPU (gloo) give the one-process result for the transformer families:
`dk run` of a `causal_lm` recipe (token-level forward KL, gradient accumulation, chat
data whose padding gives the processes unequal numbers of valid tokens, so the loss is
normalised by the all-reduced global count), the same with the teacher sharded over the
processes (`teacher.placement: shard`), the student sharded by FSDP, and a `text`
recipe.

No dropout: dropout masks come from per-process RNG streams (docs/distributed.md)."""

from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_distributed import (
    ENV,
    _accelerate,
    _dk,
    _kill_after,
    _kill_then_resume,
    _one_resume,
    _run,
    _torchrun,
)

pytest.importorskip("transformers")

from darkknowledge.hf import io as hfio

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"
pytestmark = pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory) -> tuple[Path, dict]:
    """Chat pairs from TinyShakespeare (a line and the next one: prompts and responses of
    unequal length), a char tokenizer, a random tiny GPT-2 teacher and a student folder."""
    tmp = tmp_path_factory.mktemp("lm")
    lines = [x for x in SHAKES.read_text()[:8000].splitlines() if x.strip()]
    pairs = [(a, b) for a, b in zip(lines[:-1:2], lines[1::2], strict=False) if len(a) < 30][:30]
    rows = [{"prompt": a, "response": b} for a, b in pairs]
    (tmp / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = hfio.char_tokenizer(SHAKES.read_text()[:8000])
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout
    t = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=1, vocab_size=len(tok),
                        n_layer=2, n_head=2, n_embd=32, n_positions=64, **ids)  # fmt: skip
    s = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", seed=2, vocab_size=len(tok),
                        n_layer=1, n_head=2, n_embd=16, n_positions=64, **ids)  # fmt: skip
    hfio.save_pretrained(t, tmp / "teacher", tok)
    hfio.save_pretrained(s, tmp / "student", tok)
    recipe = {
        "family": "causal_lm",
        "name": "dist-lm",
        "data": {"kind": "chat", "train": str(tmp / "chat.jsonl"), "val_fraction": 0.2,
                 "max_length": 48},
        "teacher": {"model": {"path": str(tmp / "teacher")}},
        "student": {"model": {"path": str(tmp / "student")}},
        # micro-batches of 5 rows (3 + 2 per process), 2 per step
        "train": {"steps": 4, "batch_size": 5, "grad_accum": 2, "warmup": 1, "lr": 3e-3,
                  "eval_every": 2, "checkpoint_every": 2},
        "distill": {"mode": "token", "chunk": 16,
                    "loss": {"kind": "forward_kl", "ce_weight": 0.5}},
    }  # fmt: skip
    path = tmp / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one = tmp / "one"
    _run(_dk("run", str(path), "--out", str(one)))
    return path, {"one": one, "tmp": tmp}


def _val(run: Path) -> float:
    return json.loads((run / "report.json").read_text())["students"]["0"]["val_loss"]


def test_processes_see_unequal_valid_token_counts(lm_setup):
    """The premise of the next test: the two processes' rows of a step hold different
    numbers of valid tokens, so a per-process mean would give another update."""
    from darkknowledge.families import load_family_recipe
    from darkknowledge.lm.pipeline import Data, load_tokenizers

    path, _ = lm_setup
    _, rec, _ = load_family_recipe(path)
    s_tok, t_tok, text = load_tokenizers(rec)
    data = Data(rec, s_tok, t_tok, text)
    batches, _ = data.batches(rec.train.seed, 0, rec.train.batch_size, rec.train.grad_accum)
    per_process = [
        sum(int(b.valid[p].sum()) for b, _ in batches) for p in (slice(0, 3), slice(3, 5))
    ]
    assert per_process[0] != per_process[1] and min(per_process) > 0
    assert any((b.labels == -100).any(dim=1).all() for b, _ in batches)  # padding + prompts


def test_causal_lm_two_processes_equals_one(lm_setup):
    path, d = lm_setup
    one, two = d["one"], d["tmp"] / "two"
    res = _run(_accelerate(2, "run", str(path), "--out", str(two)))
    w = "student/model/model.safetensors"
    diff = _max_diff(one / w, two / w)
    print(f"causal_lm DDP: max |w1 - w2| = {diff:.2e}; val loss {_val(one):.5f} / {_val(two):.5f}")
    assert diff <= 1e-4, diff
    assert round(_val(one), 3) == round(_val(two), 3)
    assert res.stdout.count("student seed") == 1  # process 0 alone prints
    logged = [json.loads(x) for x in (two / "student" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [r["step"] for r in ref]  # one writer
    steps_a = [r for r in logged if "loss" in r]  # step lines (not evaluations)
    steps_b = [r for r in ref if "loss" in r]
    assert abs(steps_a[-1]["loss"] - steps_b[-1]["loss"]) < 1e-4  # the global step loss
    result = json.loads((two / "student" / "result.json").read_text())
    assert result["processes"] == 2 and result["teacher_placement"] == "replicate"
    assert not (two / "student" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_causal_lm_sharded_teacher_equals_replicated(lm_setup):
    """teacher.placement: shard — each process holds half of the teacher's parameters
    (FSDP2, all-gathered block by block); the student is the replicated run's."""
    path, d = lm_setup
    one, two = d["one"], d["tmp"] / "shard"
    _run(_accelerate(2, "run", str(path), "teacher.placement=shard", "--out", str(two)))
    w = "student/model/model.safetensors"
    diff = _max_diff(one / w, two / w)
    print(f"causal_lm sharded teacher: max |w1 - w2| = {diff:.2e}; "
          f"val loss {_val(one):.5f} / {_val(two):.5f}")  # fmt: skip
    assert diff <= 1e-4, diff
    assert round(_val(one), 3) == round(_val(two), 3)
    result = json.loads((two / "student" / "result.json").read_text())
    assert result["teacher_placement"] == "shard"
    full = sum(v.numel() * v.element_size() for v in
               load_file(str(d["tmp"] / "teacher" / "model.safetensors")).values())  # fmt: skip
    print(f"teacher bytes: full {full}, per process {result['teacher_param_bytes_per_process']}")
    for local in result["teacher_param_bytes_per_process"]:
        assert 0.45 * full <= local <= 0.55 * full, (local, full)


def _fsdp(cmd: list[str]) -> list[str]:
    """An ``accelerate launch`` command with FSDP instead of DDP."""
    cmd[cmd.index("--multi_gpu")] = "--use_fsdp"
    return cmd


def test_causal_lm_fsdp_student_equals_one_process(lm_setup):
    """FSDP2 for the student: one unit per block, a root unit (embeddings, head) that
    stays gathered for the chunked LM head; each process holds half of the student, and
    the student is the one-process one (gradient accumulation, unequal valid tokens)."""
    path, d = lm_setup
    one, two = d["one"], d["tmp"] / "fsdp"
    _run(_fsdp(_accelerate(2, "run", str(path), "--out", str(two))))
    w = "student/model/model.safetensors"
    diff = _max_diff(one / w, two / w)
    print(f"causal_lm FSDP: max |w1 - w2| = {diff:.2e}; val loss {_val(one):.5f} / {_val(two):.5f}")
    assert diff <= 1e-4, diff
    assert round(_val(one), 3) == round(_val(two), 3)
    result = json.loads((two / "student" / "result.json").read_text())
    assert result["fsdp"] and result["processes"] == 2
    saved = load_file(str(one / w))
    full = sum(v.numel() * v.element_size() for v in saved.values())
    tied = saved.keys() >= {"transformer.wte.weight", "lm_head.weight"}
    if tied:  # saved twice, held once
        full -= saved["lm_head.weight"].numel() * 4
    trained = json.loads((one / "student" / "model" / "config.json").read_text())
    if "trained_positions" in trained:  # the position table is saved widened
        wpe = saved["transformer.wpe.weight"]
        full -= (wpe.shape[0] - trained["trained_positions"]) * wpe.shape[1] * 4
    for local in result["student_param_bytes_per_process"]:
        assert 0.4 * full <= local <= 0.6 * full, (local, full)


@pytest.mark.slow
def test_causal_lm_refusals_are_one_line(lm_setup, tmp_path):
    """Two processes and a micro-batch of one row, or FSDP for a LoRA student: one error."""
    path, _ = lm_setup
    for extra, fsdp, match in (
        (["train.batch_size=1"], False, "smaller than the number of processes"),
        (["student.lora={r: 2, target_modules: [c_attn]}"], True, "LoRA student is trained"),
    ):
        cmd = _accelerate(2, "run", str(path), *extra, "--out", str(tmp_path / "x"))
        res = subprocess.run(
            _fsdp(cmd) if fsdp else cmd, capture_output=True, text=True, timeout=900, env=ENV
        )
        assert res.returncode != 0
        errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and match in errors[0], res.stderr[-2000:]
        assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.slow
def test_killed_fsdp_causal_lm_run_resumes(lm_setup):
    """SIGKILL a two-process FSDP run after a checkpoint (gathered to process 0); the
    FSDP resume gives the uninterrupted one-process student; a DDP resume is refused."""
    path, d = lm_setup
    ov = ["train.steps=30", "train.checkpoint_every=3", "train.eval_every=10"]
    clean, killed = d["tmp"] / "clean_f", d["tmp"] / "killed_f"
    _run(_dk("run", str(path), *ov, "--out", str(clean)))
    ckpt = killed / "student" / "checkpoint.pt"
    _kill_after(_fsdp(_accelerate(2, "run", str(path), *ov, "--out", str(killed))), ckpt)
    res = subprocess.run(
        _accelerate(2, "run", str(path), *ov, "--out", str(killed), "--resume"),
        capture_output=True, text=True, timeout=900, env=ENV,
    )  # fmt: skip
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1 and "with FSDP" in errors[0], res.stderr
    _run(_fsdp(_accelerate(2, "run", str(path), *ov, "--out", str(killed), "--resume")))
    _one_resume(killed / "student" / "metrics.jsonl")
    w = "student/model/model.safetensors"
    assert _max_diff(clean / w, killed / w) <= 1e-4
    assert round(_val(clean), 3) == round(_val(killed), 3)


@pytest.mark.slow
def test_killed_two_process_causal_lm_run_resumes(lm_setup):
    """SIGKILL a two-process run after a checkpoint; resuming it with two processes gives
    the uninterrupted one-process student."""
    path, d = lm_setup
    ov = ["train.steps=30", "train.checkpoint_every=3", "train.eval_every=10"]
    clean, killed = d["tmp"] / "clean", d["tmp"] / "killed"
    _run(_dk("run", str(path), *ov, "--out", str(clean)))
    ckpt = killed / "student" / "checkpoint.pt"
    done = killed / "student" / "result.json"
    _kill_then_resume(partial(_torchrun, 2), ["run", str(path), *ov], killed, ckpt, done)
    _one_resume(killed / "student" / "metrics.jsonl")
    w = "student/model/model.safetensors"
    assert _max_diff(clean / w, killed / w) <= 1e-4
    assert round(_val(clean), 3) == round(_val(killed), 3)


def _text_recipe(tmp_path: Path, **train) -> Path:
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "recipes" / "tiny-bert_to_l2_sst2-smoke.yaml").read_text())
    raw["data"].update(path=str(SHARED / "sst2"), train_subset=92, dev_subset=32,
                       test_subset=32)  # fmt: skip
    raw["teacher"]["finetune"].update(batch_size=16)
    raw["teacher"]["tiny"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raw["train"].update(
        batch_size=13, checkpoint_every=3
    )  # 92 = 7 × 13 + 1: uneven slices, and an empty one
    raw["variants"] = [{"name": "distilled"}]
    raw["eval"] = {"speed": False}
    raw["train"].update(train)
    recipe = tmp_path / "text.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


@pytest.fixture(scope="module")
def text_one(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("text")
    recipe = _text_recipe(tmp)
    _run(_dk("run", str(recipe), "--out", str(tmp / "one")))
    return recipe, tmp / "one"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_text_two_processes_equals_one(text_one, tmp_path, fsdp):
    """DDP, or FSDP2 (a unit per encoder layer, the step module around them): the
    fine-tuned teacher and the distilled student are the one-process ones."""
    recipe, one = text_one
    cmd = _accelerate(2, "run", str(recipe), "--out", str(tmp_path / "two"))
    _run(_fsdp(cmd) if fsdp else cmd)
    how = "FSDP" if fsdp else "DDP"
    for part in ("teacher/model", "students/distilled/seed0/model"):
        diff = _max_diff(one / part / "model.safetensors",
                         tmp_path / "two" / part / "model.safetensors")  # fmt: skip
        print(f"text {how} {part}: max |w1 - w2| = {diff:.2e}")
        assert diff <= 1e-4, (part, diff)
    res = [json.loads((r / "students/distilled/seed0/result.json").read_text())
           for r in (one, tmp_path / "two")]  # fmt: skip
    acc = [r["test_accuracy"] for r in res]
    nll = [r["test"]["nll"] for r in res]  # finer than the accuracy of a tiny model
    print(
        f"text {how} student test accuracy {acc[0]:.4f} / {acc[1]:.4f}, "
        f"NLL {nll[0]:.5f} / {nll[1]:.5f}"
    )
    assert round(acc[0], 3) == round(acc[1], 3)
    assert round(nll[0], 3) == round(nll[1], 3)
    if fsdp:  # each process held about half of the student
        full = load_file(str(one / "students/distilled/seed0/model/model.safetensors"))
        total = sum(v.numel() * v.element_size() for v in full.values())
        held = res[1]["fit"]["param_bytes_per_process"]
        print(f"text FSDP student bytes: full {total}, per process {held}")
        assert all(0.4 * total <= b <= 0.6 * total for b in held), (held, total)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_killed_two_process_text_run_resumes(tmp_path, fsdp):
    """SIGKILL a two-process text run during student training; resumed with two
    processes (the same way: DDP, or FSDP with the checkpoint gathered to process 0)
    it ends with the uninterrupted one-process student."""
    recipe = _text_recipe(tmp_path, epochs=4)
    _run(_dk("run", str(recipe), "--out", str(tmp_path / "clean")))
    killed = tmp_path / "killed"
    ckpt = killed / "students" / "distilled" / "seed0" / "checkpoint.pt"

    def launch(*args):
        return _fsdp(_accelerate(2, *args)) if fsdp else _torchrun(2, *args)

    _kill_then_resume(launch, ["run", str(recipe)], killed, ckpt, ckpt.parent / "result.json")
    part = "students/distilled/seed0/model/model.safetensors"
    assert _max_diff(tmp_path / "clean" / part, killed / part) <= 1e-4
    res = [json.loads((r / "students/distilled/seed0/result.json").read_text())
           for r in (tmp_path / "clean", killed)]  # fmt: skip
    assert round(res[0]["test"]["nll"], 3) == round(res[1]["test"]["nll"], 3)
