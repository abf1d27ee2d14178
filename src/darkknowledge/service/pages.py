"""The dashboard: server-rendered pages (Jinja2, autoescaped) over the same functions as
the API. Log in with a token once; it is kept in an HttpOnly, SameSite=Strict cookie."""

from __future__ import annotations

import time
from typing import Annotated

import yaml
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import DictLoader, Environment, select_autoescape
from sqlalchemy import select

from ..errors import DKError
from ..recipe_io import parse_yaml
from . import jobs
from .auth import find_token
from .db import FINISHED, Job, Token
from .deps import COOKIE, DB, SettingsDep

EXAMPLE = """\
data: {name: digits}
teacher:
  kind: module
  model: {name: mlp, hidden: [64]}
  train: {epochs: 3, batch_size: 64}
student: {model: {name: mlp, hidden: [16]}}
loss: {hinton_kd: {temperature: 4.0, alpha: 0.9}}
train: {epochs: 3, batch_size: 64}
eval: {latency: false}
"""

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}{% endblock %} · darkknowledge</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70rem;padding:1rem 2rem;color:#222}
 header{display:flex;gap:1.5rem;align-items:baseline;border-bottom:1px solid #ddd;margin-bottom:1rem}
 header a{color:#333;text-decoration:none} table{border-collapse:collapse;margin:.5rem 0}
 td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left}
 .num{text-align:right;font-variant-numeric:tabular-nums}
 .state{padding:.1rem .45rem;border-radius:.3rem;background:#eee}
 .succeeded{background:#d4f4d4}.failed{background:#fbd5d5}.running{background:#dbe9ff}
 .cancelled{background:#f1e6c9} .error{color:#a00;white-space:pre-wrap}
 textarea{width:100%;font:13px monospace} pre{background:#f6f6f6;padding:.6rem;overflow:auto;max-height:22rem}
 progress{width:24rem} img{max-width:32rem;border:1px solid #eee;margin:.3rem}
</style></head><body>
<header><h2><a href="/ui/jobs">darkknowledge</a></h2>
{% if caller %}<span>token: {{ caller.name }}</span>
<form method="post" action="/ui/logout"><button>log out</button></form>{% endif %}
<a href="/docs">API docs</a></header>
{% block body %}{% endblock %}
</body></html>"""

_LOGIN = """{% extends "base" %}{% block title %}Log in{% endblock %}{% block body %}
<h1>Log in</h1>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/ui/login">
 <label>API token <input type="password" name="token" id="token" size="50" autofocus></label>
 <button id="login">Log in</button>
</form>
<p>Get a token on the server with <code>dk serve token create NAME</code>.</p>
{% endblock %}"""

_JOBS = """{% extends "base" %}{% block title %}Jobs{% endblock %}{% block body %}
<h1>Jobs</h1>
<table id="jobs"><tr><th>id</th><th>name</th><th>state</th><th>progress</th><th>created</th><th>error</th></tr>
{% for j in rows %}<tr>
 <td><a href="/ui/jobs/{{ j.id }}">{{ j.id }}</a></td><td>{{ j.name }}</td>
 <td><span class="state {{ j.state }}">{{ j.state }}</span></td>
 <td class="num">{{ "%.0f" % (100 * j.fraction) }}%</td><td>{{ j.created }}</td>
 <td class="error">{{ j.error or "" }}</td></tr>
{% else %}<tr><td colspan="6">no jobs yet</td></tr>{% endfor %}
</table>
<h2>New job</h2>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/ui/jobs" id="new-job">
 <label>Name <input name="name" id="name" value="{{ name }}"></label>
 <p><label>Recipe (YAML, as for <code>dk run</code>)<br>
 <textarea name="recipe" id="recipe" rows="14">{{ recipe }}</textarea></label></p>
 <button id="submit">Submit job</button>
</form>
{% endblock %}"""

_JOB = """{% extends "base" %}{% block title %}Job {{ job.id }}{% endblock %}{% block body %}
<h1>Job {{ job.id }}: {{ job.name }}</h1>
<p>State: <span id="state" class="state {{ job.state }}">{{ job.state }}</span>
 {% if job.cancel_requested and job.state == "running" %}(cancelling){% endif %}
 · attempts {{ job.attempts }}
 {% if not finished %}<form method="post" action="/ui/jobs/{{ job.id }}/cancel" style="display:inline">
 <button id="cancel">Cancel</button></form>{% endif %}</p>
<p><progress id="progress" max="1" value="{{ prog.fraction }}"></progress>
 <span id="percent">{{ "%.0f" % (100 * prog.fraction) }}%</span> <span id="phase">{{ prog.phase or "" }}</span></p>
{% if job.error %}<p class="error" id="job-error">{{ job.error }}</p>{% endif %}
{% if report %}<h2>Report</h2>
<table id="report"><tr><th>model</th><th class="num">test acc %</th><th class="num">NLL</th>
<th class="num">ECE</th><th class="num">teacher agreement %</th><th class="num">params</th><th class="num">KB</th></tr>
{% for name, r in report.rows.items() %}<tr><td>{{ name }}</td>
 <td class="num">{{ "%.2f" % (100 * r.accuracy) }}</td><td class="num">{{ "%.3f" % r.nll }}</td>
 <td class="num">{{ "%.3f" % r.ece }}</td>
 <td class="num">{{ "%.1f" % (100 * r.teacher_agreement) if r.teacher_agreement is defined else "-" }}</td>
 <td class="num">{{ "{:,}".format(r.params) }}</td><td class="num">{{ "%.1f" % (r.bytes / 1024) }}</td></tr>
{% endfor %}</table>
<p>Download: <a id="dl-student" href="/api/v1/jobs/{{ job.id }}/student">student (zip)</a> ·
 <a href="/api/v1/jobs/{{ job.id }}/artifacts/report.json">report.json</a> ·
 <a href="/api/v1/jobs/{{ job.id }}/artifacts/report.md">report.md</a></p>
{% for p in plots %}<img class="plot" alt="{{ p }}" src="/api/v1/jobs/{{ job.id }}/artifacts/{{ p }}">{% endfor %}
{% endif %}
{% for phase, recs in metrics.items() %}{% if recs %}<h2>Metrics: {{ phase }}</h2>
<table class="metrics"><tr><th class="num">epoch</th><th class="num">step</th><th class="num">train loss</th>
<th class="num">val loss</th><th class="num">val acc %</th></tr>
{% for m in recs %}<tr><td class="num">{{ m.epoch }}</td><td class="num">{{ m.step }}</td>
 <td class="num">{{ "%.4f" % m.train_loss if m.train_loss is not none else "-" }}</td>
 <td class="num">{{ "%.4f" % m.val_loss if m.val_loss is defined else "-" }}</td>
 <td class="num">{{ "%.2f" % (100 * m.val_acc) if m.val_acc is defined else "-" }}</td></tr>{% endfor %}
</table>{% endif %}{% endfor %}
<h2>Log</h2><pre id="log">{{ log }}</pre>
<h2>Recipe</h2><pre>{{ recipe }}</pre>
{% if not finished %}<script>
(function poll() {
  fetch("/api/v1/jobs/{{ job.id }}", {credentials: "same-origin"}).then(r => r.json()).then(j => {
    document.getElementById("state").textContent = j.state;
    document.getElementById("progress").value = j.progress.fraction;
    document.getElementById("percent").textContent = Math.round(100 * j.progress.fraction) + "%";
    document.getElementById("phase").textContent = j.progress.phase || "";
    if (["succeeded", "failed", "cancelled"].includes(j.state)) location.reload();
    else setTimeout(poll, 1000);
  }).catch(() => setTimeout(poll, 3000));
})();
</script>{% endif %}
{% endblock %}"""

_MESSAGE = """{% extends "base" %}{% block title %}{{ message }}{% endblock %}{% block body %}
<p class="error" id="error">{{ message }}</p><p><a href="/ui/jobs">back to the jobs</a></p>
{% endblock %}"""

_env = Environment(
    loader=DictLoader(
        {"base": _BASE, "login": _LOGIN, "jobs": _JOBS, "job": _JOB, "message": _MESSAGE}
    ),
    autoescape=select_autoescape(default=True, default_for_string=True),
)

pages = APIRouter(include_in_schema=False)


def _render(template: str, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(_env.get_template(template).render(**ctx), status_code=status)


def _caller(request: Request, db) -> Token | None:
    tok = find_token(db, request.cookies.get(COOKIE))
    db.commit()
    return tok


def _to_login() -> RedirectResponse:
    return RedirectResponse("/ui/login", status_code=303)


@pages.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@pages.get("/ui/login")
def login_page() -> HTMLResponse:
    return _render("login", caller=None, error=None)


@pages.post("/ui/login")
def login(db: DB, token: Annotated[str, Form(max_length=200)] = "") -> HTMLResponse:
    if find_token(db, token.strip()) is None:
        return _render("login", 401, caller=None, error="unknown token")
    resp = RedirectResponse("/ui/jobs", status_code=303)
    resp.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", max_age=30 * 86400)
    return resp


@pages.post("/ui/logout")
def logout() -> RedirectResponse:
    resp = _to_login()
    resp.delete_cookie(COOKIE)
    return resp


def _jobs_page(request, db, settings, caller, status=200, error=None, recipe=EXAMPLE, name=""):
    rows = db.scalars(
        select(Job).where(Job.owner_id == caller.id).order_by(Job.id.desc()).limit(200)
    ).all()
    view = [
        {
            "id": j.id,
            "name": j.name,
            "state": j.state,
            "error": j.error,
            "fraction": jobs.progress(settings, j)["fraction"],
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at)),
        }
        for j in rows
    ]
    return _render("jobs", status, caller=caller, rows=view, error=error, recipe=recipe, name=name)


@pages.get("/ui/jobs", response_model=None)
def jobs_page(request: Request, db: DB, settings: SettingsDep) -> HTMLResponse | RedirectResponse:
    caller = _caller(request, db)
    if caller is None:
        return _to_login()
    return _jobs_page(request, db, settings, caller)


@pages.post("/ui/jobs", response_model=None)
def submit_job(
    request: Request,
    db: DB,
    settings: SettingsDep,
    recipe: Annotated[str, Form(max_length=100_000)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
) -> HTMLResponse | RedirectResponse:
    caller = _caller(request, db)
    if caller is None:
        return _to_login()
    try:
        data = parse_yaml(recipe, "recipe")
        job = jobs.create_job(settings, db, caller, data, name.strip() or None)
    except DKError as e:
        return _jobs_page(request, db, settings, caller, 422, str(e), recipe, name)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


def _page_job(request, db, job_id: int) -> tuple[Token | None, Job | None]:
    caller = _caller(request, db)
    if caller is None:
        return None, None
    job = db.get(Job, job_id) if 1 <= job_id < 2**31 else None  # the id column is 32-bit
    return caller, job if job is not None and job.owner_id == caller.id else None


@pages.get("/ui/jobs/{job_id}", response_model=None)
def job_page(
    job_id: int, request: Request, db: DB, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    caller, job = _page_job(request, db, job_id)
    if caller is None:
        return _to_login()
    if job is None:
        return _render("message", 404, caller=caller, message=f"job {job_id} not found")
    rep = jobs.report(settings, job)
    plots = [p.name for p in sorted(jobs.run_dir(settings, job.id).glob("*.png"))] if rep else []
    return _render(
        "job",
        caller=caller,
        job=job,
        finished=job.state in FINISHED,
        prog=jobs.progress(settings, job),
        report=rep,
        plots=plots,
        metrics=jobs.metrics(settings, job, limit=200),
        log=jobs.log_tail(settings, job, 8192),
        recipe=yaml.safe_dump(job.recipe, sort_keys=False),
    )


@pages.post("/ui/jobs/{job_id}/cancel", response_model=None)
def cancel_page(job_id: int, request: Request, db: DB) -> HTMLResponse | RedirectResponse:
    caller, job = _page_job(request, db, job_id)
    if caller is None:
        return _to_login()
    if job is not None and job.state not in FINISHED:
        jobs.cancel_job(db, job)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)
