"""The HTTP API (``/api/v1``), its OpenAPI spec (``/openapi.json``, ``/docs``) and the
dashboard (``/ui``). Routes stay thin: the work is in ``jobs.py`` and ``datasets.py``."""

from __future__ import annotations

import io
import zipfile
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from sqlalchemy import func, select, text

from ..errors import DKError, one_line
from . import datasets as ds_mod
from . import jobs
from .db import STATES, Dataset, Job, init_db, make_engine, session_factory
from .deps import DB, Caller, DatasetDep, JobDep, SettingsDep
from .limits import BodyLimit, BodyStats
from .schemas import (
    ArtifactPublic,
    DatasetPublic,
    DatasetsPublic,
    Health,
    JobCreate,
    JobPublic,
    JobsPublic,
    Message,
    Progress,
)
from .settings import ServiceSettings

ERRORS = {
    401: {"model": Message, "description": "no token, or an unknown one"},
    404: {"model": Message, "description": "no such job (or not this token's)"},
}


def job_public(settings: ServiceSettings, job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        name=job.name,
        state=job.state,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        progress=Progress(**jobs.progress(settings, job)),
        recipe=job.recipe,
    )


def dataset_public(ds: Dataset) -> DatasetPublic:
    return DatasetPublic(id=ds.id, ref=f"dataset:{ds.id}", filename=ds.filename, size=ds.size,
                         sha256=ds.sha256, files=ds.files, created_at=ds.created_at)  # fmt: skip


api = APIRouter(prefix="/api/v1")


@api.get("/health", response_model=Health, tags=["service"])
def health(db: DB) -> Health:
    db.execute(text("SELECT 1"))
    return Health(status="ok", database="ok")


# ---------------------------------------------------------------- jobs


@api.post("/jobs", status_code=201, response_model=JobPublic, tags=["jobs"],
          responses={**ERRORS, 422: {"model": Message, "description": "the recipe is invalid"}})  # fmt: skip
def create_job(body: JobCreate, db: DB, caller: Caller, settings: SettingsDep) -> JobPublic:
    """Queue a job: the recipe is validated now (422 with one line naming the key)."""
    job = jobs.create_job(settings, db, caller, body.recipe, body.name)
    return job_public(settings, job)


@api.get("/jobs", response_model=JobsPublic, tags=["jobs"], responses=ERRORS)
def list_jobs(
    db: DB,
    caller: Caller,
    settings: SettingsDep,
    state: Annotated[str | None, Query(description=" | ".join(STATES))] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> JobsPublic:
    """This token's jobs, newest first, optionally only those in one state."""
    if state is not None and state not in STATES:
        raise HTTPException(422, f"state: unknown state {state!r}; use one of {', '.join(STATES)}")
    q = select(Job).where(Job.owner_id == caller.id)
    if state is not None:
        q = q.where(Job.state == state)
    count = db.scalar(select(func.count()).select_from(q.subquery()))
    rows = db.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return JobsPublic(data=[job_public(settings, j) for j in rows], count=count or 0)


@api.get("/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=ERRORS)
def get_job(job: JobDep, settings: SettingsDep) -> JobPublic:
    return job_public(settings, job)


@api.get("/jobs/{job_id}/metrics", tags=["jobs"], responses=ERRORS)
def get_metrics(job: JobDep, settings: SettingsDep) -> dict[str, list[dict]]:
    """Per-epoch records of each training phase (``student``, ``teacher``, ...)."""
    return jobs.metrics(settings, job)


@api.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, tags=["jobs"], responses=ERRORS)
def get_logs(job: JobDep, settings: SettingsDep) -> str:
    """The run's output (the last 64 KB)."""
    return jobs.log_tail(settings, job)


@api.post("/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"],
          responses={**ERRORS, 409: {"model": Message}})  # fmt: skip
def cancel_job(job: JobDep, db: DB, settings: SettingsDep) -> JobPublic:
    """Queued: cancelled at once. Running: stopped within a heartbeat."""
    return job_public(settings, jobs.cancel_job(db, job))


@api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"],
            responses={**ERRORS, 409: {"model": Message}})  # fmt: skip
def delete_job(job: JobDep, db: DB, settings: SettingsDep) -> Response:
    """Delete a job that is not running, with its files."""
    jobs.delete_job(settings, db, job)
    return Response(status_code=204)


@api.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactPublic], tags=["artifacts"],
         responses=ERRORS)  # fmt: skip
def list_artifacts(job: JobDep, settings: SettingsDep) -> list[dict]:
    return jobs.list_artifacts(settings, job)


@api.get("/jobs/{job_id}/artifacts/{name:path}", response_class=FileResponse, tags=["artifacts"],
         responses={**ERRORS, 400: {"model": Message}})  # fmt: skip
def get_artifact(job: JobDep, name: str, settings: SettingsDep) -> FileResponse:
    """One file of the run directory, e.g. ``report.md`` or ``accuracy_vs_size.png``."""
    return FileResponse(jobs.artifact_path(settings, job, name))


@api.get("/jobs/{job_id}/student", tags=["artifacts"],
         responses={**ERRORS, 409: {"model": Message},
                    200: {"content": {"application/zip": {}}}})  # fmt: skip
def get_student(job: JobDep, settings: SettingsDep) -> Response:
    """The trained student as a ZIP: an image student's ``model.safetensors`` +
    ``model.json`` (unzip, ``darkknowledge.load_model(folder)``), or a text / causal_lm
    student's ``save_pretrained`` folder with its tokenizer (unzip,
    ``AutoModelFor...from_pretrained(folder)``)."""
    files = jobs.student_files(settings, job)
    if not files:
        raise jobs.Conflict(f"job {job.id} has no trained student yet (state {job.state})")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f.name)
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="job{job.id}-student.zip"'})  # fmt: skip


@api.get("/jobs/{job_id}/report", tags=["artifacts"],
         responses={**ERRORS, 409: {"model": Message}})  # fmt: skip
def get_report(job: JobDep, settings: SettingsDep) -> dict:
    """``report.json``: test accuracy, NLL, ECE, size and speed of each model."""
    rep = jobs.report(settings, job)
    if rep is None:
        raise jobs.Conflict(f"job {job.id} has no report yet (state {job.state})")
    return rep


# ---------------------------------------------------------------- datasets


@api.post("/datasets", status_code=201, response_model=DatasetPublic, tags=["datasets"],
          openapi_extra={"requestBody": {"required": True, "content": {
              "application/zip": {"schema": {"type": "string", "format": "binary"}},
              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
          responses={**ERRORS, 400: {"model": Message}, 413: {"model": Message}})  # fmt: skip
async def upload_dataset(
    request: Request,
    filename: Annotated[str, Query(max_length=200, description="e.g. mnist.zip")],
    caller: Caller,
    settings: SettingsDep,
) -> DatasetPublic:
    """Upload a ZIP of dataset files as the request body (``curl --data-binary @x.zip``).
    Refer to it in a recipe as ``dataset:<id>`` (e.g. ``data: {name: idx, path: ...}``)."""
    ds_mod.check_filename(filename)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.upload_limit_bytes:
        raise ds_mod.TooLarge(f"upload larger than the limit of {settings.upload_limit_mb:g} MB")
    with request.app.state.sessions() as db:
        ds = await ds_mod.save_upload(settings, db, caller, filename, request.stream())
        return dataset_public(ds)


@api.get("/datasets", response_model=DatasetsPublic, tags=["datasets"], responses=ERRORS)
def list_datasets(db: DB, caller: Caller) -> DatasetsPublic:
    rows = db.scalars(
        select(Dataset).where(Dataset.owner_id == caller.id).order_by(Dataset.created_at.desc())
    ).all()
    return DatasetsPublic(data=[dataset_public(d) for d in rows], count=len(rows))


@api.get("/datasets/{dataset_id}", response_model=DatasetPublic, tags=["datasets"],
         responses=ERRORS)  # fmt: skip
def get_dataset(ds: DatasetDep) -> DatasetPublic:
    return dataset_public(ds)


@api.delete("/datasets/{dataset_id}", status_code=204, tags=["datasets"], responses=ERRORS)
def delete_dataset(ds: DatasetDep, db: DB, settings: SettingsDep) -> Response:
    ds_mod.delete_dataset(settings, db, ds)
    return Response(status_code=204)


# ---------------------------------------------------------------- the app


def _message(status: int):
    def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request that does not fit the schema: 422 with one line naming the field (the
    default handler echoes the input back, and fails on a body that is not UTF-8)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    if first.get("type") == "json_invalid":
        msg = "not valid JSON"
    else:
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return JSONResponse({"detail": one_line(f"{where}: {msg}{more}")}, status_code=422)


def create_app(settings: ServiceSettings) -> FastAPI:
    from .pages import pages

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    init_db(engine)
    app = FastAPI(
        title="darkknowledge job service",
        version="1",
        description="Submit distillation jobs (recipes), watch them, download the student "
        "and its report. Every endpoint but /api/v1/health needs a bearer token.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.body_stats = BodyStats()
    app.add_middleware(BodyLimit, settings=settings, stats=app.state.body_stats)
    app.include_router(api)
    app.include_router(pages)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(DKError, _message(422))
    app.add_exception_handler(jobs.BadName, _message(400))
    app.add_exception_handler(jobs.NotFound, _message(404))
    app.add_exception_handler(jobs.Conflict, _message(409))
    app.add_exception_handler(ds_mod.TooLarge, _message(413))
    app.add_exception_handler(ds_mod.BadUpload, _message(400))
    return app
