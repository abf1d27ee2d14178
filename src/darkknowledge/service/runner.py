"""What runs inside a job's child process: the same ``run_recipe`` as ``dk run``.

The worker forks this child after importing the pipeline, so a job starts in
milliseconds. The child validates the job's resolved recipe again, writes the plan
(the phases and their step counts, for progress), and runs with ``resume=True``: a
fresh run starts from nothing, a restarted one continues from its last checkpoint.
Exit status: 0 done, 2 the recipe or its data is wrong, 1 anything else; the last line
of ``log.txt`` says why.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path


def plan_phases(recipe, data) -> list[dict]:
    """Each training phase of ``run_recipe``: folder (relative to the run dir), steps."""

    def steps(n: int, cfg) -> int:
        return cfg.total_steps(math.ceil(n / cfg.batch_size))

    phases = []
    t = recipe.teacher
    if t is not None:
        if t.kind == "store":  # signals read from a store: no teacher network trains
            members = []
        elif t.kind == "module":
            members = [("teacher", t)]
        else:
            members = [(f"teacher/member_{i}", m) for i, m in enumerate(t.members)]
        for folder, m in members:
            if m.checkpoint is None:
                cfg = m.train if m.seed is None else m.train.model_copy(update={"seed": m.seed})
                phases.append({"name": folder, "dir": folder, "total": steps(len(data.train), cfg)})
    name = "distil" if t is not None else "student"
    phases.append(
        {"name": name, "dir": "student", "total": steps(len(data.transfer), recipe.train)}
    )
    if t is not None and recipe.eval.plain_baseline:
        phases.append(
            {"name": "plain", "dir": "plain", "total": steps(len(data.train), recipe.train)}
        )
    return phases


def plan_family_phases(name: str, recipe) -> list[dict]:
    """The training phases of a text or causal_lm run (steps where the recipe fixes them)."""
    phases = []
    if name == "causal_lm":
        t = recipe.teacher
        if getattr(t, "train", None) is not None:
            phases.append({"name": "teacher", "dir": "teacher", "total": t.train.steps})
        phases.append({"name": "student", "dir": "student", "total": recipe.train.steps})
        return phases
    d = recipe.data
    n = d.student_examples or d.train_subset

    def total(cfg, n):
        return cfg.total_steps(math.ceil(n / cfg.batch_size)) if n else cfg.steps

    if recipe.teacher.finetune is not None and recipe.teacher.checkpoint is None:
        ft = recipe.teacher.finetune
        phases.append({"name": "teacher", "dir": "teacher", "total": total(ft, d.train_subset)})
    for v in recipe.variants:
        for s in v.seeds or recipe.seeds:
            phases.append({"name": f"{v.name}/seed{s}", "dir": f"students/{v.name}/seed{s}",
                           "total": total(recipe.train, n)})  # fmt: skip
    return phases


def _write_plan(job_dir: Path, phases: list[dict]) -> None:
    tmp = job_dir / "plan.json.tmp"
    tmp.write_text(json.dumps({"phases": phases}))
    os.replace(tmp, job_dir / "plan.json")


def run_job(job_dir: Path, resolved: dict, threads: int) -> int:
    """Run one job in this (child) process. Returns the exit status."""
    import torch

    from ..data import load_data
    from ..errors import DKError
    from ..families import runner, validate_family
    from ..pipeline import run_recipe

    torch.set_num_threads(threads)
    try:
        name, recipe = validate_family(resolved, source="job recipe")
        if name != "classify":  # text, causal_lm: the family's own dk run
            _write_plan(job_dir, plan_family_phases(name, recipe))
            text = runner(name)(recipe, job_dir / "run", resume=True)
            print(f"done: {text.splitlines()[0] if text else name}", flush=True)
            return 0
        data = load_data(recipe.data)
        _write_plan(job_dir, plan_phases(recipe, data))
        res = run_recipe(recipe, job_dir / "run", resume=True)
        rows = {k: round(v["accuracy"], 4) for k, v in res.report["rows"].items()}
        print(f"done: test accuracy {rows}", flush=True)
        return 0
    except DKError as e:
        print(f"error: {e}", flush=True)
        return 2
    except MemoryError:
        print("error: out of memory; lower train.batch_size or use a smaller model", flush=True)
        return 1
    except Exception as e:  # the job fails with the reason; the worker lives on
        traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e}", flush=True)
        return 1


def child_main(job_dir: Path, resolved: dict, threads: int, log_path: Path) -> None:
    """Entry point of the forked child: output to the job's log, then exit."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from ..console import configure
    from ..errors import DKError

    try:
        configure()  # progress and info lines go to the job's log
        code = run_job(job_dir, resolved, threads)
    except DKError as e:  # a bad DK_PROGRESS_EVERY_S
        print(f"error: {e}", flush=True)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
