"""What the routes and pages do with jobs: validate a submitted recipe under the
service's path policy, create, cancel, delete, and read progress, metrics and files.

A job's folder ``<data_dir>/jobs/<id>/`` holds ``run/`` (the run directory, exactly what
``dk run`` writes), ``log.txt`` (the run's output), ``events.jsonl`` (one line per start
of the job, written by the worker) and ``plan.json`` (the phases and their step counts).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from ..errors import DKError
from ..jsonl import too_deep
from ..recipe_io import MAX_DEPTH, dump_recipe
from .db import CANCELLED, FINISHED, QUEUED, RUNNING, SUCCEEDED, Dataset, Job, Token
from .settings import ServiceSettings

TRAINING_FAMILIES = ("classify", "text", "causal_lm")  # the families a job may run

DATASET_PREFIX = "dataset:"
_DATASET_ID = re.compile(r"^[0-9a-f]{32}$")


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class BadName(Exception):
    """A file or dataset name that tries to leave its folder (HTTP 400)."""


def job_dir(settings: ServiceSettings, job_id: int) -> Path:
    return settings.jobs_dir / str(job_id)


def run_dir(settings: ServiceSettings, job_id: int) -> Path:
    return job_dir(settings, job_id) / "run"


# ---------------------------------------------------------------- path policy


def path_resolver(settings: ServiceSettings, db: Session, owner: Token):
    """The function that maps each path in a submitted recipe, or refuses it.

    Accepted: ``dataset:<id>`` (an upload of this token's), ``<root>:<relative path>``
    (inside the named data root) and an absolute path inside a data root. Everything
    is resolved (``..`` and symlinks) before the check, and checked before anything
    looks at whether the path exists, so a refusal tells nothing about the disk.
    """
    roots = settings.data_roots

    def resolve(p: Path) -> Path:
        s = str(p)
        if s.startswith(DATASET_PREFIX):
            ds_id = s[len(DATASET_PREFIX) :]
            ds = db.get(Dataset, ds_id) if _DATASET_ID.match(ds_id) else None
            if ds is None or ds.owner_id != owner.id:
                raise ValueError(f"no uploaded dataset {ds_id!r} (see GET /api/v1/datasets)")
            return settings.datasets_dir / ds_id
        root_name, sep, rest = s.partition(":")
        if sep and root_name in roots:
            if Path(rest).is_absolute():
                raise ValueError(f"{s!r}: after '{root_name}:' give a path relative to the root")
            candidate = (roots[root_name] / rest).resolve()
        elif p.is_absolute():
            candidate = p.resolve()
        else:
            raise ValueError(
                f"{s!r}: the service needs dataset:<id>, <root>:<relative path> or an "
                f"absolute path inside a data root (roots: {_root_list(roots)})"
            )
        for root in roots.values():
            if candidate.is_relative_to(root):
                if not candidate.exists():
                    raise ValueError(f"{s!r}: no such file or folder in the data root")
                return candidate
        raise ValueError(
            f"{s!r} is outside every data root; use a path inside one of: {_root_list(roots)}"
        )

    return resolve


def _root_list(roots: dict[str, Path]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in roots.items()) or "none configured"


# ---------------------------------------------------------------- jobs


def validate_job_recipe(settings: ServiceSettings, db: Session, owner: Token, recipe: dict) -> dict:
    """The resolved recipe (a plain dict), or a one-line DKError."""
    if not isinstance(recipe, dict):
        raise DKError("recipe: must be a mapping of sections (data:, student:, ...)")
    if too_deep(recipe, MAX_DEPTH):
        raise DKError(f"recipe: nested deeper than {MAX_DEPTH} levels")
    import yaml

    from ..families import family_of, validate_family
    from ..recipe_io import resolve_extends

    resolver = path_resolver(settings, db, owner)
    # a base recipe (extends:) is a path like any other: confined to the data roots
    recipe = resolve_extends(recipe, None, "recipe", resolve_path=resolver)
    fam = family_of(recipe, "recipe")
    if fam not in TRAINING_FAMILIES:
        raise DKError(
            f"family: {fam!r} is not a training recipe; jobs take {', '.join(TRAINING_FAMILIES)}"
        )
    name, r = validate_family(recipe, source="recipe", resolve_path=resolver)
    resolved = yaml.safe_load(dump_recipe(r))
    return resolved if name == "classify" else {"family": name, **resolved}


def create_job(
    settings: ServiceSettings, db: Session, owner: Token, recipe: dict, name: str | None
) -> Job:
    resolved = validate_job_recipe(settings, db, owner, recipe)
    name = str(name or recipe.get("name") or "job")
    name = "".join(ch for ch in name if ch.isprintable())[:200] or "job"  # no NUL for PG
    job = Job(owner_id=owner.id, name=name, recipe=recipe, resolved=resolved)
    db.add(job)
    db.commit()
    db.refresh(job)
    return job


def cancel_job(db: Session, job: Job) -> Job:
    """Queued: cancelled at once. Running: the worker stops it within a heartbeat."""
    if job.state in FINISHED:
        raise Conflict(f"job {job.id} has already finished ({job.state})")
    now = time.time()
    done = db.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == QUEUED)
        .values(state=CANCELLED, finished_at=now, error="cancelled before it started")
    ).rowcount
    if not done:
        db.execute(
            update(Job).where(Job.id == job.id, Job.state == RUNNING).values(cancel_requested=True)
        )
    db.commit()
    db.refresh(job)
    return job


def delete_job(settings: ServiceSettings, db: Session, job: Job) -> None:
    if job.state == RUNNING:
        raise Conflict(f"job {job.id} is running: cancel it first, then delete it")
    n = db.execute(Job.__table__.delete().where(Job.id == job.id, Job.state != RUNNING)).rowcount
    db.commit()
    if not n:
        raise Conflict(f"job {job.id} started running: cancel it first, then delete it")
    shutil.rmtree(job_dir(settings, job.id), ignore_errors=True)


# ---------------------------------------------------------------- progress and files


def _last_step(metrics: Path) -> int:
    """The last logged step in a metrics.jsonl, reading only its tail."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def progress(settings: ServiceSettings, job: Job) -> dict:
    """``{"fraction", "phase", "phases": [{name, step, total}]}`` from the run's files."""
    if job.state == SUCCEEDED:
        return {"fraction": 1.0, "phase": None, "phases": []}
    try:
        plan = json.loads((job_dir(settings, job.id) / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"fraction": 0.0, "phase": None, "phases": []}
    rd = run_dir(settings, job.id)
    phases, done_all, total_all, current = [], 0, 0, None
    for ph in plan["phases"]:
        folder = rd / ph["dir"]
        total = int(ph["total"])
        step = (
            total
            if (folder / "model.safetensors").exists()
            else _last_step(folder / "metrics.jsonl")
        )
        step = min(step, total)
        if current is None and step < total:
            current = ph["name"]
        phases.append({"name": ph["name"], "step": step, "total": total})
        done_all += step
        total_all += total
    return {
        "fraction": round(done_all / total_all, 4) if total_all else 0.0,
        "phase": current,
        "phases": phases,
    }


def metrics(settings: ServiceSettings, job: Job, limit: int = 1000) -> dict[str, list[dict]]:
    """Each phase's per-epoch records (train_loss, val_loss, val_acc)."""
    rd = run_dir(settings, job.id)
    out: dict[str, list[dict]] = {}
    if not rd.is_dir():
        return out
    for f in sorted(rd.glob("**/metrics.jsonl")):
        recs = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "train_loss" in rec:
                recs.append(rec)
        out[str(f.parent.relative_to(rd))] = recs[-limit:]
    return out


def report(settings: ServiceSettings, job: Job) -> dict | None:
    try:
        return json.loads((run_dir(settings, job.id) / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def log_tail(settings: ServiceSettings, job: Job, max_bytes: int = 65536) -> str:
    path = job_dir(settings, job.id) / "log.txt"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def student_files(settings: ServiceSettings, job: Job) -> list[Path]:
    """The files of the job's trained student (empty until it is trained): the image
    student's weights + description, or a transformers student's whole model folder
    (the first variant and seed of a text run)."""
    run = run_dir(settings, job.id)
    fam = (job.resolved or {}).get("family", "classify")
    if fam == "classify":
        files = [run / "student" / "model.safetensors", run / "student" / "model.json"]
        return files if all(f.is_file() for f in files) else []
    if fam == "causal_lm":
        folder = run / "student" / "model"
        done = run / "student" / "result.json"
    else:
        r = job.resolved
        v = r["variants"][0]
        seed = (v.get("seeds") or r["seeds"])[0]
        folder = run / "students" / v["name"] / f"seed{seed}" / "model"
        done = folder.parent / "result.json"
    if not done.is_file() or not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file())


def artifact_path(settings: ServiceSettings, job: Job, name: str) -> Path:
    """A file inside the job's run directory; a name that leaves it is BadName."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BadName(f"bad file name {name!r}: give a path inside the run directory")
    root = run_dir(settings, job.id).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise BadName(f"bad file name {name!r}: it leaves the run directory")
    if not path.is_file():
        raise NotFound(f"job {job.id} has no file {name!r}")
    return path


def list_artifacts(settings: ServiceSettings, job: Job) -> list[dict]:
    rd = run_dir(settings, job.id)
    if not rd.is_dir():
        return []
    return [
        {"name": str(p.relative_to(rd)), "size": p.stat().st_size}
        for p in sorted(rd.rglob("*"))
        if p.is_file() and not p.name.endswith(".tmp")
    ]
