"""The commands behind `kdkit`: each takes the composed Hydra config and does one job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdkit.atomic import atomic_write_text
from kdkit.pipeline.build import (
    build_datamodule,
    build_model,
    finish_loggers,
    load_teacher,
    output_dir,
    teacher_is_trained,
    to_container,
)
from kdkit.pipeline.checkpoint import is_hf_model, load_model, load_model_file
from kdkit.pipeline.distill import check_feasible, distill_student
from kdkit.pipeline.evaluate import evaluate_model, load_entries, teacher_test_logits
from kdkit.pipeline.log import get_logger
from kdkit.pipeline.preflight import preflight
from kdkit.pipeline.resume import resume_mode
from kdkit.pipeline.tasks import DEFAULT_TASK, task_of, task_runner
from kdkit.pipeline.threads import set_threads
from kdkit.pipeline.train import train_supervised
from kdkit.report import build_report, print_report

log = get_logger(__name__)


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def save_config(cfg: DictConfig) -> Path:
    """The resolved config as ``<run>/config.yaml`` (what this run actually used)."""
    out = output_dir(cfg) / "config.yaml"
    if _is_rank_zero():
        atomic_write_text(out, OmegaConf.to_yaml(to_container(cfg)))
    return out


def _title(cfg: DictConfig, teacher_name: str | None = None) -> str:
    teacher_name = teacher_name or str(cfg.teacher.name)
    return f"kdkit report: {cfg.experiment_name} ({teacher_name} -> {cfg.student.name}, " + (
        f"{cfg.distill.method})"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Teacher, scratch student, distilled student, evaluation and report, in one run (the
    experiment's task's own pipeline when it is not classification: :mod:`kdkit.pipeline.tasks`)."""
    task = task_of(cfg)
    if task != DEFAULT_TASK:
        return task_runner(task)(cfg)
    start = time.perf_counter()
    if cfg.export.in_run and cfg.export.onnx:
        _check_export_extra()  # before the training, not after it
    out = output_dir(cfg)
    save_config(cfg)
    dm = build_datamodule(cfg)
    dm.prepare()
    resume = resume_mode(cfg, run_command=True)
    trained_teacher = teacher_is_trained(cfg)
    if trained_teacher:
        teacher, teacher_spec = load_teacher(cfg, dm.num_classes, dm.input_shape)
        cache = check_feasible(cfg, dm, teacher)
    else:
        # Shapes are all the check needs: an untrained teacher, so a bad method fails in seconds.
        untrained, teacher_spec = build_model(cfg, "teacher", dm.num_classes, dm.input_shape)
        cache = check_feasible(cfg, dm, untrained)
        del untrained
    teacher_name = str(teacher_spec["name"])
    if not trained_teacher:
        teacher = train_supervised(cfg, dm, "teacher", "teacher", resume=resume).model
    scratch = train_supervised(
        cfg, dm, "student", "scratch", mixup_alpha=float(cfg.distill.mixup_alpha), resume=resume
    )
    distilled = distill_student(cfg, dm, teacher, "distilled", resume=resume, cache=cache)
    if not _is_rank_zero():
        return {}
    t_logits = teacher_test_logits(teacher, dm)
    entries = [
        evaluate_model(cfg, teacher, "teacher", teacher_name, dm, stage_dir=out / "teacher"),
        evaluate_model(
            cfg,
            scratch.model,
            "scratch",
            cfg.student.name,
            dm,
            teacher_logits=t_logits,
            stage_dir=out / "scratch",
        ),
        evaluate_model(
            cfg,
            distilled.model,
            "distilled",
            f"{cfg.student.name} ({cfg.distill.method})",
            dm,
            teacher_logits=t_logits,
            stage_dir=out / "distilled",
        ),
    ]
    title = _title(cfg, teacher_name)
    build_report(entries, out, title=title, config=to_container(cfg))
    print_report(entries, title=title)
    if cfg.export.in_run:
        _export_model(cfg, distilled.model, distilled.spec, out / "distilled")
    log.info("report: %s  (%.1f s)", out / "report.md", time.perf_counter() - start)
    return {e.role: e.accuracy for e in entries}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Supervised training of ``model=teacher|student``; writes <run>/<model>/model.pt."""
    out = output_dir(cfg)
    save_config(cfg)
    dm = build_datamodule(cfg)
    dm.prepare()
    role = str(cfg.model)
    trained = train_supervised(cfg, dm, role, role, resume=resume_mode(cfg))
    if not _is_rank_zero():
        return {}
    entry = evaluate_model(
        cfg,
        trained.model,
        "teacher" if role == "teacher" else "scratch",
        cfg[role].name,
        dm,
        stage_dir=out / role,
    )
    print_report([entry], title=f"kdkit train: {cfg[role].name}")
    log.info("model: %s", out / role / "model.pt")
    return {"accuracy": entry.accuracy}


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Distil the student from ``teacher.checkpoint`` (or ``distill.teacher_cache``)."""
    out = output_dir(cfg)
    save_config(cfg)
    dm = build_datamodule(cfg)
    dm.prepare()
    teacher, teacher_name = None, None
    if cfg.teacher.checkpoint or not cfg.distill.teacher_cache:
        teacher, teacher_spec = load_teacher(cfg, dm.num_classes, dm.input_shape)
        teacher_name = str(teacher_spec["name"])
    cache = check_feasible(cfg, dm, teacher)
    distilled = distill_student(cfg, dm, teacher, "distilled", resume=resume_mode(cfg), cache=cache)
    if not _is_rank_zero():
        return {}
    entry = evaluate_model(
        cfg,
        distilled.model,
        "distilled",
        f"{cfg.student.name} ({cfg.distill.method})",
        dm,
        teacher_logits=teacher_test_logits(teacher, dm),
        stage_dir=out / "distilled",
    )
    title = _title(cfg, teacher_name)
    build_report([entry], out, title=title, config=to_container(cfg))
    print_report([entry], title=title)
    log.info("model: %s", out / "distilled" / "model.pt")
    log.info("report: %s", out / "report.md")
    return {"accuracy": entry.accuracy}


def _checkpoint_path(cfg: DictConfig) -> str:
    path = cfg.checkpoint or cfg[str(cfg.model)].checkpoint
    if not path:
        raise ValueError(
            f"`kdkit {cfg.command}` needs a model file: pass checkpoint=<path to model.pt or "
            ".ckpt> (or teacher.checkpoint=... with model=teacher)."
        )
    return str(path)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a model file on the test split (agreement too when teacher.checkpoint is set)."""
    out = output_dir(cfg)
    path = _checkpoint_path(cfg)
    model = load_model(path, what="checkpoint")
    dm = build_datamodule(cfg)
    dm.prepare()
    if model.kdkit_spec["num_classes"] != dm.num_classes:
        raise ValueError(
            f"checkpoint {path!r} predicts {model.kdkit_spec['num_classes']} classes but dataset "
            f"{cfg.data.name!r} has {dm.num_classes}; evaluate it on the data it was trained on."
        )
    teacher = None
    if teacher_is_trained(cfg) and cfg.teacher.checkpoint != path:
        teacher, _ = load_teacher(cfg, dm.num_classes, dm.input_shape)
    role = "teacher" if model.kdkit_spec.get("role") == "teacher" else "distilled"
    entry = evaluate_model(
        cfg,
        model,
        role,
        model.kdkit_spec["name"],
        dm,
        teacher_logits=teacher_test_logits(teacher, dm),
    )
    atomic_write_text(out / "eval.json", json.dumps(entry.to_dict(), indent=2) + "\n")
    print_report([entry], title=f"kdkit eval: {path}")
    return {"accuracy": entry.accuracy}


def _run_dirs(cfg: DictConfig) -> list[Path]:
    """``run_dirs`` as folders: a list, or one path given without brackets."""
    given = cfg.run_dirs
    paths = [given] if isinstance(given, str) else list(given or [])
    if paths:
        return [Path(str(p)) for p in paths]
    found = Path("runs", str(cfg.experiment_name)).glob("*/*/metrics.json")
    candidates = sorted({p.parent.parent for p in found}, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"no run folders given and none found under runs/{cfg.experiment_name}/; pass "
            "run_dirs=[runs/<experiment>/<time>] (one or more)."
        )
    return [candidates[-1]]


def _load_run(run_dir: Path) -> tuple[list[Any], Any, str]:
    """A run folder's report rows, its saved config and the title its report had."""
    config_file = run_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
    task = (config or {}).get("task") or DEFAULT_TASK
    if task != DEFAULT_TASK:
        raise ValueError(
            f"run folder {str(run_dir)!r} is a task={task!r} run; `kdkit report` "
            "rebuilds classification runs only. That run wrote its own report.md and report.json "
            "(and its stages' files) when it ended: read those."
        )
    entries = load_entries(run_dir)
    title = _stored_title(run_dir, config, entries) or f"kdkit report: {run_dir}"
    return entries, config, title


def _combined(runs: dict[Path, list[Any]]) -> list[Any]:
    """Every run's rows in one list; a name two runs share gets its run folder's name."""
    names = [e.name for entries in runs.values() for e in entries]
    rows = []
    for run_dir, entries in runs.items():
        for e in entries:
            name = f"{e.name} [{run_dir.name}]" if names.count(e.name) > 1 else e.name
            rows.append(dataclasses.replace(e, name=name, speedup_vs_teacher=None))
    return rows


def report(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the report of one run folder in place, or compare several run folders in one
    table and plot written to this command's own folder."""
    run_dirs = _run_dirs(cfg)
    if len(run_dirs) == 1:
        entries, config, title = _load_run(run_dirs[0])
        build_report(entries, run_dirs[0], title=title, config=config)
        print_report(entries, title=title)
        log.info("report: %s", run_dirs[0] / "report.md")
        return {str(run_dirs[0]): {e.role: e.accuracy for e in entries}}
    runs, titles = {}, []
    for run_dir in run_dirs:
        entries, _, title = _load_run(run_dir)
        runs[run_dir] = entries
        titles.append(f"{run_dir}: {title.removeprefix('kdkit report: ')}")
    rows = _combined(runs)
    out = output_dir(cfg)
    title = f"kdkit report: {len(run_dirs)} runs compared"
    build_report(rows, out, title=title, config={"run_dirs": [str(p) for p in run_dirs]},
                 sources=titles)  # fmt: skip
    print_report(rows, title=title)
    log.info("report: %s", out / "report.md")
    return {str(p): {e.role: e.accuracy for e in entries} for p, entries in runs.items()}


def _stored_title(run_dir: Path, config: Any, entries: list[Any]) -> str | None:
    """The title the run gave its report: report.json, report.md, else rebuilt from config.yaml."""
    try:
        title = json.loads((run_dir / "report.json").read_text()).get("title")
        if title:
            return str(title)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        first = (run_dir / "report.md").read_text().splitlines()[0]
        if first.startswith("# "):
            return first[2:].strip()
    except (OSError, IndexError):
        pass
    try:
        saved = OmegaConf.create(config)
        teacher = next((e.name for e in entries if e.role == "teacher"), None)
        return _title(saved, teacher)  # type: ignore[arg-type]
    except Exception:  # a config.yaml of another layout: fall back to the folder name
        return None


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the ONNX exporter's INFO chatter and tracer warnings for the CLI user."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"(onnxscript|onnx_ir|torch\.onnx).*")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _check_export_extra() -> None:
    missing = []
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(
            f"ONNX export needs the export extra ({', '.join(missing)} not installed): "
            "pip install 'kdkit[export]', or pass export.onnx=false for the TorchScript file only."
        )


def export(cfg: DictConfig) -> dict[str, Any]:
    """ONNX (checked against torch in onnxruntime) and TorchScript files of a model file."""
    if cfg.export.onnx:
        _check_export_extra()
    path = _checkpoint_path(cfg)
    model = load_model(path, what="checkpoint")
    return _export_model(cfg, model, load_model_file(path)["spec"], output_dir(cfg))


def _example_input(model: torch.nn.Module, spec: dict[str, Any]) -> Any:
    """A fixed random batch of two inputs of the model's shape: images ``[2, C, H, W]``; for a
    Hugging Face model, ``input_ids`` of its vocabulary ``[2, L]`` (L: the data's max_length)
    with an ``attention_mask`` that pads the second row's end."""
    generator = torch.Generator().manual_seed(0)
    if not is_hf_model(model):
        return torch.rand(2, *spec["input_shape"], generator=generator)
    length = int(spec["input_shape"][0])
    vocab = int(model.config.vocab_size)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2 + 1 :] = 0
    return {
        "input_ids": torch.randint(0, vocab, (2, length), generator=generator),
        "attention_mask": mask,
    }


def _export_model(
    cfg: DictConfig, model: torch.nn.Module, spec: dict[str, Any], out: Path
) -> dict[str, Any]:
    """ONNX (checked in onnxruntime; a Hugging Face model's batch and sequence axes dynamic)
    and TorchScript files of ``model`` in ``out``, as ``cfg.export`` asks."""
    from kdkit.export import export_onnx, export_torchscript

    example = _example_input(model, spec)
    atol = float(cfg.export.atol)
    written: dict[str, Any] = {}
    with _quiet_export():
        if cfg.export.onnx:
            onnx_path = export_onnx(model, example, out / "model.onnx", atol=atol)
            written["onnx"] = str(onnx_path)
            log.info(
                "ONNX checked in onnxruntime: max |diff| = %.2e (atol %g)",
                onnx_path.max_abs_diff,
                atol,
            )
        if cfg.export.torchscript:
            written["torchscript"] = str(export_torchscript(model, example, out / "model.ts"))
    for kind, file in written.items():
        log.info("%s written: %s", kind, file)
    return written


def cache(cfg: DictConfig) -> dict[str, Any]:
    """Run the teacher over the training split once and store its outputs (TeacherCache)."""
    from kdkit.cache import SeededViews, TeacherCache

    out = output_dir(cfg)
    dm = build_datamodule(cfg)
    splits = dm.prepare()
    if splits.collate_fn is not None:
        raise ValueError(
            f"`kdkit cache` batches samples with torch's default collation, but data set "
            f"{cfg.data.name!r} pads its own batches (text, dict batches), which the teacher "
            "cache does not support yet; distil with the online teacher instead (no "
            "distill.teacher_cache)."
        )
    teacher, _ = load_teacher(cfg, dm.num_classes, dm.input_shape)
    path = Path(str(cfg.cache.path or out / "teacher_cache"))
    epochs = int(cfg.cache.epochs)
    train = splits.train
    if epochs > 1 or cfg.data.get("augment"):  # not every data set has augmentation
        # Random augmentation: cache `epochs` seeded views, which `distill` replays exactly.
        train = SeededViews(train, seed=int(cfg.seed), num_views=epochs)
    built = TeacherCache.build(
        teacher,
        train,
        path,
        top_k=cfg.cache.top_k,
        batch_size=int(cfg.cache.batch_size),
        epochs=epochs,
    )
    log.info(
        "teacher cache: %s (%d samples); use distill.teacher_cache=%s", built.path, len(built), path
    )
    return {"path": str(path)}


COMMANDS = {
    "run": (run, "train the teacher, a scratch student and a distilled student; evaluate; report"),
    "train": (train, "train one model with labels (model=teacher or model=student)"),
    "distill": (distill, "distil the student from teacher.checkpoint=<model.pt>"),
    "eval": (evaluate, "evaluate checkpoint=<model.pt> on the test split"),
    "report": (report, "rebuild the report of run folders (run_dirs=[...])"),
    "export": (export, "export checkpoint=<model.pt> to ONNX (checked) and TorchScript"),
    "cache": (cache, "store the outputs of teacher.checkpoint on the training split"),
}


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def dispatch(cfg: DictConfig) -> Any:
    """Check the config and the machine (:mod:`~kdkit.pipeline.preflight`), set the thread
    count (:mod:`~kdkit.pipeline.threads`), then run ``cfg.command``."""
    command = str(cfg.command)
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}.")
    task = task_of(cfg)
    if task != DEFAULT_TASK and command != "run":
        raise ValueError(
            f"`kdkit {command}` works on the classification pipeline; task={task!r} runs as a "
            f"whole with `kdkit run` (its teacher, scratch and distilled stages and report)."
        )
    preflight(cfg, _command_line_overrides())
    if task == DEFAULT_TASK:
        set_threads(cfg, build_datamodule(cfg))
    elif cfg.get("threads"):  # other tasks' models are not in the registry: threads as given
        torch.set_num_threads(int(cfg.threads))
    try:
        return COMMANDS[command][0](cfg)
    finally:
        finish_loggers()
