"""Throughput of `dk generate` against an ideal concurrent client.

A local OpenAI-compatible server (darkknowledge.blackbox.faultserver, its own process)
answers every request after a fixed 200 ms and serves at most 32 requests at once, so
no client can exceed 32 / 0.2 s = 160 requests/s. The ideal client is a bare asyncio +
httpx loop: 32 workers, each with its own keep-alive connection, sending requests back
to back (no cache, no verification, no output). Each measurement runs in a fresh process, alternating ideal / dk generate, and
`dk generate`'s time is its generation loop (summary.json's loop_seconds), like the
ideal client's, without the Python start-up or client set-up (both listed beside it). Writes JSON + a markdown table.

    python bench/generate_throughput.py --requests 960 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LATENCY, CAPACITY = 0.2, 32


def ideal(url: str, n: int, conc: int) -> float:
    """``conc`` workers, each with its own keep-alive connection, sending requests back
    to back and parsing the answer: nothing else."""
    import httpx

    async def go() -> float:
        todo = iter(range(n))
        # clients made before the clock starts (plain HTTP: no TLS context to load)
        clients = [httpx.AsyncClient(timeout=60, verify=False) for _ in range(conc)]

        async def worker(c):
            for i in todo:
                body = {
                    "model": "arith",
                    "messages": [{"role": "user", "content": f"Q{i}: 1 + 2"}],
                    "n": 2,
                }
                r = await c.post(url + "/chat/completions", json=body)
                r.raise_for_status()
                assert r.json()["choices"]

        t = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        dt = time.perf_counter() - t
        for c in clients:
            await c.aclose()
        return dt

    return n / asyncio.run(go())


def start_server():
    srv = ROOT / "src" / "darkknowledge" / "blackbox" / "faultserver.py"
    p = subprocess.Popen(
        [sys.executable, str(srv), "--latency", str(LATENCY), "--capacity", str(CAPACITY)],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(p.stdout.readline().split()[1])
    return p, f"http://127.0.0.1:{port}/v1"


def run_dk(url: str, n: int, conc: int, work: Path) -> dict:
    prompts = work / "p.jsonl"
    with open(prompts, "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"question": f"Q{i}: what is 1 + 2?", "answer": f"#### {i + 3}"}) + "\n"
            )
    rec = {
        "prompts": {"path": str(prompts)},
        "teacher": {"base_url": url, "model": "arith"},
        "sampling": {"n": 2, "max_tokens": 32},
        "client": {"concurrency": conc},
    }
    (work / "r.yaml").write_text(yaml.safe_dump(rec))
    out = work / "out"
    t = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "darkknowledge.cli",
            "generate",
            str(work / "r.yaml"),
            "--out",
            str(out),
            "--force",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(r.stderr)
    s = json.loads((out / "summary.json").read_text())["this_run"]
    (out / "cache.jsonl").unlink()
    return {
        "rps": n / s["loop_seconds"],
        "loop_s": s["loop_seconds"],
        "run_s": s["seconds"],
        "process_wall_s": wall,
        "http_requests": s["http_requests"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=960)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=CAPACITY)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "generate_throughput.json"))
    ap.add_argument("--ideal-only", nargs=3, metavar=("URL", "N", "CONC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ideal_only:
        print(ideal(a.ideal_only[0], int(a.ideal_only[1]), int(a.ideal_only[2])))
        return
    proc, url = start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(a.repeats):
                r = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--ideal-only",
                        url,
                        str(a.requests),
                        str(a.concurrency),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                ide = float(r.stdout.strip())
                dk = run_dk(url, a.requests, a.concurrency, Path(tmp))
                rows.append(
                    {
                        "repeat": rep,
                        "ideal_rps": ide,
                        **{f"dk_{k}": v for k, v in dk.items()},
                        "ratio": dk["rps"] / ide,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.kill()
    ratios = [r["ratio"] for r in rows]
    result = {
        "server": {"latency_s": LATENCY, "capacity": CAPACITY, "bound_rps": CAPACITY / LATENCY},
        "requests": a.requests,
        "concurrency": a.concurrency,
        "runs": rows,
        "median_ratio": statistics.median(ratios),
        "target_ratio": 0.9,
        "command": f"python bench/generate_throughput.py --requests {a.requests} --repeats {a.repeats}",
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    md = [
        "| run | ideal client (req/s) | dk generate (req/s) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['repeat']} | {r['ideal_rps']:.1f} | {r['dk_rps']:.1f} | {r['ratio']:.3f} | ≥ 0.9 |"
        )
    md.append(f"| median | | | **{result['median_ratio']:.3f}** | ≥ 0.9 |")
    print("\n".join(md))
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
