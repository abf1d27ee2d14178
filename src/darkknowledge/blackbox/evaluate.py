"""``dk eval``: a language-model student judged by sampling and checking its answers.

For a model folder (``save_pretrained`` + tokenizer) or a causal_lm run folder (its
student, or each ``seed_*/student``), on prompt/answer rows (JSONL):

- ``pass@1``: mean correctness of ``k`` samples per prompt at ``temperature``;
- ``maj@k``: the share of prompts whose most frequent extracted answer is right;
- ``greedy``: accuracy of one greedy (temperature 0) answer per prompt;
- ``loss``: held-out next-token cross-entropy (nats/token) of the reference answers.

The verifiers are ``dk generate``'s (``gsm8k``, ``exact``, ``regex``). Results go to
``eval.json`` beside the model.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .. import faults
from ..errors import DKError
from ..store.format import atomic_write_bytes
from .sft import _collate, encode_pair, evaluate, response_loss
from .verifiers import build_verifier


def model_dirs(path: Path) -> dict[str, Path]:
    """The models a path names: itself (a model folder), or a causal_lm run's students."""
    if not path.is_dir():
        raise DKError(f"{path}: no such folder (a model folder or a causal_lm run folder)")
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return {"model": path}
    found = {"student": path / "student" / "model"} if (path / "student" / "model").is_dir() else {}
    for d in sorted(path.glob("seed_*/student/model")):
        found[d.parent.parent.name] = d
    if not found:
        raise DKError(
            f"{path}: neither a model folder (config.json + weights) nor a finished "
            "causal_lm run (student/model)"
        )
    return found


def read_rows(path: Path, prompt_key: str, answer_key: str, template: str, limit: int | None):
    """Prompt/answer rows of a data file of any format :mod:`darkknowledge.rows` reads
    (JSONL, JSON, CSV, TSV, Parquet, a ``save_to_disk`` folder), bounded as every reader."""
    from ..rows import iter_rows, pick

    if not Path(path).exists():
        raise DKError(f"{path}: no such data file (rows with {prompt_key!r} and {answer_key!r})")
    rows = []
    for where, rec in iter_rows(path, lambda cols, w: pick(cols, w, [prompt_key, answer_key])):
        p, a = rec.get(prompt_key), rec.get(answer_key)
        if not isinstance(p, str) or not isinstance(a, str | int | float):
            raise DKError(f"{where}: needs a string {prompt_key!r} and an {answer_key!r}")
        rows.append({"prompt": _fill(template, p), "reference": str(a)})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DKError(f"{path}: no rows")
    return rows


def _fill(template: str, prompt: str) -> str:
    # plain {prompt} substitution only: a template never reaches attributes or indexes
    if "{prompt}" not in template:
        raise DKError("--template must contain {prompt}")
    return template.replace("{prompt}", prompt)


@torch.no_grad()
def heldout_loss(model, tok, rows: list[dict], batch_size: int = 16, max_len: int = 256) -> float:
    """Mean next-token cross-entropy of the reference answers after their prompts."""
    data = [encode_pair(tok, r["prompt"], " " + r["reference"], max_len) for r in rows]
    total, count = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(data), batch_size):
        ids, labels, mask = _collate(data[i : i + batch_size], pad)
        n = int((labels[:, 1:] != -100).sum())
        total += float(response_loss(model, ids, labels, mask)) * n
        count += n
    return total / max(count, 1)


def eval_models(
    path: Path,
    data: Path,
    *,
    verifier: str = "gsm8k",
    verifier_params: dict | None = None,
    k: int = 4,
    temperature: float = 0.6,
    max_new_tokens: int = 64,
    prompt_key: str = "question",
    answer_key: str = "answer",
    template: str = "{prompt}",
    limit: int | None = None,
    seed: int = 0,
    out_file: Path | None = None,
) -> dict:
    """Score the model(s) at ``path``; the result goes to ``out_file`` (default
    ``path/eval.json``), so one model can be scored on several data files."""
    from ..hf.io import load_model, load_tokenizer

    if k < 1 or max_new_tokens < 1 or not (0.0 < temperature <= 2.0):
        raise DKError("--k and --max-new-tokens must be ≥ 1, --temperature in (0, 2]")
    target = eval_target(path, out_file)
    verify = build_verifier(verifier, verifier_params)
    rows = read_rows(data, prompt_key, answer_key, template, limit)
    out = {"data": str(data), "prompts": len(rows), "verifier": verifier, "k": k,
           "temperature": temperature, "models": {}}  # fmt: skip
    for name, d in model_dirs(Path(path)).items():
        model = load_model(d, "AutoModelForCausalLM").eval()
        tok = load_tokenizer(d)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        sampled = evaluate(model, tok, rows, verify, k=k, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
        greedy = evaluate(model, tok, rows, verify, k=1, temperature=0.0,
                          max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
        out["models"][name] = {
            "model": str(d),
            "pass@1": sampled["pass@1"],
            "maj@k": sampled["maj@k"],
            "greedy": greedy["pass@1"],
            "loss": heldout_loss(model, tok, rows),
        }
        faults.point("eval_model")  # tests: a kill here leaves no result; a rerun redoes it
    ms = list(out["models"].values())
    if len(ms) > 1:
        out["mean"] = {
            m: {
                "mean": statistics.fmean(r[m] for r in ms),
                "sd": statistics.stdev(r[m] for r in ms),
            }
            for m in ("pass@1", "maj@k", "greedy", "loss")
        }
    atomic_write_bytes(target, json.dumps(out, indent=2).encode())
    return out


def eval_target(folder: str | Path, out: str | Path | None) -> Path:
    """Where ``dk eval`` writes its result: ``out``, else ``folder/eval.json``; one line
    when its folder does not exist (checked before any scoring)."""
    target = Path(out) if out else Path(folder) / "eval.json"
    if not target.parent.is_dir():
        raise DKError(f"--out {target}: no such folder {target.parent}")
    return target


def format_eval(res: dict) -> str:
    head = f"{'model':<12} {'pass@1':>8} {'maj@' + str(res['k']):>8} {'greedy':>8} {'loss':>8}"
    lines = [f"{res['prompts']} prompts, verifier {res['verifier']}, k {res['k']} at "
             f"temperature {res['temperature']}", head, "-" * len(head)]  # fmt: skip
    for name, r in res["models"].items():
        lines.append(
            f"{name:<12} {r['pass@1']:>8.3f} {r['maj@k']:>8.3f} {r['greedy']:>8.3f} {r['loss']:>8.4f}"
        )
    if "mean" in res:
        m = res["mean"]
        lines.append(
            f"{'mean ± sd':<12} {m['pass@1']['mean']:>8.3f} {m['maj@k']['mean']:>8.3f} "
            f"{m['greedy']['mean']:>8.3f} {m['loss']['mean']:>8.4f}"
        )
    return "\n".join(lines)
