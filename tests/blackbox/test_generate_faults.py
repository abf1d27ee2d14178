"""dk generate against real loopback servers: transient faults, a server that stays
down, a SIGKILLed run, and an endpoint that dies mid-run."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from conftest import recipe_dict, write_prompts
from darkknowledge.blackbox.cache import RequestCache, request_key
from darkknowledge.blackbox.generate import load_prompts, request_body
from darkknowledge.blackbox.recipe import load_generate_recipe
from darkknowledge.cli import main

DK = [sys.executable, "-m", "darkknowledge.cli"]


def _recipe(tmp_path: Path, prompts: Path, urls: list[str], **over) -> Path:
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(recipe_dict(prompts, urls, **over)))
    return p


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _once(out: Path, n: int) -> None:
    ids = [r["id"] for r in _results(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]  # each prompt exactly once


def test_transient_faults_are_retried(tmp_path, server_factory, capsys):
    srv = server_factory(faults="429,500,hang,drop,badjson,500,429", hang_s=3, retry_after=0.3)
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out"
    assert main(["generate", str(_recipe(tmp_path, prompts, [srv.url])), "--out", str(out)]) == 0
    _once(out, 12)
    answered = collections.Counter(a["prompt"] for a in srv.answered())
    assert len(answered) == 12 and set(answered.values()) == {1}
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["retries"] == 7 and s["this_run"]["http_requests"] == 19
    assert s["correct"] == 12 and s["rejection_rate"] == 0.5  # sample 0 right, sample 1 wrong
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 12 and all(r["verdict"]["correct"] and r["sample"] == 0 for r in sft)
    assert sft[0]["teacher"]["model"] == "arith" and sft[0]["sampling"]["n"] == 2
    # a rerun costs nothing: every prompt is done
    assert main(["generate", str(_recipe(tmp_path, prompts, [srv.url])), "--out", str(out)]) == 0
    assert len(srv.answered()) == 12
    # --force starts over but the cache answers everything
    main(["generate", str(_recipe(tmp_path, prompts, [srv.url])), "--out", str(out), "--force"])
    assert len(srv.answered()) == 12
    assert "12 from cache" in capsys.readouterr().out


def test_server_down_then_back(tmp_path, server_factory, capsys):
    """The server is killed mid-run and stays down past the retry budget: one clear line,
    exit 2; after it returns, the rerun finishes without re-sending answered requests."""
    a = server_factory("a", latency=0.05)
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    rec = _recipe(tmp_path, prompts, [a.url], client={"concurrency": 2})
    out = tmp_path / "out"
    rc = []
    run = threading.Thread(
        target=lambda: rc.append(main(["generate", str(rec), "--out", str(out)]))
    )
    run.start()
    while len(a.answered()) < 6 and run.is_alive():
        time.sleep(0.01)
    a.kill()  # SIGKILL the server
    run.join(60)
    assert rc == [2]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher unreachable")
    assert "rerun the same command" in lines[0]
    with RequestCache(out / "cache.jsonl") as c:
        cached = len(c)
    assert 6 <= cached < 30
    first = {x["prompt"] for x in a.answered()}
    b = server_factory("b", port=a.port)  # the server comes back on the same port
    assert main(["generate", str(rec), "--out", str(out)]) == 0
    _once(out, 30)
    again = [x["prompt"] for x in b.answered()]
    assert not set(again) & first  # nothing answered before was asked again
    assert len(again) == len(set(again)) == 30 - len(first)


def test_sigkill_mid_run_resumes(tmp_path, server_factory):
    srv = server_factory(latency=0.05)
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    rec = _recipe(tmp_path, prompts, [srv.url], client={"concurrency": 3})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*DK, "generate", str(rec), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res = out / "results.jsonl"
    while (not res.exists() or res.read_text().count("\n") < 8) and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recipe, _ = load_generate_recipe(rec)
    with RequestCache(out / "cache.jsonl") as c:
        cached = {
            p["prompt"]
            for p in load_prompts(recipe)
            if request_key(request_body(recipe, p["prompt"], "arith")) in c
        }
    before = collections.Counter(x["prompt"] for x in srv.answered())
    # the cache holds what the client received; the server may have sent a few answers
    # (at most the requests in flight) to the client it no longer had
    assert cached <= set(before) and len(set(before) - cached) <= 3
    assert main(["generate", str(rec), "--out", str(out)]) == 0
    _once(out, 40)
    counts = collections.Counter(x["prompt"] for x in srv.answered())
    assert len(counts) == 40
    assert all(counts[p] == 1 for p in cached)  # nothing received was asked again
    assert all(counts[p] <= 2 for p in counts)


def test_endpoint_dies_mid_run(tmp_path, server_factory):
    """Two endpoints round robin; one dies abruptly after 5 answers: its requests in flight
    go to the other, every prompt is answered exactly once over both."""
    a = server_factory("a", latency=0.05)
    b = server_factory("b", latency=0.05, die_after=5)
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    rec = _recipe(tmp_path, prompts, [a.url, b.url], client={"concurrency": 6})
    out = tmp_path / "out"
    assert main(["generate", str(rec), "--out", str(out)]) == 0
    _once(out, 40)
    assert b.proc.wait(timeout=5) == 1  # it really died
    counts = collections.Counter(x["prompt"] for x in a.answered() + b.answered())
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert len(b.answered()) == 5 and len(a.answered()) == 35
    eps = json.loads((out / "summary.json").read_text())["this_run"]["endpoints"]
    assert eps[1]["errors"] >= 1 and eps[0]["answered"] == 35


def test_budget_stops_cleanly(tmp_path, server_factory, capsys):
    srv = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    rec = _recipe(
        tmp_path, prompts, [srv.url], budget={"max_tokens": 60}, client={"concurrency": 1}
    )
    out = tmp_path / "out"
    assert main(["generate", str(rec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: token budget reached") and "\n" not in err
    n = len(_results(out))
    assert 0 < n < 20 and len(srv.answered()) == n
    assert main(["generate", str(rec), "--out", str(out), "budget.max_tokens=100000"]) == 0
    _once(out, 20)
    assert len(srv.answered()) == 20


def test_bad_recipe_one_line(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    rec = _recipe(tmp_path, prompts, ["ftp://x"])
    assert main(["generate", str(rec), "--out", str(tmp_path / "o")]) == 2
    assert "teacher.base_url" in capsys.readouterr().err
    assert main(["generate", str(rec), "--out", str(tmp_path / "o"), "sampling.n=0"]) == 2
    assert "sampling.n" in capsys.readouterr().err


def test_api_key_is_sent_but_never_written(tmp_path, server_factory, monkeypatch):
    secret = "sk-test-do-not-store-0123456789"
    monkeypatch.setenv("DK_TEACHER_API_KEY", secret)
    srv = server_factory(faults="500")
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "out"
    rec = _recipe(tmp_path, prompts, [srv.url])
    assert main(["generate", str(rec), "--out", str(out), "-v"]) == 0
    assert all(a["auth"] for a in srv.answered())
    for f in out.rglob("*"):
        if f.is_file():
            assert secret not in f.read_text(errors="replace"), f


def test_extend_with_a_larger_limit_but_refuse_another_recipe(tmp_path, server_factory, capsys):
    srv = server_factory()
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    rec, out = str(_recipe(tmp_path, prompts, [srv.url])), str(tmp_path / "out")
    assert main(["generate", rec, "--out", out, "prompts.limit=4"]) == 0
    assert main(["generate", rec, "--out", out]) == 0
    _once(Path(out), 10)
    assert len(srv.answered()) == 10
    assert main(["generate", rec, "--out", out, "sampling.n=3"]) == 2
    assert "different recipe" in capsys.readouterr().err
