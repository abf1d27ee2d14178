"""The reasoning experiment's on-policy arm with the teacher served
(docs/results/reasoning.md §5): `dk serve-teacher` on the experiment's teacher in its own
process, then per seed `dk run recipes/reasoning/student_onpolicy_served.yaml` from that
seed's verified student (every sampled answer scored through completions echo, top 20 +
tail) and `dk eval` on the held-out test split, as bench/reasoning_grid.py runs the
in-process arm. The table sets each seed beside the in-process on-policy student of the
same seed (same start, steps, batch and samples; the teacher's full distribution there,
its top 20 here).

Resumable: a finished stage is skipped and `dk run --resume` continues a killed run. CPU
seconds of each `dk` process, and of the server over the run, go to
runs/reasoning/students/onpolicy_served_sS.cpu.jsonl.

    OMP_NUM_THREADS=1 nice -n 15 python bench/reasoning_served.py --seeds 0
    python bench/reasoning_served.py --table --json docs/results/reasoning_served.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from darkknowledge.blackbox.serve import start_server
from darkknowledge.store.format import atomic_write_bytes
from reasoning_capacity import EVAL, ROOT, dk
from reasoning_grid import STUDENTS, _cpu, _record, interval, paired_bootstrap

R = ROOT / "runs" / "reasoning"
RECIPE = ROOT / "recipes" / "reasoning" / "student_onpolicy_served.yaml"
TEACHER = R / "teacher" / "student" / "model"
PORT = 8011  # the recipe's teacher.base_url


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_seed(seed: int) -> None:
    name = f"onpolicy_served_s{seed}"
    run, log = STUDENTS / name, STUDENTS / f"{name}.log"
    if not (run / "report.json").exists():
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        server, _ = start_server(TEACHER, log, name="reasoning-teacher", port=PORT, env=env)
        try:
            before = _server_cpu(server.pid)
            verified = STUDENTS / f"verified_s{seed}" / "student" / "model"
            args = ["run", str(RECIPE), f"train.seed={seed}", f"student.model.path={verified}",
                    "--out", str(run), "--resume"]  # fmt: skip
            t = dk(args, log)
            t["server_cpu_s"] = round(_server_cpu(server.pid) - before, 1)
            _record(name, "train", t)
        finally:
            server.kill()
            server.wait()
    if not (run / "eval_test.json").exists():
        args = ["eval", str(run), "--data", str(R / "data" / "test.jsonl"), *EVAL,
                "--out", str(run / "eval_test.json")]  # fmt: skip
        _record(name, "eval_test", dk(args, log))
    print(f"[{time.strftime('%H:%M:%S')}] {name} done", flush=True)


def _metrics(run: Path) -> dict | None:
    f = run / "eval_test.json"
    if not f.exists():
        return None
    (row,) = json.loads(f.read_text())["models"].values()
    return {k: row[k] for k in ("pass@1", "greedy") if k in row}


def table(seeds: list[int]) -> dict:
    rows = []
    for s in seeds:
        served = _metrics(STUDENTS / f"onpolicy_served_s{s}")
        if served is None:
            continue
        cpu = [json.loads(x) for x in (STUDENTS / f"onpolicy_served_s{s}.cpu.jsonl").open()]
        train = next(r for r in cpu if r["stage"] == "train")
        rows.append({
            "seed": s,
            "served": served,
            "in_process": _metrics(STUDENTS / f"onpolicy_s{s}"),
            "served_train_cpu_s": train["cpu_s"],
            "served_server_cpu_s": train["server_cpu_s"],
            "served_wall_s": train["wall_s"],
            "in_process_train_cpu_s": round(_cpu(f"onpolicy_s{s}", "train"), 1),
        })  # fmt: skip
    print("| seed | pass@1 served (top 20) | pass@1 in-process | greedy served | greedy "
          "in-process | CPU-min served (trainer + server) | CPU-min in-process |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["served"], r["in_process"] or {}
        print(f"| {r['seed']} | {a['pass@1']:.3f} | {b.get('pass@1', float('nan')):.3f} | "
              f"{a['greedy']:.3f} | {b.get('greedy', float('nan')):.3f} | "
              f"{r['served_train_cpu_s'] / 60:.1f} + {r['served_server_cpu_s'] / 60:.1f} | "
              f"{r['in_process_train_cpu_s'] / 60:.1f} |")  # fmt: skip
    out = {"rows": rows, "eval": " ".join(EVAL), "recipe": str(RECIPE.relative_to(ROOT))}
    both = [r for r in rows if r["in_process"] is not None]
    if len(both) >= 2:
        served = [r["served"]["pass@1"] for r in both]
        out["served_pass@1"] = interval(served)
        out["in_process_pass@1"] = interval([r["in_process"]["pass@1"] for r in both])
        out["served_minus_in_process"] = paired_bootstrap(
            served, [r["in_process"]["pass@1"] for r in both]
        )
        cont = [_metrics(STUDENTS / f"continued_s{r['seed']}") for r in both]
        if all(c is not None for c in cont):
            out["served_minus_continued"] = paired_bootstrap(served, [c["pass@1"] for c in cont])
        for k in ("served_pass@1", "in_process_pass@1"):
            d = out[k]
            print(f"{k}: {d['mean']:.3f} ({d.get('lo', float('nan')):.3f}–"
                  f"{d.get('hi', float('nan')):.3f})")  # fmt: skip
        for k in ("served_minus_in_process", "served_minus_continued"):
            if k in out:
                p = out[k]
                print(f"{k}: {p['diff']:+.3f} (bootstrap 95 % {p['lo']:+.3f} to {p['hi']:+.3f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--table", action="store_true", help="only tabulate what is done")
    ap.add_argument("--json", type=Path, help="write the table's rows here")
    a = ap.parse_args()
    if not a.table:
        for s in a.seeds:
            run_seed(s)
    out = table(a.seeds)
    if a.json:
        atomic_write_bytes(a.json, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
