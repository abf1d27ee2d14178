"""The ``causal_lm`` recipe family: strict pydantic models, unknown keys refused.

::

    family: causal_lm
    name: shakespeare_char_fkl
    data: {kind: text, path: ../../../shared/data/tinyshakespeare/input.txt, block_size: 64}
    tokenizer: {kind: char}            # or {kind: path, path: ../../../shared/data/tokenizers/gpt2}
    teacher:                           # trained here first with plain CE when `train` is set
      model: {tiny: tiny-gpt2, config: {n_layer: 4, n_head: 4, n_embd: 128}}
      train: {steps: 2000, batch_size: 12, lr: 1.0e-3}
      placement: replicate             # or shard: 1/N per process under several processes
    student:
      model: {tiny: tiny-gpt2, config: {n_layer: 2, n_head: 4, n_embd: 64}}
    train: {steps: 2000, batch_size: 12, lr: 1.0e-3}
    distill: {mode: token, loss: {kind: forward_kl}}

Models come from a local folder (``path``) or a tiny GPT-2 / LLaMA built from a config
by registry name (``tiny``, see :data:`darkknowledge.hf.io.TINY`); the vocabulary size
of a tiny model is the tokenizer's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from ..blackbox.echo import ServedTeacherSpec
from ..config import (
    EvalConfig,
    ExistingPath,
    Fraction,
    LabelConfig,
    PosFloat,
    PosInt,
    Seed,
    Strict,
    Temperature,
    TrainConfig,
    check_tiny_config,
    with_defaults,
)

NonNeg = Annotated[float, Field(ge=0.0)]


class TinyModel(Strict):
    tiny: Literal["tiny-gpt2", "tiny-llama"]
    config: dict[str, int | float | str | bool] = Field(default_factory=dict)
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # tiny-gpt2's three dropouts

    @model_validator(mode="after")
    def _sizes(self):
        check_tiny_config(self.config, "model.config")
        return self


class PathModel(Strict):
    path: ExistingPath


def _model_kind(v) -> str:
    if isinstance(v, dict):
        return "tiny" if "tiny" in v else "path"
    return "tiny" if isinstance(v, TinyModel) else "path"


# tagged by which key is given, so an error names that form only
ModelSpec = Annotated[
    Annotated[TinyModel, Tag("tiny")] | Annotated[PathModel, Tag("path")],
    Discriminator(_model_kind),
]


class TextData(Strict):
    """Plain text cut into blocks: the first ``1 − val_fraction`` of the tokens train,
    the rest validates (random blocks for training, consecutive ones for validation)."""

    kind: Literal["text"]
    path: ExistingPath
    block_size: PosInt = 64
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    val_blocks: PosInt | None = 200  # validate on at most this many blocks (None: all)
    # random: blocks at random offsets each step (nanoGPT); blocks: the fixed,
    # non-overlapping blocks in a seeded order per epoch (what a store labels)
    sampling: Literal["random", "blocks"] = "random"


class ChatData(Strict):
    """Prompt/response rows, or TRL's ``messages`` / ``prompt``-``completion`` rows (told
    apart by a file's first row: ``lm.data.read_chat``), in JSONL, JSON, CSV, TSV, Parquet
    or a ``datasets`` ``save_to_disk`` folder (:mod:`darkknowledge.rows`), rendered with
    each model's own chat template; the loss is on the response tokens only."""

    kind: Literal["chat"]
    train: ExistingPath
    val: ExistingPath | None = None  # default: the last val_fraction of train
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    prompt_key: str = "prompt"
    response_key: str = "response"
    max_length: PosInt = 512
    # with teacher.kind store (a `dk store from-api` store): the fields that name each
    # row's prompt id and sample index (``dk generate``'s sft.jsonl has both)
    id_key: str = "id"
    sample_key: str = "sample"


DataSpec = Annotated[TextData | ChatData, Field(discriminator="kind")]


class TokenizerSpec(Strict):
    """``char``: a character-level tokenizer of the text data; ``path``: a folder (a
    model's, or GPT-2 BPE vocab.json + merges.txt). Without it each model folder's own
    tokenizer is used."""

    kind: Literal["char", "path"]
    path: ExistingPath | None = None

    @model_validator(mode="after")
    def _path(self):
        if self.kind == "path" and self.path is None:
            raise ValueError("tokenizer kind 'path' needs path: FOLDER")
        if self.kind == "char" and self.path is not None:
            raise ValueError("tokenizer kind 'char' takes no path (it is built from the data)")
        return self


# the causal_lm family's defaults for ``train:`` (and a teacher's ``train:``): nanoGPT's
# CPU setting (AdamW β2 0.99, 100 warm-up steps, cosine to lr/10, decay on matrices only)
TRAIN_DEFAULTS = {
    "steps": 2000,
    "batch_size": 12,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup": 100,
    "weight_decay": 0.1,
    "decay": "matrices",
    "beta2": 0.99,
    "grad_clip": 1.0,
    "schedule": "cosine",
    "eval_every": 250,
    "checkpoint_every": 250,
}


class LoraSpec(Strict):
    r: PosInt = 8
    alpha: PosFloat = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class TeacherSpec(Strict):
    kind: Literal["model"] = "model"
    model: ModelSpec
    train: TrainConfig | None = None  # set: train it here first (plain CE), then distil
    # under several processes: every process holds the whole teacher (replicate), or
    # 1/N of its parameters, all-gathered block by block on forward (shard, FSDP2)
    placement: Literal["replicate", "shard"] = "replicate"

    @model_validator(mode="after")
    def _trainable(self):
        if isinstance(self.model, TinyModel) and self.train is None:
            raise ValueError(
                "a tiny teacher starts from random weights: give teacher.train to train it "
                "first, or teacher.model.path for a trained one"
            )
        return self


class EnsembleTeacherSpec(Strict):
    """Several causal LMs over one vocabulary as one teacher (each a ``model`` teacher,
    trained here first when it has ``train:``); their next-token distributions are
    averaged (``prob_mean``) or their logits (``logit_mean``), with optional weights."""

    kind: Literal["ensemble"]
    members: Annotated[list[TeacherSpec], Field(min_length=2)]
    combine: Literal["prob_mean", "logit_mean"] = "prob_mean"
    weights: list[PosFloat] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(
                f"weights: {len(self.weights)} weights for {len(self.members)} members"
            )
        for i, m in enumerate(self.members):
            if m.placement != "replicate":
                raise ValueError(f"members.{i}.placement: an ensemble's members are replicated")
        return self

    @property
    def placement(self) -> str:
        return "replicate"


class StoreTeacherSpec(Strict):
    """Token signals written once: by ``dk label`` on a causal_lm recipe (the fixed blocks
    of the same text and tokenizer; fingerprint-checked), or by ``dk store from-api`` from
    an API teacher's top log-probs (on chat data: rows joined by prompt id and sample)."""

    kind: Literal["store"]
    path: ExistingPath
    expect: dict[str, str | float | int | None] = Field(default_factory=dict)


class StudentSpec(Strict):
    model: ModelSpec
    lora: LoraSpec | None = None


def _registered(kind: str) -> str:
    from ..losses.registry import get_divergence

    get_divergence(kind)  # ValueError: unknown divergence 'x'; known: ...
    return kind


class LossSpec(Strict):
    """A registered divergence (darkknowledge.losses.registry) by name, per token."""

    kind: Annotated[str, AfterValidator(_registered)] = "forward_kl"
    temperature: Temperature = 1.0
    beta: Fraction = 0.5
    skew: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    kd_weight: NonNeg = 1.0
    ce_weight: NonNeg = 0.0


class DistillSpec(Strict):
    """``none``: plain CE (the baseline); ``token``: token-level KD on the data;
    ``gkd``: a fraction ``lmbda`` of the batches are student-sampled continuations scored
    by the teacher (Agarwal et al. 2024), β (``loss.beta``, kind jsd) picks the divergence;
    on text data the prompts are the first ``prompt_tokens`` of blocks, on chat rows the
    rows' prompts (their responses replaced by the student's samples);
    ``seqkd``: CE on teacher-generated text (Kim & Rush 2016)."""

    mode: Literal["none", "token", "gkd", "seqkd"] = "token"
    loss: LossSpec = LossSpec()
    chunk: PosInt = 1024  # token positions per LM-head chunk
    lmbda: Fraction = 0.5  # gkd: fraction of on-policy batches
    prompt_tokens: PosInt = 16  # gkd/seqkd on text data: prompt length taken from a block
    # gkd/seqkd: tokens sampled per continuation (gkd on chat rows: the most a sampled
    # response has; it ends at the first end-of-sequence token)
    gen_tokens: PosInt = 48
    sample_temperature: Temperature = 1.0
    seqkd_sequences: PosInt = 2048  # seqkd: teacher continuations generated once


class LMRecipe(Strict):
    name: str = "lm"
    seed: Seed = 0
    data: DataSpec
    tokenizer: TokenizerSpec | None = None
    teacher: (
        Annotated[
            TeacherSpec | EnsembleTeacherSpec | StoreTeacherSpec | ServedTeacherSpec,
            Field(discriminator="kind"),
        ]
        | None
    ) = None
    student: StudentSpec
    train: TrainConfig = TrainConfig(**TRAIN_DEFAULTS, epochs=None)
    distill: DistillSpec = DistillSpec(mode="none")
    eval: EvalConfig = EvalConfig()
    label: LabelConfig | None = None  # used by `dk label`; defaults when absent

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("teacher"), dict) and "kind" not in data["teacher"]:
            data["teacher"] = {"kind": "model", **data["teacher"]}
        data["train"] = with_defaults(data.get("train"), TRAIN_DEFAULTS)
        tr = data["train"]
        if isinstance(tr, dict) and tr.get("seed") is not None:
            # the student's seed is the recipe's ``seed:``; ``train.seed`` (every other
            # family's name for it) says the same, and two different values are refused
            if data.get("seed") is None:
                data["seed"] = tr["seed"]
            elif data["seed"] != tr["seed"]:
                raise ValueError(
                    f"seed {data['seed']} and train.seed {tr['seed']}: the student's seed is "
                    "given twice; keep one (dk run --seeds runs several)"
                )
        t = data.get("teacher")
        if isinstance(t, dict) and t.get("train") is not None:
            data["teacher"] = {**t, "train": with_defaults(t["train"], TRAIN_DEFAULTS)}
        if isinstance(t, dict) and isinstance(t.get("members"), list):
            data["teacher"] = {**t, "members": [
                {**m, "train": with_defaults(m["train"], TRAIN_DEFAULTS)}
                if isinstance(m, dict) and m.get("train") is not None else m
                for m in t["members"]
            ]}  # fmt: skip
        return data

    def _member_names(self) -> list[tuple[str, TeacherSpec]]:
        """(key prefix, spec) of each teacher model: ``""`` or ``"members.i."``."""
        if isinstance(self.teacher, EnsembleTeacherSpec):
            return [(f"members.{i}.", m) for i, m in enumerate(self.teacher.members)]
        return [("", m) for m in self.teacher_members()]

    def teacher_members(self) -> list[TeacherSpec]:
        """The teacher models: one, an ensemble's members, or none (no teacher, a store)."""
        if isinstance(self.teacher, TeacherSpec):
            return [self.teacher]
        if isinstance(self.teacher, EnsembleTeacherSpec):
            return list(self.teacher.members)
        return []

    @model_validator(mode="after")
    def _consistent(self):
        trains = [("train", self.train)]
        trains += [(f"teacher.{w}train", m.train) for w, m in self._member_names()]
        for where, tr in trains:
            if tr is not None and tr.augment != "none":
                raise ValueError(
                    f"{where}.augment: image augmentation does not apply to language models; remove it"
                )
        mode = self.distill.mode
        if isinstance(self.teacher, StoreTeacherSpec):
            if isinstance(self.data, TextData) and self.data.sampling != "blocks":
                raise ValueError(
                    "teacher.kind store: a store holds the fixed blocks it labelled; set "
                    "data.sampling: blocks (as when it was labelled)"
                )
            if mode != "token":
                raise ValueError(
                    f"teacher.kind store serves distill.mode token, not {mode!r} (gkd and "
                    "seqkd need the teacher to score or write new text)"
                )
        if isinstance(self.teacher, ServedTeacherSpec):
            if mode not in ("token", "gkd"):
                raise ValueError(
                    f"teacher.kind api scores given tokens (completions echo): distill.mode "
                    f"token or gkd, not {mode!r} (for sequence-level KD from its answers: "
                    "dk generate, then its sft.jsonl as chat data)"
                )
            if self.distill.loss.temperature != 1.0:
                raise ValueError(
                    "teacher.kind api: the served log-probs are at temperature 1; set "
                    "distill.loss.temperature: 1"
                )
        if mode != "none" and self.teacher is None:
            raise ValueError(f"distill.mode {mode!r} needs a teacher: section")
        if self.tokenizer is not None and self.tokenizer.kind == "char":
            if not isinstance(self.data, TextData):
                raise ValueError("tokenizer kind 'char' needs text data (data.kind: text)")
        models = [self.student.model] + [m.model for m in self.teacher_members()]
        if self.tokenizer is None and any(isinstance(m, TinyModel) for m in models):
            raise ValueError("a tiny model needs a tokenizer: section (char or path)")
        if isinstance(self.teacher, EnsembleTeacherSpec) and mode == "seqkd":
            raise ValueError(
                "distill.mode 'seqkd' samples text from one teacher model; an ensemble "
                "teaches through its distributions (mode token or gkd)"
            )
        if mode == "seqkd" and not isinstance(self.data, TextData):
            raise ValueError("distill.mode 'seqkd' runs on text data in this version")
        if isinstance(self.data, TextData) and mode in ("gkd", "seqkd"):
            d = self.distill
            if d.prompt_tokens + d.gen_tokens > self.data.block_size + 1:
                raise ValueError(
                    f"distill.prompt_tokens + gen_tokens ({d.prompt_tokens + d.gen_tokens}) "
                    f"must be ≤ data.block_size + 1 ({self.data.block_size + 1})"
                )
        return self
