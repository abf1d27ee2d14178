"""The causal_lm family end to end on tiny models: pre-flight, training modes, resume,
chat data with two chat templates, LoRA, save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from darkknowledge.errors import DKError
from darkknowledge.families import validate_family
from darkknowledge.hf import io as hfio
from darkknowledge.lm import models as M
from darkknowledge.lm import pipeline as P
from darkknowledge.lm.data import IGNORE, ChatSet, collate, encode_chat

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKES = SHARED / "tinyshakespeare" / "input.txt"
GPT2_TOK = SHARED / "tokenizers" / "gpt2"

pytestmark = pytest.mark.skipif(not SHAKES.exists(), reason="TinyShakespeare not present")

TINY_T = {"tiny": "tiny-gpt2", "config": {"n_layer": 2, "n_head": 2, "n_embd": 32}}
TINY_S = {"tiny": "tiny-gpt2", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
FAST = {"steps": 6, "batch_size": 4, "warmup": 1, "eval_every": 3, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("data") / "shakes.txt"
    f.write_text(SHAKES.read_text()[:20_000])
    return f


def recipe(text: Path, **over) -> dict:
    r = {
        "family": "causal_lm",
        "name": "t",
        "data": {"kind": "text", "path": str(text), "block_size": 16, "val_blocks": 8},
        "tokenizer": {"kind": "char"},
        "teacher": {"model": TINY_T, "train": FAST},
        "student": {"model": TINY_S},
        "train": FAST,
        "distill": {"mode": "token", "loss": {"kind": "forward_kl"}},
    }
    r.update(over)
    return r


def run(d: dict, out: Path, **kw) -> str:
    _, rec = validate_family(d)
    return P.run_lm_recipe(rec, out, **kw)


def test_vocab_mismatch_stops_before_any_training(text, tmp_path):
    bad_t = {"tiny": "tiny-gpt2", "config": {**TINY_T["config"], "vocab_size": 100}}
    d = recipe(text, teacher={"model": bad_t, "train": FAST})
    with pytest.raises(DKError) as e:
        run(d, tmp_path / "r")
    msg = str(e.value)
    n = len(set(text.read_text()))  # the char tokenizer: one id per character + 2 specials
    assert "vocabulary mismatch" in msg and "has 100 outputs" in msg and f"student's {n + 2}" in msg
    assert "\n" not in msg
    assert not (tmp_path / "r" / "teacher").exists()  # nothing trained


def test_tokenizer_mismatch_is_named(text):
    """Same size, different tokens: refused, naming the first differing token."""
    from darkknowledge.lm.preflight import check_pair

    own = hfio.char_tokenizer(text.read_text())
    n = len(own) - 2
    other = hfio.char_tokenizer("".join(chr(0x100 + i) for i in range(n)))
    assert len(other) == len(own)
    m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(own), n_layer=1)
    with pytest.raises(DKError, match="tokenizer mismatch: teacher tokenizer has"):
        check_pair(m, other, m, own, chat=False)


def test_token_kd_run_saves_reloadable_models(text, tmp_path):
    out = tmp_path / "r"
    txt = run(recipe(text), out)
    assert "teacher val loss" in txt and "student seed" in txt
    rep = json.loads((out / "report.json").read_text())
    assert rep["students"]["0"]["steps"] == 6
    pre = json.loads((out / "preflight.json").read_text())
    assert pre["vocab"] == len(set(text.read_text())) + 2 and pre["memory_estimate"]["total"] > 0
    for folder in (out / "teacher" / "model", out / "student" / "model"):
        m = hfio.load_model(folder, "AutoModelForCausalLM")
        tok = hfio.load_tokenizer(folder)
        ids = tok("To be", return_tensors="pt").input_ids
        assert m(ids).logits.shape == (1, 5, pre["vocab"])
    assert not (out / "student" / P.CKPT).exists()
    # the saved student's val loss is the reported one (reload gives the same model)
    m = hfio.load_model(out / "student" / "model", "AutoModelForCausalLM")
    s_tok, t_tok, t = P.load_tokenizers(validate_family(recipe(text))[1])
    data = P.Data(validate_family(recipe(text))[1], s_tok, t_tok, t)
    assert P.val_loss(m, data) == pytest.approx(rep["students"]["0"]["val_loss"], abs=1e-5)
    # a second run refuses to mix, --resume skips the finished phases
    with pytest.raises(DKError, match="already exists"):
        run(recipe(text), out)
    assert run(recipe(text), out, resume=True) == txt


def test_resume_equals_uninterrupted(text, tmp_path, monkeypatch):
    d = recipe(text, distill={"mode": "token", "loss": {"kind": "jsd", "beta": 0.3}})
    run(d, tmp_path / "a")
    ref = hfio.load_model(tmp_path / "a" / "student" / "model", "AutoModelForCausalLM")

    calls = {"n": 0}
    real = P.LMTask.forward

    def crash_once(self, *a, **k):
        if self.desc.startswith("student"):
            calls["n"] += 1
            if calls["n"] == 5:  # during step 5, after the step-3 checkpoint
                raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(P.LMTask, "forward", crash_once)
    with pytest.raises(KeyboardInterrupt):
        run(d, tmp_path / "b")
    assert (tmp_path / "b" / "student" / P.CKPT).exists()
    monkeypatch.setattr(P.LMTask, "forward", real)
    run(d, tmp_path / "b", resume=True)
    res = json.loads((tmp_path / "b" / "student" / "result.json").read_text())
    assert res["resumed_from"] == 3
    got = hfio.load_model(tmp_path / "b" / "student" / "model", "AutoModelForCausalLM")
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def _spy_on_sampling(monkeypatch) -> dict:
    """Records every sampling call (the sampling model's width, prompts, output) and, for
    each student training step, its micro-batches beside the data's for the same step."""
    seen: dict = {"samples": [], "steps": []}
    sample, step_batches = P.sample_continuations, P.LMTask._step_batches

    def spy_sample(model, prompts, *a, **k):
        out = sample(model, prompts, *a, **k)
        width = M.unwrap(model).config.n_embd
        seen["samples"].append((width, prompts.clone(), out.clone()))
        return out

    def spy_steps(self, step):
        batches, on_policy = step_batches(self, step)
        if self.desc.startswith("student"):
            cfg = self.cfg
            data, _ = self.data.batches(cfg.seed, step, cfg.batch_size, cfg.grad_accum)
            seen["steps"].append(
                (on_policy, [b.input_ids for b, _ in batches], [b.input_ids for b, _ in data])
            )
        return batches, on_policy

    monkeypatch.setattr(P, "sample_continuations", spy_sample)
    monkeypatch.setattr(P.LMTask, "_step_batches", spy_steps)
    return seen


def test_gkd_and_seqkd_train_on_sampled_text(text, tmp_path, monkeypatch):
    """GKD: about lmbda of the steps train on the student's own continuations of data
    prompts (the divergence alone), the others on the data blocks. Seq-KD: every step
    trains on the teacher's continuations, generated once and saved, never on the data."""
    run(recipe(text), tmp_path / "base")
    teacher = {"model": {"path": str(tmp_path / "base" / "teacher" / "model")}}
    t_width, s_width = TINY_T["config"]["n_embd"], TINY_S["config"]["n_embd"]
    steps, lmbda, prompt = 12, 0.5, 4
    seen = _spy_on_sampling(monkeypatch)
    g = recipe(
        text,
        teacher=teacher,
        train={**FAST, "steps": steps, "log_every": 1},
        distill={"mode": "gkd", "lmbda": lmbda, "prompt_tokens": prompt, "gen_tokens": 13,
                 "loss": {"kind": "jsd", "beta": 0.9}},
    )  # fmt: skip
    run(g, tmp_path / "g")
    res = json.loads((tmp_path / "g" / "student" / "result.json").read_text())
    assert res["steps"] == steps and len(seen["steps"]) == steps
    on = [s for s in seen["steps"] if s[0]]
    assert res["on_policy_steps"] == len(on)
    assert 0 < len(on) < steps  # a mix, as lmbda asks
    assert abs(len(on) - lmbda * steps) <= 3 * (steps * lmbda * (1 - lmbda)) ** 0.5
    # on-policy batches are the student's samples: data prompts, sampled continuations
    samples = [(w, out) for w, _, out in seen["samples"]]
    assert len(samples) == sum(len(b) for _, b, _ in on)
    assert {w for w, _ in samples} == {s_width}  # the student sampled, not the teacher
    it = iter(samples)
    for _, batches, data in on:
        for b, d in zip(batches, data, strict=True):
            assert torch.equal(b, next(it)[1][:, :-1])
            assert torch.equal(b[:, :prompt], d[:, :prompt])
            assert not torch.equal(b[:, prompt:], d[:, prompt:])
    for _, batches, data in (s for s in seen["steps"] if not s[0]):  # off-policy: the data
        assert all(torch.equal(b, d) for b, d in zip(batches, data, strict=True))
    logged = [json.loads(x) for x in (tmp_path / "g" / "student" / "metrics.jsonl").open()]
    stat = [r["loss/on_policy"] for r in logged if "loss/on_policy" in r]  # one per step
    assert stat == [float(s[0]) for s in seen["steps"]]

    seen["samples"].clear(), seen["steps"].clear()
    s = recipe(
        text,
        teacher=teacher,
        distill={"mode": "seqkd", "prompt_tokens": prompt, "gen_tokens": 13,
                 "seqkd_sequences": 70},
    )  # fmt: skip
    run(s, tmp_path / "s")
    parts = sorted((tmp_path / "s" / "seqkd").glob("part-*.pt"))
    seq = torch.cat([torch.load(f, weights_only=True) for f in parts])
    assert seq.shape == (70, prompt + 13)
    # generated by the teacher, once, and saved as generated
    assert {w for w, _, _ in seen["samples"]} == {t_width}
    assert torch.equal(seq, torch.cat([out for _, _, out in seen["samples"]]))
    rows = {tuple(r.tolist()) for r in seq[:, :-1]}
    assert len(seen["steps"]) == FAST["steps"]
    for on_policy, batches, data in seen["steps"]:
        assert not on_policy
        for b, d in zip(batches, data, strict=True):
            assert all(tuple(r.tolist()) in rows for r in b)  # teacher text, every row
            assert not torch.equal(b, d)  # not the data blocks


def test_lora_student_trains_adapters_and_saves_merged(text, tmp_path):
    d = recipe(text, student={"model": TINY_S, "lora": {"r": 2, "target_modules": ["c_attn"]}})
    run(d, tmp_path / "l")
    res = json.loads((tmp_path / "l" / "student" / "result.json").read_text())
    assert 0 < res["trainable_params"] < res["params"]
    m = hfio.load_model(tmp_path / "l" / "student" / "model", "AutoModelForCausalLM")
    assert not any("lora" in k for k in m.state_dict())


def test_chat_data_masks_prompt_and_padding_each_with_its_own_template(tmp_path):
    rows = [
        {"prompt": "Who art thou?", "response": "A man."},
        {"prompt": "Speak.", "response": "I will not speak of it."},
        {"prompt": "What news?", "response": "None, my lord."},
        {"prompt": "Well?", "response": "Well."},
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    alphabet = "".join(
        sorted(set("".join(r["prompt"] + r["response"] for r in rows) + "<>|:suerastinU\n"))
    )
    s_tok = hfio.char_tokenizer(alphabet)
    t_tok = hfio.char_tokenizer(alphabet)
    s_tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    t_tok.chat_template = (
        "{% for m in messages %}|{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}|assistant: {% endif %}"
    )
    pairs = [(r["prompt"], r["response"]) for r in rows]
    se, te = encode_chat(pairs, s_tok, 64, "x"), encode_chat(pairs, t_tok, 64, "x")
    sb, tb = collate(se, s_tok.pad_token_id), collate(te, t_tok.pad_token_id)
    # labels only on response tokens, the same tokens in the same order for both
    assert torch.equal(sb.labels[sb.valid], tb.labels[tb.valid])
    assert s_tok.decode(sb.labels[0][sb.valid[0]]) == "A man.\n"
    assert (sb.labels[sb.attention_mask == 0] == IGNORE).all()
    # and a run on it: the pair is accepted with different templates
    for name, tok in (("s", s_tok), ("t", t_tok)):
        m = hfio.build_tiny("tiny-gpt2", "AutoModelForCausalLM", vocab_size=len(tok), n_layer=1)
        hfio.save_pretrained(m, tmp_path / name, tok)
    d = {
        "family": "causal_lm",
        "data": {"kind": "chat", "train": str(f), "val_fraction": 0.25, "max_length": 48},
        "teacher": {"model": {"path": str(tmp_path / "t")}},
        "student": {"model": {"path": str(tmp_path / "s")}},
        "train": {**FAST, "steps": 2},
        "distill": {"mode": "token", "loss": {"kind": "tvd", "ce_weight": 0.5}},
    }
    run(d, tmp_path / "r")
    pre = json.loads((tmp_path / "r" / "preflight.json").read_text())
    assert pre["chat_template"].startswith("different")
    # a template that renders the response itself differently cannot be paired token by
    # token: a one-line error, not a silently misaligned loss
    t_tok.chat_template = t_tok.chat_template.replace("\n", "")
    with pytest.raises(DKError, match="tokenise the response differently"):
        ChatSet(se, encode_chat(pairs, t_tok, 64, "x"))


@pytest.mark.skipif(not GPT2_TOK.exists(), reason="GPT-2 tokenizer not present")
def test_gpt2_bpe_recipe_validates_and_runs(tmp_path):
    root = Path(__file__).resolve().parents[2]
    from darkknowledge.families import load_family_recipe

    over = ["train.steps=2", "train.eval_every=2", "teacher.train.steps=2",
            "teacher.train.eval_every=2", "data.val_blocks=2"]  # fmt: skip
    _, rec, _ = load_family_recipe(root / "recipes/lm/shakespeare_gpt2_bpe.yaml", over)
    P.run_lm_recipe(rec, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "preflight.json").read_text())["vocab"] == 50257


def test_bad_recipes_are_one_line_errors(text):
    with pytest.raises(DKError, match="needs a teacher"):
        validate_family(recipe(text, teacher=None))
    with pytest.raises(DKError, match="tiny teacher starts from random"):
        validate_family(recipe(text, teacher={"model": TINY_T}))
    bad = recipe(text)
    bad["train"] = {**FAST, "stepz": 3}
    with pytest.raises(DKError, match="stepz"):
        validate_family(bad)
    with pytest.raises(DKError, match=r"seed 1 and train\.seed 2"):
        validate_family(recipe(text, seed=1, train={**FAST, "seed": 2}))


def test_train_seed_is_the_student_seed(text):
    """``train.seed=N`` (the override every family takes) seeds the causal_lm student; it
    was silently replaced by the recipe's ``seed:`` (0)."""
    assert validate_family(recipe(text, train={**FAST, "seed": 3}))[1].seed == 3
    assert validate_family(recipe(text, seed=4))[1].seed == 4
    assert validate_family(recipe(text, seed=5, train={**FAST, "seed": 5}))[1].seed == 5


def test_text_is_tokenised_in_pieces_with_the_same_ids(text):
    from darkknowledge.lm.data import tokenize_text

    t = SHAKES.read_text()[:60_000]
    toks = [hfio.char_tokenizer(t)]
    if GPT2_TOK.exists():
        toks.append(hfio.load_tokenizer(GPT2_TOK))
    for tok in toks:
        whole = tok(t, add_special_tokens=False)["input_ids"]
        assert tokenize_text(tok, t, piece=4096).tolist() == whole


def test_live_teacher_gives_the_loss_hidden_states_not_logits(text, tmp_path, monkeypatch):
    """A token-KD step runs the teacher's body only (no LM head over the sequence, no
    graph): the loss gets its final hidden states and projects them a chunk at a time."""
    from transformers import GPT2LMHeadModel

    from darkknowledge.lm.losses import HeadTeacher

    seen, inside, full = [], [False], []
    real_loss, real_micro = P.chunked_head_loss, P.LMTask._micro_loss
    real_forward = GPT2LMHeadModel.forward

    def loss_spy(rows, *a, teacher=None, **kw):
        if teacher is not None:
            seen.append((teacher, rows.shape[0]))
        return real_loss(rows, *a, teacher=teacher, **kw)

    def micro_spy(self, *a, **kw):
        inside[0] = True
        try:
            return real_micro(self, *a, **kw)
        finally:
            inside[0] = False

    def forward_spy(self, *a, **kw):
        full.append(inside[0])
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(P, "chunked_head_loss", loss_spy)
    monkeypatch.setattr(P.LMTask, "_micro_loss", micro_spy)
    monkeypatch.setattr(GPT2LMHeadModel, "forward", forward_spy)
    d = recipe(text, distill={"mode": "token", "loss": {"kind": "forward_kl"}, "chunk": 8})
    run(d, tmp_path / "r")
    assert seen and not any(full)  # no model's LM head ran on a whole batch in a step
    for teacher, n in seen:
        assert isinstance(teacher, HeadTeacher)
        (h,) = teacher.hidden
        assert h.shape == (n, TINY_T["config"]["n_embd"]) and h.grad_fn is None
