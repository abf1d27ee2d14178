"""``dk generate``: prompts → n samples per prompt from the teacher endpoint(s) → verifier
→ rejection sampling → an SFT dataset.

Crash-safe and resumable. Every answer is cached on arrival (see :mod:`.cache`); each
finished prompt is one line appended to ``OUT/results.jsonl`` (all samples with their
verdicts). A rerun reads that file, skips the prompts in it and asks the teacher only for
the rest, whose answers the cache may already hold; so after a SIGKILL every prompt ends
up exactly once and no answered request is sent again. ``OUT/sft.jsonl`` is rebuilt from
the results (atomically) at the end of each run.

The folder is marked by ``OUT/recipe.json`` (``"tool": "darkknowledge"``; older ones by
its ``key`` and ``recipe``), written before any result. A non-empty folder without it is
refused, and ``--force`` deletes only ``results.jsonl``, ``sft.jsonl``, ``summary.json``
and ``recipe.json`` (the cache stays), only in a folder holding nothing else dk generate
does not write, and only once the prompts, verifier and cache have been read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from .. import faults
from ..console import Progress
from ..errors import DKError
from ..jsonl import iter_lines, loads
from .budget import Budget, BudgetExhausted
from .cache import RequestCache
from .client import ApiClient, RetryPolicy, TeacherRejected, TeacherUnavailable
from .recipe import GenerateRecipe, resolve_path
from .verifiers import build_verifier

RESULTS = "results.jsonl"
SFT = "sft.jsonl"
SUMMARY = "summary.json"
RECIPE = "recipe.json"  # the marker: which recipe (and tool) made the folder
CACHE = "cache.jsonl"

_log = logging.getLogger(__name__)


class _Fmt(dict):
    def __missing__(self, key):
        raise DKError(f"prompts.template: the rows have no field {key!r}")


def load_prompts(rec: GenerateRecipe, base_dir: Path | None = None) -> list[dict]:
    """Rows ``{id, prompt, reference, row}`` from the prompts JSONL (one-line errors)."""
    p = rec.prompts
    path = resolve_path(p.path, base_dir)
    if not path.exists():
        raise DKError(f"prompts.path: {path}: no such file")
    out, seen = [], set()
    for n, line in iter_lines(path):
        i = n - 1
        if not line.strip():
            continue
        if i < p.offset:
            continue
        if p.limit is not None and len(out) >= p.limit:
            break
        row = loads(line, f"{path}:{n}")
        if not isinstance(row, dict) or p.prompt_field not in row:
            raise DKError(f"{path}:{i + 1}: no field {p.prompt_field!r} (prompts.prompt_field)")
        if p.answer_field and p.answer_field not in row:
            raise DKError(f"{path}:{i + 1}: no field {p.answer_field!r} (prompts.answer_field)")
        if p.id_field and p.id_field not in row:
            raise DKError(f"{path}:{i + 1}: no field {p.id_field!r} (prompts.id_field)")
        pid = str(row[p.id_field]) if p.id_field else str(i)
        if pid in seen:
            raise DKError(f"{path}:{i + 1}: duplicate id {pid!r}")
        seen.add(pid)
        try:
            text = p.template.format_map(_Fmt(row))
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
            raise DKError(f"prompts.template: {' '.join(str(e).split())}") from None
        ref = str(row[p.answer_field]) if p.answer_field else ""
        out.append({"id": pid, "prompt": text, "reference": ref})
    if not out:
        raise DKError(f"prompts.path: {path}: no prompts (check offset/limit)")
    return out


def request_body(rec: GenerateRecipe, prompt: str, model: str) -> dict:
    """The request without credentials; also the cache key's content."""
    top = min(rec.sampling.top_logprobs, rec.teacher.max_top_logprobs)
    body: dict = {"model": model}
    if rec.teacher.api == "chat":
        msgs = [{"role": "system", "content": rec.prompts.system}] if rec.prompts.system else []
        body["messages"] = [*msgs, {"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(rec.sampling.body(rec.teacher.api, top))
    return body


def choice_text(choice: dict, api: str) -> str:
    return choice["message"]["content"] if api == "chat" else choice["text"]


def read_results(path: Path) -> dict[str, dict]:
    """Finished prompts by id; a torn last line (crash mid-write) is cut off."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    good = 0
    pos = 0
    for line in data.split(b"\n"):
        end = pos + len(line) + 1
        if end > len(data):
            break
        try:
            row = json.loads(line)
        except ValueError:
            if end < len(data):
                raise DKError(f"{path}: corrupt line at byte {pos}") from None
            break
        done.setdefault(row["id"], row)
        good = pos = end
    if good < len(data):
        os.truncate(path, good)
    return done


class _Appender:
    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.last = time.monotonic()

    def write(self, row: dict) -> None:
        os.write(self.fd, (json.dumps(row, ensure_ascii=False) + "\n").encode())
        if time.monotonic() - self.last > 1.0:
            os.fsync(self.fd)
            self.last = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def select_samples(
    row: dict, keep: str, shortest: bool = False, max_per_prompt: int | None = None
) -> list[dict]:
    """The samples of one result row that go into the SFT set."""
    samples = row["samples"]
    if keep == "correct":
        kept = [s for s in samples if s["verdict"]["correct"]]
    elif keep == "first":
        kept = samples[:1]
    else:
        kept = list(samples)
    if shortest and kept:
        kept = [min(kept, key=lambda s: len(s["text"]))]
    if max_per_prompt is not None:
        kept = kept[:max_per_prompt]
    return kept


def sft_row(row: dict, s: dict, fmt: str = "response", system: str | None = None) -> dict:
    """One SFT row in ``fmt`` (``select.format``). Every form starts with ``id`` and
    ``sample`` (what joins a row to a ``dk store from-api`` store) and ends with the
    reference, teacher, sampling and verdict; ``system`` (``prompts.system``, sent to a
    chat teacher only) is the first turn of the conversational forms."""
    key = {"id": row["id"], "sample": s["index"]}
    meta = {
        "reference": row["reference"],
        "teacher": row["teacher"],
        "sampling": row["sampling"],
        "verdict": s["verdict"],
    }
    chat = row["teacher"].get("api", "chat") == "chat"
    sys_turn = [{"role": "system", "content": system}] if system and chat else []
    user = [*sys_turn, {"role": "user", "content": row["prompt"]}]
    answer = {"role": "assistant", "content": s["text"]}
    if fmt == "messages":
        return key | {"messages": [*user, answer]} | meta
    if fmt == "prompt_completion":
        if chat:  # what the teacher was sent: a conversation (TRL's conversational form)
            return key | {"prompt": user, "completion": [answer]} | meta
        return key | {"prompt": row["prompt"], "completion": s["text"]} | meta
    return key | {"prompt": row["prompt"], "response": s["text"]} | meta


def build_sft(
    results: list[dict],
    out: Path,
    keep="correct",
    shortest=False,
    max_per_prompt=None,
    fmt: str = "response",
    system: str | None = None,
) -> int:
    """Write the SFT JSONL (atomically) in ``fmt``; returns its number of rows."""
    tmp = out.with_suffix(".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in results:
            for s in select_samples(row, keep, shortest, max_per_prompt):
                f.write(json.dumps(sft_row(row, s, fmt, system), ensure_ascii=False) + "\n")
                n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return n


# What dk generate writes into its folder: a folder holding anything else is not replaced
OWN_FILES = {RECIPE, RESULTS, SFT, SUMMARY, CACHE, "recipe.tmp", "sft.tmp"}
REPLACED = (RESULTS, SFT, SUMMARY, RECIPE, "recipe.tmp", "sft.tmp")  # --force: the cache stays


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def generation_marker(out: Path) -> bool:
    """``out/recipe.json`` is one dk generate wrote (``tool``; older ones: its ``key``)."""
    try:
        rec = json.loads((out / RECIPE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and (
        rec.get("tool") == "darkknowledge" or ("key" in rec and "recipe" in rec)
    )


def check_generate_folder(out: Path, force: bool) -> None:
    """Refuse ``out`` (one line, nothing touched) unless dk generate may use it: empty, or
    a generation this tool made (its ``recipe.json``). ``force`` deletes files, so it
    also refuses a folder holding any file dk generate does not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DKError(f"{out}: exists and is not a folder; choose another --out")
    names = sorted(p.name for p in out.iterdir())
    if not generation_marker(out) and set(names) - {CACHE, "recipe.tmp"}:
        raise DKError(
            f"{out}: not a dk generate folder (no {RECIPE} of a generation; it holds "
            f"{_listing(names)}); nothing was deleted: choose another --out"
        )
    foreign = [n for n in names if n not in OWN_FILES or not (out / n).is_file()]
    if force and foreign:
        raise DKError(
            f"{out}: holds {_listing(foreign)}, which dk generate does not write; --force "
            "replaces only a generation this tool made, and nothing was deleted: move "
            "it or choose another --out"
        )


def _check_same_run(out: Path, rec: GenerateRecipe, force: bool) -> None:
    """A rerun must be the same recipe (apart from client/budget settings); ``force``
    deletes the old generation's files (after :func:`check_generate_folder`)."""
    path = out / RECIPE
    now = rec.public_dump()
    # prompts.limit/offset may change: a rerun with a larger limit extends the same run
    prompts = {k: v for k, v in now["prompts"].items() if k not in ("limit", "offset")}
    key = {k: now[k] for k in ("sampling", "verifier")} | {
        "prompts": prompts,
        "model": rec.teacher.model_name(),
        "api": rec.teacher.api,
    }
    if force and out.exists():
        for name in REPLACED:
            (out / name).unlink(missing_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") != key:
            raise DKError(
                f"{out}: holds a generation from a different recipe (prompts, sampling, "
                "verifier or model differ); use another --out or --force to start over"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        marker = {"tool": "darkknowledge", "kind": "generate", "key": key, "recipe": now}
        tmp.write_text(json.dumps(marker, indent=2))
        os.replace(tmp, path)


def run_generate(
    rec: GenerateRecipe,
    out: Path,
    *,
    base_dir: Path | None = None,
    force: bool = False,
    log=None,
) -> str:
    """Run (or continue) a generation; returns the summary text. Raises DKError (one
    line) when the teacher stays down, rejects requests, or the budget is spent."""
    out = Path(out)
    base_dir = base_dir or rec._base_dir
    urls = rec.teacher.urls()
    model = rec.teacher.model_name()
    if rec.sampling.top_logprobs > rec.teacher.max_top_logprobs:
        _log.warning(
            "sampling.top_logprobs=%s is above the server's cap teacher.max_top_logprobs=%s; "
            "using the cap",
            rec.sampling.top_logprobs,
            rec.teacher.max_top_logprobs,
        )
    verify = build_verifier(rec.verifier.name, rec.verifier.params)
    check_generate_folder(out, force)  # everything is checked before --force deletes
    prompts = load_prompts(rec, base_dir)
    cache = RequestCache(resolve_path(rec.cache, None) if rec.cache else out / CACHE)
    try:
        _check_same_run(out, rec, force)
    except BaseException:
        cache.close()
        raise
    done = read_results(out / RESULTS)
    todo = [p for p in prompts if p["id"] not in done]
    budget = Budget(
        rec.budget.max_tokens,
        rec.budget.max_cost,
        rec.budget.price_input_per_m,
        rec.budget.price_output_per_m,
    )
    c = rec.client
    client = ApiClient(
        urls,
        api=rec.teacher.api,
        api_key=rec.teacher.key(),
        concurrency=c.concurrency,
        retry=RetryPolicy(c.max_attempts, c.backoff_s, c.max_backoff_s, c.timeout_s),
        cache=cache,
        budget=budget,
        log=log,
    )
    teacher_meta = {"model": model, "api": rec.teacher.api}
    sampling_meta = rec.sampling.dump()
    writer = _Appender(out / RESULTS)
    sel = rec.select
    accepted = sum(
        len(select_samples(r, sel.keep, sel.shortest, sel.max_per_prompt)) for r in done.values()
    )
    priced = rec.budget.price_input_per_m > 0 or rec.budget.price_output_per_m > 0
    bar = Progress(len(prompts), len(prompts) - len(todo), "generate", unit="prompt",
                   logger=_log)  # fmt: skip

    def advance(row: dict) -> None:
        nonlocal accepted
        accepted += len(select_samples(row, sel.keep, sel.shortest, sel.max_per_prompt))
        fields = {"accepted": accepted, "tokens": budget.tokens}
        if priced:
            fields["cost"] = f"${budget.cost:.4f}"
        bar.update(bar.n + 1, **fields)

    t0 = time.monotonic()
    new_rows: list[dict] = []
    timing: dict = {}
    try:
        stopped = asyncio.run(
            _loop(
                rec,
                client,
                todo,
                model,
                verify,
                writer,
                new_rows,
                teacher_meta,
                sampling_meta,
                timing,
                advance,
            )
        )
    finally:
        bar.close()
        writer.close()
        cache.close()
    elapsed = time.monotonic() - t0
    results = read_results(out / RESULTS)
    ordered = [results[p["id"]] for p in prompts if p["id"] in results]
    sel = rec.select
    n_sft = build_sft(
        ordered, out / SFT, sel.keep, sel.shortest, sel.max_per_prompt, sel.format,
        rec.prompts.system,
    )  # fmt: skip
    samples = sum(len(r["samples"]) for r in ordered)
    correct = sum(s["verdict"]["correct"] for r in ordered for s in r["samples"])
    solved = sum(any(s["verdict"]["correct"] for s in r["samples"]) for r in ordered)
    summary = {
        "prompts": len(prompts),
        "done": len(ordered),
        "samples": samples,
        "correct": correct,
        "rejection_rate": (1 - correct / samples) if samples else None,
        "prompts_with_a_correct_sample": solved,
        "sft_rows": n_sft,
        "this_run": {
            "prompts": len(new_rows),
            "seconds": round(elapsed, 3),
            "loop_seconds": round(timing.get("loop_seconds", 0.0), 3),  # without set-up
            "http_requests": client.stats["requests"],
            "cached_answers": client.stats["cached"],
            "retries": client.stats["retries"],
            "usage": budget.summary(),
            "endpoints": [
                {"url": e.url, "sent": e.sent, "answered": e.answered, "errors": e.errors}
                for e in client.endpoints
            ],
        },
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    where = f"{len(ordered)}/{len(prompts)} prompts saved in {out / RESULTS}"
    if stopped is not None:
        kind, msg = stopped
        if kind == "budget":
            raise DKError(f"{msg}; {where}; raise the budget and rerun to continue")
        raise DKError(
            f"{msg}; {where}, answered requests are cached: rerun the same command to continue"
        )
    rate = f"{summary['rejection_rate']:.1%}" if samples else "n/a"
    return (
        f"generated {len(ordered)} prompts × {rec.sampling.n} samples: {correct}/{samples} "
        f"correct (rejection rate {rate}), {solved} prompts with a correct sample\n"
        f"this run: {len(new_rows)} prompts, {client.stats['requests']} HTTP requests, "
        f"{client.stats['cached']} from cache, {client.stats['retries']} retries, "
        f"{elapsed:.1f}s\nsft: {out / SFT} ({n_sft} rows)"
    )


async def _loop(
    rec, client, todo, model, verify, writer, new_rows, teacher_meta, sampling_meta, timing,
    advance=None,
):  # fmt: skip
    """Workers take prompts from a queue. On a fatal error or a spent budget no new prompt
    is started; the requests in flight finish (so nothing answered is thrown away)."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    stop: list = []
    api = rec.teacher.api

    async def worker():
        while not stop:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = request_body(rec, p["prompt"], model)
            try:
                data, cached = await client.request(body)
            except BudgetExhausted as e:
                stop.append(("budget", str(e)))
                return
            except (TeacherUnavailable, TeacherRejected) as e:
                stop.append(("teacher", str(e)))
                return
            samples = []
            for i, ch in enumerate(data["choices"]):
                text = choice_text(ch, api)
                v = verify(text, p["reference"])
                s = {
                    "index": i,
                    "text": text,
                    "finish_reason": ch.get("finish_reason"),
                    "verdict": v.to_dict() | {"verifier": rec.verifier.name},
                }
                if ch.get("logprobs") is not None:
                    s["logprobs"] = ch["logprobs"]
                samples.append(s)
            row = {
                "id": p["id"],
                "prompt": p["prompt"],
                "reference": p["reference"],
                "teacher": teacher_meta,
                "sampling": sampling_meta,
                "cached": cached,
                "samples": samples,
            }
            writer.write(row)
            faults.point("answer")
            new_rows.append(row)
            if advance is not None:
                advance(row)

    async with client:
        t = time.monotonic()
        n = min(rec.client.concurrency, max(1, len(todo)))
        await asyncio.gather(*(worker() for _ in range(n)))
        timing["loop_seconds"] = time.monotonic() - t
    return stop[0] if stop else None


def run_generate_family(
    rec: GenerateRecipe, out: Path, *, resume: bool, force: bool, seeds=None
) -> str:
    """``dk run`` for ``family: generate`` recipes (always resumable; ``seeds`` unused)."""
    if seeds is not None:
        raise DKError("--seeds: a generation has one sampling seed (sampling.seed)")
    return run_generate(rec, out, force=force)
