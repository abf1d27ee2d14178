"""The ``text`` recipe family: DistilBERT-style compression of a transformer encoder on a
text-classification task.

One recipe = an (optionally fine-tuned) teacher, its signals stored once on the training
set, and one or more named student *variants* (layer-copy init or random init, each with
its own loss weights: the distilled student, the same student without distillation, the
ablations), each trained for every seed. Unknown keys are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from ..config import (
    EvalConfig,
    ExistingPath,
    GenericDivergenceConfig,
    PosInt,
    RecipePath,
    Seed,
    Strict,
    Temperature,
    TrainConfig,
    check_tiny_config,
    divergence_terms,
    with_defaults,
)

NonNeg = Annotated[float, Field(ge=0.0)]

# Teachers by name (a local model a package ships); anything else is a path, or
# ``tiny:<name>`` for a tiny random model from darkknowledge.hf.io.TINY (tests).
TEACHER_SOURCES = ("minilm-l6",)


class TextData(Strict):
    # folder holding the split files (each .tsv, .csv, .jsonl, .json, .parquet or a
    # datasets save_to_disk folder, e.g. a saved DatasetDict's split folders: train,
    # validation, test); None when the splits come from Python
    # (``run_text_recipe(..., splits=(train, dev, test))``, e.g. from ``from_datasets``)
    path: ExistingPath | None = None
    train: str = "train.tsv"
    dev: str = "dev.tsv"
    test: str = "test.tsv"
    text_key: str | None = None  # default: sentence or text
    label_key: str = "label"
    # class names in id order (e.g. [negative, positive] for SST-2): saved students carry
    # them as id2label / label2id (default: the dataset's own names, else LABEL_0 ...)
    label_names: list[Annotated[str, Field(min_length=1)]] | None = None
    max_length: PosInt = 64
    train_subset: PosInt | None = None  # a seeded random subset of the training split
    subset_seed: Seed = 0
    dev_subset: PosInt | None = None
    test_subset: PosInt | None = None
    # students train on a seeded subset of this many training examples (default: all);
    # only these are labelled by the teacher
    student_examples: PosInt | None = None
    student_examples_seed: Seed = 0

    @model_validator(mode="after")
    def _names(self):
        n = self.label_names
        if n is not None and (len(n) < 2 or len(set(n)) != len(n)):
            raise ValueError("data.label_names: two or more distinct class names")
        return self


# the text family's defaults for ``train:`` and ``teacher.finetune:`` (BERT's recipe:
# AdamW, linear warm-up over 6 % of the steps then linear decay, clipping at 1, no weight
# decay on biases and norms)
TRAIN_DEFAULTS = {
    "epochs": 3.0,
    "batch_size": 32,
    "lr": 1.0e-4,
    "weight_decay": 0.01,
    "decay": "matrices",
    "warmup": 0.06,
    "schedule": "linear",
    "grad_clip": 1.0,
    "checkpoint_every": 200,
}
FINETUNE_DEFAULTS = {**TRAIN_DEFAULTS, "epochs": 2.0, "lr": 5.0e-5}


def _source(v: str, info: ValidationInfo) -> str:
    """A model folder named as the source goes through the service's path rules."""
    resolve = (info.context or {}).get("resolve_path")
    if resolve is None or v in TEACHER_SOURCES or v.startswith("tiny:"):
        return v
    return str(resolve(Path(v)))


class TeacherConfig(Strict):
    source: Annotated[str, AfterValidator(_source)]  # minilm-l6 | a model folder | tiny:<name>
    # a classifier folder to use as the fine-tuned teacher (skips fine-tuning)
    checkpoint: ExistingPath | None = None
    finetune: TrainConfig | None = None  # fine-tune the teacher on the task first
    tiny: dict[str, int | float | str] = Field(
        default_factory=dict
    )  # config overrides for tiny:<name>

    @model_validator(mode="after")
    def _sizes(self):
        check_tiny_config(self.tiny, "teacher.tiny")
        return self


class StudentConfig(Strict):
    layers: list[Annotated[int, Field(ge=0)]] | None = None  # default: every other layer
    init: Literal["teacher", "random"] = "teacher"


class SoftConfig(Strict):
    weight: NonNeg = 1.0
    temperature: Temperature = 2.0


class WeightConfig(Strict):
    weight: NonNeg = 1.0


class CosineConfig(Strict):
    weight: NonNeg = 1.0
    # {student layer: teacher layer}; 0 = embeddings; default: last → last
    layer_map: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = None
    # tokens: per token (the teacher runs during training); mean / cls: pooled vectors,
    # stored once with the teacher's logits
    pool: Literal["tokens", "mean", "cls"] = "mean"


class AttentionConfig(Strict):
    weight: NonNeg = 1.0
    layer_map: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None


class HintConfig(CosineConfig):
    """A FitNet-style hint: MSE between the projected student and the teacher hidden
    states (Romero et al. 2015), same layer map and pooling as ``cosine``."""


class TextLoss(Strict):
    soft: SoftConfig | None = None  # soft targets on the task logits
    hard: WeightConfig | None = WeightConfig()  # cross-entropy on the labels
    cosine: CosineConfig | None = None
    hint_mse: HintConfig | None = None
    attention: AttentionConfig | None = None  # teacher runs during training
    # any registered divergence on the task logits, by name (darkknowledge.losses.registry)
    divergences: dict[str, GenericDivergenceConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data):
        return divergence_terms(data, set(cls.model_fields))

    @model_validator(mode="after")
    def _something(self):
        for name, c in self.divergences.items():
            c.params(name)
        terms = [getattr(self, k) for k in ("soft", "hard", "cosine", "hint_mse", "attention")]
        terms = [t for t in terms if t is not None] + list(self.divergences.values())
        if not any(t.weight > 0 for t in terms):
            raise ValueError("loss: at least one term with a weight > 0 is needed")
        if self.cosine and self.hint_mse and self.cosine.layer_map != self.hint_mse.layer_map:
            raise ValueError(
                "loss: cosine and hint_mse share one projection: give the same layer_map"
            )
        return self

    @property
    def hidden(self) -> CosineConfig | None:
        """The hidden-state term's layer map and pooling (cosine and/or hint_mse)."""
        return self.cosine or self.hint_mse

    @property
    def needs_teacher(self) -> bool:
        return bool(self.divergences) or any(
            getattr(self, k) is not None for k in ("soft", "cosine", "hint_mse", "attention")
        )

    @property
    def online_teacher(self) -> bool:
        """Terms the store cannot serve: per-token hidden states, attention maps."""
        return self.attention is not None or (
            self.hidden is not None and self.hidden.pool == "tokens"
        )


class Variant(Strict):
    """A named student: ``init`` and ``loss`` default to the recipe's."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    init: Literal["teacher", "random"] | None = None
    loss: TextLoss | None = None
    seeds: list[Seed] | None = None  # default: the recipe's seeds (or --seeds)
    about: str = ""


class TextRecipe(Strict):
    name: str = "text"
    data: TextData
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    loss: TextLoss = TextLoss(soft=SoftConfig(), hard=WeightConfig(), cosine=CosineConfig())
    train: TrainConfig = TrainConfig(**TRAIN_DEFAULTS)
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="distilled")])
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    threads: PosInt | None = None  # torch CPU threads (default: torch's choice)
    eval: EvalConfig = EvalConfig(latency_runs=20)
    signals_dir: RecipePath | None = None  # where the teacher's store goes (default: run dir)

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        t = data.get("teacher")
        if isinstance(t, dict) and "kind" in t:
            if t["kind"] != "model":
                raise ValueError(
                    f"teacher.kind {t['kind']!r}: the text family's teacher is a model "
                    "(teacher.source) or its stored signals (signals_dir, written by dk label)"
                )
            data["teacher"] = {k: v for k, v in t.items() if k != "kind"}
        data["train"] = with_defaults(data.get("train"), TRAIN_DEFAULTS)
        t = data.get("teacher")
        if isinstance(t, dict) and t.get("finetune") is not None:
            data["teacher"] = {**t, "finetune": with_defaults(t["finetune"], FINETUNE_DEFAULTS)}
        ev = data.get("eval")
        if ev is None or isinstance(ev, dict):
            ev = dict(ev or {})
            if not {"latency_runs", "speed_runs"} & set(ev):
                ev["latency_runs"] = 20  # the text family's default
            data["eval"] = ev
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.train.augment != "none":
            raise ValueError("train.augment: image augmentation does not apply to text")
        if self.eval.sampled is not None:
            raise ValueError("eval.sampled: sampled answers are judged for causal_lm recipes")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if not self.variants:
            raise ValueError("variants: at least one student variant is needed")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a non-empty list of distinct seeds")
        return self

    def variant_loss(self, v: Variant) -> TextLoss:
        return v.loss if v.loss is not None else self.loss

    def variant_init(self, v: Variant) -> str:
        return v.init or self.student.init
