"""Recipe → data → teacher → signals → student → evaluation → report.

``run_recipe`` is what ``dk run`` and the job service call. Each phase (a teacher
member's training, the student, the plain baseline) lives in its own folder of the run
directory and is skipped when already finished, resumed when interrupted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import dist, faults
from .config import LossConfig, MemberConfig, Recipe, StudentConfig, TrainConfig
from .data import DataSplits, load_data, plain_training_set
from .errors import DKError
from .evaluate import bytes_on_disk, param_count, predict_logits, quality, speed
from .export import load_weights, save_model
from .losses import CE, JSD, TVD, ForwardKL, HintonKD, LossStack, ReverseKL
from .losses.stack import Divergence
from .recipe_io import dump_recipe
from .registry import build_model
from .report import write_report
from .store.format import atomic_write_bytes
from .store.label_folder import prepare_label_folder
from .teachers import CachedTeacher, Ensemble, ModuleTeacher, StoreTeacher, Teacher
from .train import CKPT, fit


@dataclass
class RunResult:
    run_dir: Path
    report: dict
    student: nn.Module


def build_loss(cfg: LossConfig) -> LossStack:
    """The recipe's ``loss:`` section as a weighted stack of named terms."""
    terms: dict[str, tuple[float, object]] = {}
    for name, c in cfg.active().items():
        if name == "hinton_kd":
            term = HintonKD(c.temperature, c.alpha)
        elif name == "forward_kl":
            term = ForwardKL(c.temperature)
        elif name == "reverse_kl":
            term = ReverseKL(c.temperature)
        elif name == "jsd":
            term = JSD(c.beta, c.temperature)
        elif name == "tvd":
            term = TVD(c.temperature)
        elif name == "ce":
            term = CE()
        else:  # any other registered divergence
            term = Divergence(name, c.temperature, c.params(name))
        terms[name] = (c.weight, term)
    return LossStack(terms)


def seeded_model(model_cfg, input_shape, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_cfg, input_shape, num_classes)


def train_member(member: MemberConfig, data: DataSplits, folder: Path, resume: bool) -> nn.Module:
    """A teacher network: loaded from its checkpoint, or trained (once) on the labelled set."""
    shape, nc = data.train.input_shape, data.train.num_classes
    train_cfg = member.train
    if member.seed is not None:
        train_cfg = train_cfg.model_copy(update={"seed": member.seed})
    model = seeded_model(member.model, shape, nc, train_cfg.seed)
    if member.checkpoint is not None:
        return load_weights(model, member.checkpoint, "teacher checkpoint").eval()
    done = folder / "train.json"  # written last: the model before it is whole
    if done.exists():
        return load_weights(model, folder / "model.safetensors", "teacher").eval()
    res = fit(
        model,
        data.train,
        train_cfg,
        LossStack.of(CE()),
        None,
        data.val,
        folder,
        resume=resume,
        desc="teacher" if folder.name == "teacher" else f"teacher {folder.name}",
    )
    dist.on_main(_save_member, res, member, shape, nc, folder)  # process 0 writes
    return res.model.eval()


def _save_member(res, member: MemberConfig, shape, nc: int, folder: Path) -> None:
    save_model(res.model, member.model, shape, nc, folder)
    faults.point("saved")
    info = {"steps": res.steps, "wall_s": res.wall_s}
    atomic_write_bytes(folder / "train.json", json.dumps(info).encode())
    (folder / CKPT).unlink(missing_ok=True)


def build_teacher(recipe: Recipe, data: DataSplits, run_dir: Path, resume: bool) -> Teacher | None:
    tc = recipe.teacher
    if tc is None:
        return None
    if tc.kind == "store":
        return open_store_teacher(recipe, data)
    if tc.kind == "module":
        return ModuleTeacher(train_member(tc, data, run_dir / "teacher", resume))
    nets = [
        train_member(m, data, run_dir / "teacher" / f"member_{i}", resume)
        for i, m in enumerate(tc.members)
    ]
    return Ensemble(nets, tc.combine, tc.weights)


def train_student(
    model_cfg: StudentConfig,
    train_set,
    data: DataSplits,
    train_cfg: TrainConfig,
    loss: LossStack,
    teacher: Teacher | None,
    folder: Path,
    resume: bool,
    desc: str,
) -> tuple[nn.Module, dict]:
    shape, nc = data.train.input_shape, data.train.num_classes
    model = seeded_model(model_cfg.model, shape, nc, train_cfg.seed)
    done = folder / "train.json"  # written last: the model before it is whole
    if done.exists():
        info = json.loads(done.read_text())
        return load_weights(model, folder / "model.safetensors", desc).eval(), info
    res = fit(model, train_set, train_cfg, loss, teacher, data.val, folder, resume, desc)
    info = {
        "steps": res.steps,
        "resumed_from": res.resumed_from,
        "wall_s": res.wall_s,
        "history": res.history,
    }
    dist.on_main(_save_student, res.model, info, model_cfg, shape, nc, folder)
    return res.model, info


def _save_student(model, info: dict, model_cfg: StudentConfig, shape, nc: int, folder: Path):
    save_model(model, model_cfg.model, shape, nc, folder)
    faults.point("saved")
    atomic_write_bytes(folder / "train.json", json.dumps(info).encode())
    (folder / CKPT).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, recipe, resume: bool, force: bool, family: str = "classify"):
    """Refuse to mix runs: an existing run is continued (--resume) or replaced (--force)."""
    from .engine.rundir import prepare_run_dir as prepare

    prepare(run_dir, dump_recipe(recipe), family, resume, force)


def run_recipe(
    recipe: Recipe,
    run_dir: str | Path,
    resume: bool = False,
    force: bool = False,
) -> RunResult:
    """Run one recipe end to end into ``run_dir``; see the module docstring."""
    run_dir = Path(run_dir)
    dist.on_main(prepare_run_dir, run_dir, recipe, resume, force)
    data = load_data(recipe.data)
    teacher = build_teacher(recipe, data, run_dir, resume)
    is_store = isinstance(teacher, StoreTeacher)
    loss = build_loss(recipe.resolved_loss())
    signals_from = teacher
    if teacher is not None and recipe.train.augment == "none" and not is_store:
        # Fixed inputs: the teacher's outputs for the transfer set are computed once.
        signals_from = CachedTeacher(teacher, data.transfer.x, data.transfer.ids)
    student, info = train_student(
        recipe.student,
        data.transfer,
        data,
        recipe.train,
        loss,
        signals_from,
        run_dir / "student",
        resume,
        "distil" if teacher else "student",
    )
    plain = pinfo = None
    if recipe.eval.plain_baseline and teacher is not None:
        plain, pinfo = train_student(
            recipe.student,
            plain_training_set(recipe.data, data),
            data,
            recipe.train,
            LossStack.of(CE()),
            None,
            run_dir / "plain",
            resume,
            "plain",
        )
    # evaluation and the report: process 0 only (the others get its report)
    report = dist.on_main(_evaluate, recipe, data, teacher, student, info, plain, pinfo, run_dir)
    return RunResult(run_dir, report, student)


def _evaluate(recipe: Recipe, data: DataSplits, teacher, student, info, plain, pinfo, run_dir):
    """Test-set rows for teacher, plain baseline and student; writes the report."""
    shape = data.train.input_shape
    is_store = isinstance(teacher, StoreTeacher)
    rows: dict[str, dict] = {}
    teacher_logits = None
    ev = recipe.eval
    if teacher is not None and not is_store:  # a store holds no test-set outputs
        teacher_logits = predict_logits(teacher, data.test)
        mods = teacher.modules()
        rows["teacher"] = _row(teacher, teacher_logits, data, mods, None, ev, shape)
    if plain is not None:
        rows["plain"] = _row(
            plain, predict_logits(plain, data.test), data, [plain], teacher_logits, ev, shape
        ) | {"train": pinfo}
    name = "student" if teacher is not None else "model"
    rows[name] = _row(
        student, predict_logits(student, data.test), data, [student], teacher_logits, ev, shape
    ) | {"train": info}
    if ev.bias_shift:
        shift = torch.zeros(data.train.num_classes)
        for c, v in ev.bias_shift.items():
            if c >= len(shift):
                raise DKError(f"eval.bias_shift: class {c} is not in 0..{len(shift) - 1}")
            shift[c] = v
        slog = predict_logits(student, data.test) + shift  # (N, V)
        rows[f"{name}+shift"] = (
            quality(slog, data.test.y, teacher_logits, ev.ece_bins)
            | {
                "params": rows[name]["params"],
                "bytes": rows[name]["bytes"],
                "bias_shift": {str(k): v for k, v in ev.bias_shift.items()},
            }
            | {k: rows[name][k] for k in ("latency_ms_b1", "throughput_b256") if k in rows[name]}
        )
    if "teacher" in rows and ev.latency:
        for r in rows.values():
            r["speedup_vs_teacher"] = rows["teacher"]["latency_ms_b1"] / r["latency_ms_b1"]
    report = {
        "recipe": recipe.name or run_dir.name,
        "data": data.description,
        "sizes": {
            "train": len(data.train),
            "transfer": len(data.transfer),
            "val": len(data.val),
            "test": len(data.test),
        },
        "loss": recipe.resolved_loss().model_dump(exclude_none=True),
        "rows": rows,
    }
    write_report(report, run_dir)
    return report


def run_seeds(
    recipe_path: str | Path,
    overrides: list[str],
    seeds: list[int],
    out: str | Path,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """Run a recipe once per student seed into ``out/seed_<s>``; the teacher is trained
    (or loaded) in the first run and reused by the others, so every student learns from
    the same teacher. Writes ``out/summary.json`` (mean ± sd per report row)."""
    from .recipe_io import load_recipe

    out = Path(out).resolve()  # teacher checkpoints are passed on as absolute paths
    reports = []
    first_dir = out / f"seed_{seeds[0]}"
    for i, s in enumerate(seeds):
        ov = [*overrides, f"train.seed={s}"]
        recipe, _ = load_recipe(recipe_path, ov)
        if i > 0 and recipe.teacher is not None:
            ov += _reuse_teacher_overrides(recipe, first_dir)
            recipe, _ = load_recipe(recipe_path, ov)
        reports.append(run_recipe(recipe, out / f"seed_{s}", resume=resume, force=force).report)
    summary = summarize_seeds(reports, seeds)
    dist.on_main((out / "summary.json").write_text, json.dumps(summary, indent=2))
    return summary


def _reuse_teacher_overrides(recipe: Recipe, first_dir: Path) -> list[str]:
    tc = recipe.teacher
    if tc.kind == "store":  # nothing is trained: every seed reads the same store
        return []
    if tc.kind == "module":
        return (
            []
            if tc.checkpoint
            else [f"teacher.checkpoint={first_dir / 'teacher' / 'model.safetensors'}"]
        )
    return [
        f"teacher.members.{i}.checkpoint={first_dir / 'teacher' / f'member_{i}' / 'model.safetensors'}"
        for i, m in enumerate(tc.members)
        if m.checkpoint is None
    ]


def summarize_seeds(reports: list[dict], seeds: list[int]) -> dict:
    """Mean ± sd of accuracy and errors per row; the distillation gain over the plain
    baseline in pooled standard deviations when both rows are there."""
    import statistics as st

    rows = {}
    for name in reports[0]["rows"]:
        accs = [100 * r["rows"][name]["accuracy"] for r in reports]
        errs = [r["rows"][name]["errors"] for r in reports]
        first = reports[0]["rows"][name]
        row = {
            "acc_mean": st.mean(accs),
            "acc_sd": st.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
            "errors_mean": st.mean(errs),
            "errors_sd": st.stdev(errs) if len(errs) > 1 else 0.0,
            "errors": errs,
            "params": first["params"],
            "bytes": first["bytes"],
        }
        for k in ("latency_ms_b1", "throughput_b256"):
            if k in first:
                row[k] = st.median(r["rows"][name][k] for r in reports)
        if "errors_by_class" in first:
            row["errors_by_class_mean"] = [
                st.mean(col)
                for col in zip(*(r["rows"][name]["errors_by_class"] for r in reports), strict=True)
            ]
        rows[name] = row
    if "teacher" in rows and "latency_ms_b1" in rows["teacher"]:
        for r in rows.values():
            r["speedup_vs_teacher"] = rows["teacher"]["latency_ms_b1"] / r["latency_ms_b1"]
    out = {"seeds": seeds, "rows": rows}
    if "plain" in rows and "student" in rows:
        p, d = rows["plain"], rows["student"]
        pooled = ((p["acc_sd"] ** 2 + d["acc_sd"] ** 2) / 2) ** 0.5
        gain = d["acc_mean"] - p["acc_mean"]
        out |= {
            "gain_points": gain,
            "pooled_sd": pooled,
            "gain_over_pooled_sd": gain / pooled if pooled > 0 else float("inf"),
        }
        if "teacher" in rows:
            gap = p["errors_mean"] - rows["teacher"]["errors_mean"]
            out["gap_closed"] = (p["errors_mean"] - d["errors_mean"]) / gap if gap else None
    return out


# ---------------------------------------------------------------- signal store


def data_preprocessing(recipe: Recipe) -> dict:
    """What turned raw data into the labelled inputs (enters the store fingerprint)."""
    d = recipe.data.model_dump(mode="json", exclude={"path"})
    if d["transfer"] is not None and not d["transfer"]["copies"]:
        for k in ("augment", "copies", "jitter_px"):  # stores labelled before these existed
            del d["transfer"][k]
    return {"data": d, "inputs": "float32 images scaled to [0, 1]", "augment": "none"}


def label_settings(recipe: Recipe, vocab: int):
    from .config import LabelConfig
    from .store import LabelSpec
    from .store.label import default_k

    lc = recipe.label or LabelConfig()
    # auto: dense up to 256 outputs; above, the labeller picks head or top-k (LabelSpec)
    signal = lc.signal if lc.signal != "auto" or vocab > 256 else "dense"
    sparse = signal in ("topk", "auto", "sampled")
    return LabelSpec(
        signal=signal,
        k=(lc.k or default_k(signal)) if sparse else None,
        dtype=lc.dtype,
        temperature=lc.temperature if sparse else 1.0,
        shard_size=lc.shard_size,
        batch_size=lc.batch_size,
        hidden=tuple(lc.hidden),
        tail_prior=lc.tail_prior if signal in ("topk", "auto") else False,
        head_layer=lc.head_layer if signal in ("head", "auto") else None,
        seed=lc.seed,
    )


def label_recipe(recipe: Recipe, out: str | Path, force: bool = False):
    """What `dk label` runs: the recipe's teacher over its transfer set, into store ``out``.

    Teachers without a checkpoint are trained first, into ``out/teacher``. Rerunning
    after an interruption continues where it stopped (teacher training included), and
    rerunning a finished store returns it; both only with the same recipe teacher and
    data sections (kept in the manifest and in ``out/teacher``): a changed teacher is
    refused with one line naming the first key that differs. ``force`` relabels, and
    retrains the teacher in ``out/teacher`` unless its recipe is the same."""
    from .store import label

    tc = recipe.teacher
    if tc is None:
        raise DKError("dk label needs a 'teacher:' section (kind: module or ensemble)")
    if tc.kind == "store":
        raise DKError("teacher.kind is store: that recipe already trains from a store")
    out = Path(out)
    record = store_recipe_record(recipe)
    rt = record["teacher"]
    members = [rt] if rt["kind"] == "module" else rt["members"]
    trains = any(m.get("checkpoint") is None for m in members)
    dist.on_main(prepare_label_folder, out, record, force, trains)
    data = load_data(recipe.data)
    teacher = build_teacher(recipe, data, out, resume=True)
    spec = label_settings(recipe, data.train.num_classes)
    return label(
        teacher,
        data.transfer.x,
        data.transfer.ids,
        out,
        spec,
        preprocessing=data_preprocessing(recipe),
        describe={"recipe": recipe.name, "data": data.description, "teacher": tc.kind},
        recipe=record,
        force=force,
    )


def store_recipe_record(recipe: Recipe) -> dict:
    """What a store made by `dk label` depends on in the recipe: its teacher and data
    sections, resolved (defaults filled in, absolute paths)."""
    dumped = recipe.model_dump(mode="json")
    return {"teacher": dumped["teacher"], "data": dumped["data"]}


def open_store_teacher(recipe: Recipe, data: DataSplits) -> StoreTeacher:
    """The recipe's store, checked against the run: same inputs, same example ids, same
    preprocessing, and (top-k) the loss temperatures it was labelled at."""
    from .losses.sampled import check_sampled_divergence
    from .store import SignalStore
    from .store.fingerprint import json_digest, tensor_digest

    tc = recipe.teacher
    store = SignalStore(tc.path)
    where = f"teacher.path {tc.path}"
    expect = {
        "data": tensor_digest(data.transfer.x),
        "example_ids": tensor_digest(data.transfer.ids),
        "preprocessing": json_digest(data_preprocessing(recipe)),
        **tc.expect,
    }
    store.check(expect, where)
    if store.task != "classification" or store.vocab != data.train.num_classes:
        raise DKError(
            f"{where}: the store holds {store.vocab}-way {store.task} signals but the data "
            f"has {data.train.num_classes} classes"
        )
    if store.signal in ("topk", "sampled"):
        for name, c in recipe.resolved_loss().active().items():
            if store.signal == "sampled" and name not in ("ce", "hinton_kd"):
                check_sampled_divergence(name, f"{where} (a sampled store): loss.{name}")
            t = getattr(c, "temperature", None)
            if t is not None and abs(t - store.temperature) > 1e-9:
                raise DKError(
                    f"{where}: fingerprint field 'temperature' differs: the {store.signal} store was "
                    f"labelled at {store.temperature:g}, loss.{name}.temperature is {t:g}; "
                    f"relabel with label.temperature={t:g} or use label.signal=dense"
                )
    return StoreTeacher(store)


def _row(model, logits, data: DataSplits, modules, teacher_logits, ev, shape) -> dict:
    row = quality(logits, data.test.y, teacher_logits, ev.ece_bins)
    row["params"] = param_count(modules)
    row["bytes"] = bytes_on_disk(modules)
    if ev.latency:
        row.update(speed(model, shape, ev.latency_runs))
    return row


def eval_run(recipe: Recipe, run_dir: Path) -> dict:
    """``dk eval RUN_DIR`` on a classify run: the saved student (and plain baseline)
    reloaded from its folder, as a user loads it, and scored on the recipe's test split."""
    from .export import load_model

    data = load_data(recipe.data)
    out = {"data": data.description, "models": {}}
    for name in ("student", "plain"):
        if not (run_dir / name).is_dir():
            continue
        model = load_model(run_dir / name).eval()
        q = quality(predict_logits(model, data.test), data.test.y, None, recipe.eval.ece_bins)
        out["models"][name] = {
            "model": str(run_dir / name),
            **{k: q[k] for k in ("accuracy", "errors", "n", "nll", "ece")},
        }
    if not out["models"]:
        raise DKError(f"{run_dir}: no saved student (student/); has the run finished?")
    return out
