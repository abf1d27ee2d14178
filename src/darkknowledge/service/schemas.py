"""What the API takes and returns: one schema family per resource."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .db import STATES

Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]*$")]


class JobCreate(BaseModel):
    """A recipe, exactly as ``dk run`` reads it (as JSON), and an optional job name."""

    model_config = ConfigDict(extra="forbid")
    recipe: dict[str, Any] = Field(
        examples=[
            {
                "data": {"name": "digits"},
                "student": {"model": {"name": "mlp", "hidden": [16]}},
                "train": {"epochs": 2, "batch_size": 64},
                "eval": {"latency": False},
            }
        ]
    )
    name: Name | None = None


class PhaseProgress(BaseModel):
    name: str
    step: int
    total: int


class Progress(BaseModel):
    fraction: float = Field(description="0..1 over all training phases")
    phase: str | None = Field(description="the phase training now, if any")
    phases: list[PhaseProgress]


class JobPublic(BaseModel):
    id: int
    name: str
    state: str = Field(description=" | ".join(STATES))
    cancel_requested: bool
    attempts: int = Field(description="starts of this job (a resume after a crash is one more)")
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    progress: Progress
    recipe: dict[str, Any]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="jobs matching the filter, before limit/offset")


class ArtifactPublic(BaseModel):
    name: str
    size: int


class DatasetPublic(BaseModel):
    id: str
    ref: str = Field(description="what to write in a recipe, e.g. data.path")
    filename: str
    size: int
    sha256: str
    files: list[str]
    created_at: float


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class Message(BaseModel):
    detail: str


class Health(BaseModel):
    status: str
    database: str
