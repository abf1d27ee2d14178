"""Recipes: pydantic models, validated at construction; unknown keys are refused.

Components are chosen by registry name only (``model.name``, ``data.name``,
``teacher.kind``), never by import path, so a recipe can never make the tool run code
that it does not ship. Relative paths resolve against the recipe's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
# Limits every family's recipe shares (docs/limits.md): numbers outside them cannot train
# (a temperature of 1e-300 or 1e30 turns soft targets into NaN or noise; a seed must fit
# the generators' 32 bits)
Temperature = Annotated[float, Field(ge=0.05, le=100.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

_SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "n_inner", "hidden_size",
          "num_attention_heads", "num_hidden_layers", "intermediate_size",
          "num_key_value_heads", "max_position_embeddings", "vocab_size")  # fmt: skip


def check_tiny_config(cfg: dict, where: str) -> dict:
    """A tiny transformer's config overrides: sizes are whole numbers ≥ 1 (under a
    million), and the attention heads divide the width."""
    for k in _SIZES:
        v = cfg.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 10**6):
            raise ValueError(f"{where}.{k}: a whole number from 1 to 999,999, not {v!r}")
    for width, heads in (("n_embd", "n_head"), ("hidden_size", "num_attention_heads")):
        w, h = cfg.get(width), cfg.get(heads)
        if w is not None and h is not None and w % h:
            raise ValueError(f"{where}: {heads}={h} does not divide {width}={w}")
    return cfg


def _resolve(v: Path, info: ValidationInfo) -> Path:
    ctx = info.context or {}
    # A caller that must confine paths (the job service) passes ``resolve_path``: it maps
    # every path in the recipe before anything looks at the file system, and raises
    # ValueError for a path it refuses.
    if ctx.get("resolve_path") is not None:
        return ctx["resolve_path"](v)
    base = ctx.get("base_dir")
    v = v.expanduser()
    if not v.is_absolute() and base is not None:
        v = Path(base) / v
    return v


def _must_exist(v: Path, info: ValidationInfo) -> Path:
    v = _resolve(v, info)
    if not v.exists():
        raise ValueError(
            f"path does not exist: {v} (relative paths resolve against the recipe's folder)"
        )
    return v


RecipePath = Annotated[Path, AfterValidator(_resolve)]
ExistingPath = Annotated[Path, AfterValidator(_must_exist)]


class Strict(BaseModel):
    # allow_inf_nan=False: .inf and .nan are refused everywhere (a run cannot train on them)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------- models


class MLPConfig(Strict):
    name: Literal["mlp"]
    hidden: list[PosInt] = [800, 800]
    dropout: Dropout = 0.0
    input_dropout: Dropout = 0.0
    max_norm: PosFloat | None = None


class LeNet5Config(Strict):
    name: Literal["lenet5"]


class SmallCNNConfig(Strict):
    name: Literal["small_cnn"]
    width: PosInt = 32


class SmallResNetConfig(Strict):
    name: Literal["small_resnet"]
    width: PosInt = 16
    blocks: list[PosInt] = [2, 2, 2]


ModelConfig = Annotated[
    MLPConfig | LeNet5Config | SmallCNNConfig | SmallResNetConfig,
    Field(discriminator="name"),
]

# ---------------------------------------------------------------- data


class TransferConfig(Strict):
    """The transfer set: what the student is distilled on, if not the training set."""

    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    omit_classes: list[Annotated[int, Field(ge=0)]] = []
    labels: bool = True  # False: an unlabelled transfer set (soft targets only)
    # Augmented copies added to the transfer set, drawn once with a fixed seed: the teacher
    # labels every copy once (a store can hold them), the student distils on all of them,
    # and the plain baseline trains on the training set with the same copies (hard labels)
    augment: Literal["none", "jitter", "hflip", "jitter_hflip"] = "none"
    copies: Annotated[int, Field(ge=0)] = 0
    jitter_px: Annotated[int, Field(ge=1, le=8)] = 2

    @model_validator(mode="after")
    def _copies_need_augment(self):
        if (self.copies > 0) != (self.augment != "none"):
            raise ValueError(
                f"data.transfer: copies={self.copies} with augment={self.augment}; set both "
                "(e.g. copies: 4, augment: jitter_hflip) or neither"
            )
        return self


class _DataBase(Strict):
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    split_seed: Seed = 0
    limit: PosInt | None = None  # use only the first N training examples (quick runs)
    transfer: TransferConfig | None = None


class DigitsData(_DataBase):
    """scikit-learn's 8×8 digits (1,797 images), split here into train/val/test."""

    name: Literal["digits"]
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3


class IdxData(_DataBase):
    """A folder in the MNIST IDX layout (train/t10k images and labels, .gz or not)."""

    name: Literal["idx"]
    path: ExistingPath


DataConfig = Annotated[DigitsData | IdxData, Field(discriminator="name")]

# ---------------------------------------------------------------- training


NonNeg = Annotated[float, Field(ge=0.0)]


TRACKERS = {  # train.report_to: tracker name → the package it needs (engine/trackers.py)
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "trackio": "trackio",
}


def tracker_missing(name: str) -> str | None:
    """Why tracker ``name`` cannot run here (None: it can)."""
    import importlib.util

    pkg = TRACKERS[name]
    try:
        found = importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{name} is not installed: pip install {pkg}"


class TrainConfig(Strict):
    """The ``train:`` section of every family's recipe (and of a teacher trained first):
    one class, read by the one engine (:mod:`darkknowledge.engine`).

    A family fills in its own defaults for the keys a recipe leaves out
    (:func:`with_defaults`): a language model trains by ``steps`` with warm-up, a
    classifier by ``epochs``. Length: ``epochs`` passes over the training set and/or
    ``steps`` optimizer steps (both set: the smaller). ``warmup``: steps (≥ 1), or a
    fraction of all steps (< 1). ``decay``: weight decay on every parameter (``all``) or
    only on matrices (``matrices``: not biases, norms, embeddings' 1-D scales)."""

    epochs: PosFloat | None = 10
    steps: PosInt | None = None
    batch_size: PosInt = 128
    # micro-batches per optimizer step and process: batch_size stays the global batch, its
    # share on each process is split into grad_accum forward/backward passes
    grad_accum: PosInt = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: LearningRate = 1e-3
    min_lr: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0  # cosine: the rate it decays to
    weight_decay: NonNeg = 0.0
    decay: Literal["all", "matrices"] = "all"
    beta2: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.999  # adamw
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9  # sgd (Nesterov when > 0)
    schedule: Literal["constant", "cosine", "linear", "one_cycle"] = "cosine"
    warmup: NonNeg = 0.0
    grad_clip: PosFloat | None = None
    # jitter: random translation by up to jitter_px; hflip: random left-right mirror (for
    # images where that keeps the class, e.g. Fashion-MNIST, not digits); jitter_hflip: both
    augment: Literal["none", "jitter", "hflip", "jitter_hflip"] = "none"
    jitter_px: Annotated[int, Field(ge=1, le=8)] = 2
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of the forward passes
    seed: Seed = 0
    checkpoint_every: PosInt | None = None  # steps; None: at the end of every epoch
    eval_every: PosInt | None = None  # steps; None: at the end of every epoch
    log_every: PosInt = 50  # steps between metrics.jsonl lines
    # experiment trackers that get every metrics.jsonl number too (engine/trackers.py);
    # each writes into the model's run folder (tensorboard: FOLDER/tb/)
    report_to: tuple[Literal["tensorboard", "mlflow", "wandb", "trackio"], ...] = ()

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v):
        return [v] if isinstance(v, str) else v  # report_to: tensorboard

    @field_validator("report_to")
    @classmethod
    def _installed(cls, v):
        for name in v:
            why = tracker_missing(name)
            if why is not None:
                raise ValueError(why)
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo):
        d = handler(self)
        if not self.report_to and isinstance(d, dict):
            d.pop("report_to", None)  # recipes without it dump (and fingerprint) as before
        return d

    @model_validator(mode="before")
    @classmethod
    def _legacy_max_steps(cls, data):
        # recipes written before the one engine said max_steps
        if isinstance(data, dict) and "max_steps" in data:
            data = dict(data)
            if data.get("steps") is not None:
                raise ValueError("give steps or max_steps (its older name), not both")
            data["steps"] = data.pop("max_steps")
        return data

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is None and self.steps is None:
            raise ValueError("train: give epochs or steps")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError(
                f"train.warmup={self.warmup}: a number of steps (whole) or a fraction < 1"
            )
        return self

    @property
    def max_steps(self) -> int | None:  # the older name
        return self.steps

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run, given the steps of one epoch."""
        import math

        total = None
        if self.epochs is not None:
            total = max(1, math.ceil(self.epochs * steps_per_epoch))
        if self.steps is not None:
            total = self.steps if total is None else min(total, self.steps)
        return int(total)

    def warmup_steps(self, total: int) -> int:
        if self.warmup <= 0:
            return 0
        if self.warmup < 1:  # a fraction: at least one step
            return max(1, int(self.warmup * total))
        return int(self.warmup)


def with_defaults(section, defaults: dict):
    """A recipe's ``train:`` mapping with a family's defaults under the keys it leaves out.

    ``epochs``/``steps`` count as one choice: a recipe that names either takes neither
    default of the other."""
    if section is None:
        return dict(defaults)
    if not isinstance(section, dict):
        return section  # the schema reports the wrong type
    out = dict(defaults)
    if any(k in section for k in ("epochs", "steps", "max_steps")):
        out.pop("epochs", None)
        out.pop("steps", None)
        out.setdefault("epochs", None)
    out.update(section)
    return out


# ---------------------------------------------------------------- teachers


class MemberConfig(Strict):
    """One network: loaded from ``checkpoint``, or trained first with ``train``."""

    model: ModelConfig
    checkpoint: ExistingPath | None = None
    train: TrainConfig = TrainConfig()
    seed: Seed | None = None  # shorthand for train.seed


class ModuleTeacherConfig(MemberConfig):
    kind: Literal["module"]


class EnsembleTeacherConfig(Strict):
    kind: Literal["ensemble"]
    combine: Literal["prob_mean", "logit_mean"] = "prob_mean"
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None
    members: Annotated[list[MemberConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _weights_match(self):
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but there are "
                    f"{len(self.members)} members: give one weight per member"
                )
            if sum(self.weights) <= 0:
                raise ValueError("weights must not all be 0")
        return self


class StoreTeacherConfig(Strict):
    """Signals written once by ``dk label`` (a folder with manifest.json and shards)."""

    kind: Literal["store"]
    path: ExistingPath
    # Optional pins: fingerprint fields the store must have (e.g. {teacher: <sha256>}).
    expect: dict[str, str | float | int | None] = {}


TeacherConfig = Annotated[
    ModuleTeacherConfig | EnsembleTeacherConfig | StoreTeacherConfig,
    Field(discriminator="kind"),
]


class LabelConfig(Strict):
    """How ``dk label`` stores the teacher's signals for the recipe's transfer set."""

    # auto: dense up to 256 outputs, else top-k. head: the teacher's last hidden state and
    # its output layer (stored once): exact logits at 2·H bytes per example/token in fp16
    # sampled: k draws per position from the teacher at `temperature`, kept as distinct ids
    # + counts (Anshumann et al. 2025); trains forward_kl / hinton_kd without bias
    signal: Literal["auto", "dense", "topk", "head", "sampled"] = "auto"
    # top-k: the k kept; sampled: the draws per position. None: 64 (top-k), 16 (sampled)
    k: PosInt | None = None
    # auto: fp16 for dense logits, q8 (8-bit log-probs) for top-k: with uint16 ids that is
    # 64·3 + 4 ≈ 197 bytes per token, and q8 adds < 0.001 nats of KL (docs/results/store.md)
    dtype: Literal["auto", "fp32", "fp16", "bf16", "q8"] = "auto"
    temperature: Temperature = 1.0
    shard_size: PosInt = 8192  # examples per shard
    batch_size: PosInt = 512
    hidden: list[str] = []  # teacher layers to store too, e.g. [features.3]
    # top-k: also store how the tail mass is spread (one (V,) vector); None: on for tokens
    tail_prior: bool | None = None
    head_layer: str | None = None  # signal=head: the output layer (None: found by itself)
    seed: Seed = 0  # signal=sampled: the draws' seed (a rerun writes the same bytes)


class StudentConfig(Strict):
    model: ModelConfig


# ---------------------------------------------------------------- losses


class HintonKDConfig(Strict):
    temperature: Temperature = 4.0
    alpha: Fraction = 0.9
    weight: Annotated[float, Field(ge=0.0)] = 1.0


class DivergenceConfig(Strict):
    temperature: Temperature = 1.0
    weight: Annotated[float, Field(ge=0.0)] = 1.0


class JSDConfig(DivergenceConfig):
    beta: Fraction = 0.5


class CEConfig(Strict):
    weight: Annotated[float, Field(ge=0.0)] = 1.0


class GenericDivergenceConfig(Strict):
    """Any divergence of the registry (darkknowledge.losses.registry) by its name as the
    key: ``skew_kl: {skew: 0.1, temperature: 2.0}``. ``beta``/``skew`` go to the
    divergences that take them."""

    temperature: Temperature = 1.0
    weight: Annotated[float, Field(ge=0.0)] = 1.0
    beta: Fraction | None = None
    skew: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None

    def params(self, name: str) -> tuple[tuple[str, float], ...]:
        from .losses.registry import get_divergence

        takes = get_divergence(name).params
        given = {"beta": self.beta, "skew": self.skew}
        for k, v in given.items():
            if v is not None and k not in takes:
                raise ValueError(f"loss.{name} takes no {k}")
        return tuple((k, v) for k, v in given.items() if v is not None)


def divergence_terms(data, fixed: set[str]):
    """A loss mapping's keys that name a registered divergence (beyond the section's own
    fields) gathered under ``divergences``; an unknown name is left for the schema to
    report as an unknown key (one line naming it)."""
    if not isinstance(data, dict):
        return data
    from .losses.registry import DIVERGENCES

    data = dict(data)
    # names that are neither a field nor registered stay: the schema reports the key
    extra = {k: data.pop(k) for k in list(data) if k not in fixed and k in DIVERGENCES}
    if extra:
        data["divergences"] = {**data.get("divergences", {}), **extra}
    return data


class LossConfig(Strict):
    hinton_kd: HintonKDConfig | None = None
    forward_kl: DivergenceConfig | None = None
    reverse_kl: DivergenceConfig | None = None
    jsd: JSDConfig | None = None
    tvd: DivergenceConfig | None = None
    ce: CEConfig | None = None
    # any other registered divergence, by name (see divergence_terms)
    divergences: dict[str, GenericDivergenceConfig] = {}

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data):
        return divergence_terms(data, set(cls.model_fields))

    @model_validator(mode="after")
    def _params(self):
        for name, c in self.divergences.items():
            c.params(name)  # a parameter the divergence does not take: one line
        return self

    def active(self) -> dict[str, Strict]:
        fixed = {k: v for k, v in self if v is not None and k != "divergences"}
        return fixed | dict(self.divergences)

    @property
    def needs_teacher(self) -> bool:
        return any(k != "ce" for k in self.active())


# ---------------------------------------------------------------- eval and recipe


class SampledEval(Strict):
    """``eval.sampled`` (causal_lm): after training, ``dk eval`` of the students on
    prompt/answer rows: pass@1 and maj@k of ``k`` samples at ``temperature``, greedy
    accuracy and held-out loss, judged by one of ``dk generate``'s verifiers."""

    data: ExistingPath
    verifier: Literal["gsm8k", "exact", "regex"] = "gsm8k"
    verifier_params: dict[str, str | int | float | bool] | None = None
    k: PosInt = 4
    temperature: Annotated[float, Field(gt=0.0, le=2.0)] = 0.6
    max_new_tokens: PosInt = 64
    prompt_key: str = "question"
    answer_key: str = "answer"
    template: str = "{prompt}"
    limit: PosInt | None = None
    seed: Seed = 0


class EvalConfig(Strict):
    """The ``eval:`` section of every family's recipe: what the report measures."""

    # time the models on the CPU: latency at batch 1 and throughput (classify: batch 256;
    # text: batch 32 at sequence length latency_length); ``speed`` is the text family's
    # older name
    latency: bool = Field(True, validation_alias=AliasChoices("latency", "speed"))
    latency_runs: PosInt = Field(50, validation_alias=AliasChoices("latency_runs", "speed_runs"))
    latency_length: PosInt = Field(
        64, validation_alias=AliasChoices("latency_length", "speed_length")
    )
    batch_size: PosInt = 128  # evaluation batches
    ece_bins: PosInt = 15
    # also train the student without a teacher, same budget (the training set plus
    # data.transfer.copies, if any: see data.plain_training_set)
    plain_baseline: bool = False
    # Extra report row with the student's logit for a class raised by a constant, as in
    # Hinton et al. (2015) §3 after leaving a class out of the transfer set: {3: 3.5}.
    bias_shift: dict[Annotated[int, Field(ge=0)], float] | None = None
    # causal_lm: sample and verify answers after training (``dk eval``), into the report
    sampled: SampledEval | None = None


class Recipe(Strict):
    """One experiment: data → (teacher) → student, trained with ``loss`` and ``train``."""

    name: str | None = None
    data: DataConfig
    teacher: TeacherConfig | None = None
    student: StudentConfig
    loss: LossConfig | None = None
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    label: LabelConfig | None = None  # used by `dk label`; defaults when absent

    @model_validator(mode="after")
    def _loss_fits_teacher(self):
        if self.eval.sampled is not None:
            raise ValueError("eval.sampled: sampled answers are judged for causal_lm recipes")
        if (
            self.teacher is not None
            and self.teacher.kind == "store"
            and self.train.augment != "none"
        ):
            raise ValueError(
                f"train.augment={self.train.augment} cannot be used with a teacher store: "
                "stored signals hold only for the exact inputs that were labelled, and random "
                "augmentation changes them every step; set train.augment=none, or use the "
                "online teacher (teacher.kind: module or ensemble) to distil with augmentation"
            )
        loss = self.loss
        if loss is not None:
            if not loss.active():
                raise ValueError("loss: no loss term is set; add one, e.g. 'ce: {}'")
            if loss.needs_teacher and self.teacher is None:
                names = ", ".join(k for k in loss.active() if k != "ce")
                raise ValueError(
                    f"loss term(s) {names} need a teacher: add a 'teacher:' section, "
                    "or use 'loss: {ce: {}}' for plain training"
                )
        t = self.data.transfer
        if t is not None and self.teacher is None:
            raise ValueError(
                "data.transfer needs a teacher: a transfer set is what "
                "the teacher labels for the student"
            )
        if t is not None and not t.labels and loss is not None and loss.ce is not None:
            raise ValueError("loss.ce needs labels but data.transfer.labels is false")
        return self

    def resolved_loss(self) -> LossConfig:
        """The loss as written, or the default: Hinton KD with a teacher, CE without."""
        if self.loss is not None:
            return self.loss
        if self.teacher is None:
            return LossConfig(ce=CEConfig())
        return LossConfig(hinton_kd=HintonKDConfig())
