"""The ``dk generate`` recipe: prompts → teacher endpoint(s) → verifier → SFT rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..config import RecipePath
from ..errors import DKError


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _plain_template(t: str) -> str:
    import string

    try:
        parts = list(string.Formatter().parse(t))
    except ValueError as e:
        raise ValueError(f"not a template ({e})") from None
    for _, field, spec, conv in parts:
        if field is None:
            continue
        if not field.isidentifier() or spec or conv:
            raise ValueError(
                f"{{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}: only plain "
                "{field} substitution of the row's fields is allowed"
            )
    return t


class PromptsCfg(_M):
    path: RecipePath  # JSONL; a relative path resolves against the recipe's folder
    prompt_field: str = "question"
    answer_field: str | None = "answer"
    id_field: str | None = None  # default: the line number
    # the row's fields by name, {field} only (no attributes, indexes, conversions or
    # format specs: a template never reaches beyond the row's values); {{ }} for braces
    template: Annotated[str, AfterValidator(_plain_template)] = "{question}"
    system: str | None = None  # chat only
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)


class TeacherCfg(_M):
    base_url: list[str] | str | None = None  # one or several endpoints; env DK_TEACHER_BASE_URL
    model: str | None = None  # env DK_TEACHER_MODEL
    api: Literal["chat", "completions"] = "chat"
    api_key: SecretStr | None = None  # prefer api_key_env: a key in a recipe ends up in git
    api_key_env: str = "DK_TEACHER_API_KEY"
    max_top_logprobs: int = Field(20, ge=0)  # the server's cap (OpenAI: 20)

    def urls(self) -> list[str]:
        raw = self.base_url or os.environ.get("DK_TEACHER_BASE_URL", "")
        urls = [raw] if isinstance(raw, str) else list(raw)
        urls = [u.strip() for part in urls for u in part.split(",") if u.strip()]
        if not urls:
            raise DKError(
                "teacher.base_url: not set; give it in the recipe or in DK_TEACHER_BASE_URL"
            )
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise DKError(f"teacher.base_url: {u!r} is not an http(s) URL")
        return urls

    def model_name(self) -> str:
        m = self.model or os.environ.get("DK_TEACHER_MODEL")
        if not m:
            raise DKError("teacher.model: not set; give it in the recipe or in DK_TEACHER_MODEL")
        return m

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(self.api_key_env) or os.environ.get("OPENAI_API_KEY")


# the request fields dk generate writes itself (sampling.extra_body may not set them);
# stream: the client reads whole answers
OWN_FIELDS = frozenset(
    "model messages prompt n temperature top_p max_tokens max_completion_tokens seed stop "
    "logprobs top_logprobs stream stream_options".split()
)


class SamplingCfg(_M):
    n: int = Field(4, ge=1, le=128)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = 0
    stop: list[str] | None = None
    top_logprobs: int = Field(0, ge=0)  # > 0: capture logprobs (top-k per token)
    # when set, sent instead of max_tokens (which is then unused): hosted reasoning
    # models take only this one (chat API)
    max_completion_tokens: int | None = Field(None, ge=1)
    # free fields merged into every request body (a server's own sampling knobs, e.g.
    # vLLM's top_k, min_p, repetition_penalty, chat_template_kwargs); part of the cache key
    extra_body: dict[str, Any] | None = None

    @field_validator("extra_body")
    @classmethod
    def _extra_body(cls, v):
        for k in v or {}:
            if k in OWN_FIELDS:
                raise ValueError(
                    f"{k!r} is a field dk generate sets itself"
                    + (f" (use sampling.{k})" if k in cls.model_fields else "")
                )
        return v or None

    def dump(self) -> dict:
        """What describes the sampling in results and recipe.json (fields left unset that
        older versions did not have are left out, so their runs continue unchanged)."""
        d = self.model_dump(mode="json")
        for k in ("max_completion_tokens", "extra_body"):
            if d[k] is None:
                del d[k]
        return d

    def body(self, api: str, top_logprobs: int) -> dict:
        b = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p}
        if self.max_completion_tokens is not None:
            b["max_completion_tokens"] = self.max_completion_tokens
        else:
            b["max_tokens"] = self.max_tokens
        if self.seed is not None:
            b["seed"] = self.seed
        if self.stop:
            b["stop"] = self.stop
        if top_logprobs > 0:
            if api == "chat":
                b["logprobs"], b["top_logprobs"] = True, top_logprobs
            else:
                b["logprobs"] = top_logprobs
        b.update(self.extra_body or {})
        return b


class VerifierCfg(_M):
    name: str = "gsm8k"
    params: dict = Field(default_factory=dict)


class SelectCfg(_M):
    keep: Literal["correct", "all", "first"] = "correct"  # correct = rejection sampling
    shortest: bool = False  # keep only the shortest kept sample per prompt
    max_per_prompt: int | None = Field(None, ge=1)
    # the rows of sft.jsonl (each also has id, sample, reference, teacher, sampling,
    # verdict): response = prompt/response strings (dk's own form); messages = TRL's
    # conversational language-modelling form [system?, user, assistant]; prompt_completion
    # = TRL's prompt/completion (message lists for a chat teacher, strings for completions)
    format: Literal["response", "messages", "prompt_completion"] = "response"


class ClientCfg(_M):
    concurrency: int = Field(16, ge=1, le=1024)
    max_attempts: int = Field(6, ge=1)
    backoff_s: float = Field(0.5, ge=0.0)
    max_backoff_s: float = Field(30.0, ge=0.0)
    timeout_s: float = Field(120.0, gt=0.0)


class BudgetCfg(_M):
    max_tokens: int | None = Field(None, ge=1)
    max_cost: float | None = Field(None, gt=0.0)
    price_input_per_m: float = Field(0.0, ge=0.0)  # currency units per million tokens
    price_output_per_m: float = Field(0.0, ge=0.0)


class GenerateRecipe(_M):
    prompts: PromptsCfg
    teacher: TeacherCfg = Field(default_factory=TeacherCfg)
    sampling: SamplingCfg = Field(default_factory=SamplingCfg)
    verifier: VerifierCfg = Field(default_factory=VerifierCfg)
    select: SelectCfg = Field(default_factory=SelectCfg)
    client: ClientCfg = Field(default_factory=ClientCfg)
    budget: BudgetCfg = Field(default_factory=BudgetCfg)
    cache: RecipePath | None = None  # default: OUT/cache.jsonl
    _base_dir: Path | None = PrivateAttr(None)  # the recipe file's folder, for relative paths

    @model_validator(mode="after")
    def _remember_base(self, info: ValidationInfo):
        base = (info.context or {}).get("base_dir") if info.context else None
        self._base_dir = Path(base) if base else None
        return self

    @model_validator(mode="after")
    def _api_fields(self):
        if self.teacher.api == "completions" and self.sampling.max_completion_tokens is not None:
            raise ValueError(
                "sampling.max_completion_tokens is a chat API field; the completions API "
                "takes sampling.max_tokens"
            )
        return self

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v):
        return v or None

    def public_dump(self) -> dict:
        """The resolved recipe without the API key (what goes on disk)."""
        d = self.model_dump(mode="json")
        d["teacher"].pop("api_key", None)
        d["sampling"] = self.sampling.dump()
        return d


def load_generate_recipe(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[GenerateRecipe, Path]:
    from ..recipe_io import format_validation_error, read_recipe

    path = Path(path)
    data = read_recipe(path, overrides)
    fam = data.pop("family", "generate")
    if fam != "generate":
        raise DKError(f"{path}: family {fam!r}: dk generate takes 'family: generate' recipes")
    try:
        rec = GenerateRecipe.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        raise DKError(format_validation_error(e, data, str(path))) from None
    return rec, path.resolve().parent


def resolve_path(p: str | Path, base_dir: Path | None) -> Path:
    """A path of a recipe: resolved against the recipe's folder at validation, as in
    every family (a relative one given from Python resolves against ``base_dir``)."""
    q = Path(p).expanduser()
    if q.is_absolute() or base_dir is None:
        return q
    return base_dir / q
