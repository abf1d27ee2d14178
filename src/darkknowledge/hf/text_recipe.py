"""The ``text`` recipe family: DistilBERT-style compression of a transformer encoder on a
text-classification task.

One recipe = an (optionally fine-tuned) teacher, its signals stored once on the training
set, and one or more named student *variants* (layer-copy init or random init, each with
its own loss weights: the distilled student, the same student without distillation, the
ablations), each trained for every seed. Unknown keys are refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..config import ExistingPath, Fraction, PosFloat, PosInt, RecipePath, Strict

NonNeg = Annotated[float, Field(ge=0.0)]

# Teachers by name (a local model a package ships); anything else is a path, or
# ``tiny:<name>`` for a tiny random model from darkknowledge.hf.io.TINY (tests).
TEACHER_SOURCES = ("minilm-l6",)


class TextData(Strict):
    # folder holding the split files; None when the splits come from Python
    # (``run_text_recipe(..., splits=(train, dev, test))``, e.g. from ``from_datasets``)
    path: ExistingPath | None = None
    train: str = "train.tsv"
    dev: str = "dev.tsv"
    test: str = "test.tsv"
    text_key: str | None = None  # default: sentence or text
    label_key: str = "label"
    max_length: PosInt = 64
    train_subset: PosInt | None = None  # a seeded random subset of the training split
    subset_seed: int = 0
    dev_subset: PosInt | None = None
    test_subset: PosInt | None = None


class FinetuneConfig(Strict):
    epochs: PosFloat = 2.0
    batch_size: PosInt = 32
    lr: PosFloat = 5.0e-5
    weight_decay: NonNeg = 0.01
    warmup: Fraction = 0.06
    seed: int = 0
    eval_every: PosInt | None = None  # steps between dev evaluations (default: each epoch)
    checkpoint_every: PosInt = 200  # steps between resumable checkpoints


class TeacherConfig(Strict):
    source: str  # minilm-l6 | a model folder | tiny:<name>
    # a classifier folder to use as the fine-tuned teacher (skips fine-tuning)
    checkpoint: ExistingPath | None = None
    finetune: FinetuneConfig | None = None  # fine-tune the teacher on the task first
    tiny: dict[str, int | float | str] = Field(
        default_factory=dict
    )  # config overrides for tiny:<name>


class StudentConfig(Strict):
    layers: list[Annotated[int, Field(ge=0)]] | None = None  # default: every other layer
    init: Literal["teacher", "random"] = "teacher"


class SoftConfig(Strict):
    weight: NonNeg = 1.0
    temperature: PosFloat = 2.0


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


class TextLoss(Strict):
    soft: SoftConfig | None = None  # soft targets on the task logits
    hard: WeightConfig | None = WeightConfig()  # cross-entropy on the labels
    cosine: CosineConfig | None = None
    attention: AttentionConfig | None = None  # teacher runs during training

    @model_validator(mode="after")
    def _something(self):
        active = [k for k in ("soft", "hard", "cosine", "attention") if getattr(self, k)]
        if not any(getattr(self, k).weight > 0 for k in active):
            raise ValueError("loss: at least one term with a weight > 0 is needed")
        return self

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self, k) is not None for k in ("soft", "cosine", "attention"))

    @property
    def online_teacher(self) -> bool:
        """Terms the store cannot serve: per-token hidden states, attention maps."""
        return self.attention is not None or (
            self.cosine is not None and self.cosine.pool == "tokens"
        )


class TrainConfig(Strict):
    # students train on a seeded subset of this many training examples (default: all);
    # only these are labelled by the teacher
    examples: PosInt | None = None
    examples_seed: int = 0
    epochs: PosFloat = 3.0
    batch_size: PosInt = 32
    lr: PosFloat = 1.0e-4
    weight_decay: NonNeg = 0.01
    warmup: Fraction = 0.06
    eval_every: PosInt | None = None  # steps between dev evaluations (default: each epoch)
    checkpoint_every: PosInt = 200  # steps between resumable checkpoints


class Variant(Strict):
    """A named student: ``init`` and ``loss`` default to the recipe's."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    init: Literal["teacher", "random"] | None = None
    loss: TextLoss | None = None
    seeds: list[int] | None = None  # default: the recipe's seeds (or --seeds)
    about: str = ""


class EvalConfig(Strict):
    speed: bool = True  # in-process CPU timing of teacher and student (report table)
    speed_length: PosInt = 64
    speed_runs: PosInt = 20
    batch_size: PosInt = 128


class TextRecipe(Strict):
    name: str = "text"
    data: TextData
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    loss: TextLoss = TextLoss(soft=SoftConfig(), hard=WeightConfig(), cosine=CosineConfig())
    train: TrainConfig = TrainConfig()
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="distilled")])
    seeds: list[int] = Field(default_factory=lambda: [0])
    threads: PosInt | None = None  # torch CPU threads (default: torch's choice)
    eval: EvalConfig = EvalConfig()
    signals_dir: RecipePath | None = None  # where the teacher's store goes (default: run dir)

    @model_validator(mode="after")
    def _check(self):
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
