"""FastAPI dependencies: settings, a database session, the caller's token, and one per
resource (a job or dataset the caller owns; anyone else's is 404, never 403)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .auth import find_token
from .db import Dataset, Job, Token
from .settings import ServiceSettings

COOKIE = "dk_token"
_bearer = HTTPBearer(auto_error=False, description="a token from `dk serve token create NAME`")


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as db:
        yield db


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
DB = Annotated[Session, Depends(get_db)]


def token_from(request: Request, creds: HTTPAuthorizationCredentials | None) -> str | None:
    if creds is not None:
        return creds.credentials
    return request.cookies.get(COOKIE)  # the dashboard's (HttpOnly, SameSite=Strict)


def current_token(
    request: Request,
    db: DB,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Token:
    tok = find_token(db, token_from(request, creds))
    db.commit()  # end the read: a long request (an upload) must not hold the database
    if tok is None:
        raise HTTPException(
            401,
            "missing or unknown API token: send 'Authorization: Bearer <token>' "
            "(create one with `dk serve token create NAME`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tok


Caller = Annotated[Token, Depends(current_token)]


def owned_job(job_id: Annotated[int, Path(ge=1, le=2**31 - 1)], db: DB, caller: Caller) -> Job:
    job = db.get(Job, job_id)
    if job is None or job.owner_id != caller.id:
        raise HTTPException(404, f"job {job_id} not found")
    return job


def owned_dataset(
    dataset_id: Annotated[str, Path(max_length=64)], db: DB, caller: Caller
) -> Dataset:
    ds = db.get(Dataset, dataset_id) if len(dataset_id) == 32 else None
    if ds is None or ds.owner_id != caller.id:
        raise HTTPException(404, f"dataset {dataset_id} not found")
    return ds


JobDep = Annotated[Job, Depends(owned_job)]
DatasetDep = Annotated[Dataset, Depends(owned_dataset)]
