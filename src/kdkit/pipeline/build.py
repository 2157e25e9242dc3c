"""Objects from config: data module, models, distillation terms, trainer, loggers."""

from __future__ import annotations

import difflib
import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdkit.config import terms_from_config
from kdkit.distiller import Term
from kdkit.pipeline.checkpoint import (
    AtomicCheckpointIO,
    ModelSpecCallback,
    build_from_spec,
    load_model_file,
    model_spec,
)

ROLES = ("teacher", "student")


def output_dir(cfg: DictConfig) -> Path:
    """The run directory: ``paths.output_dir`` (Hydra's output dir inside `kdkit`)."""
    try:
        return Path(str(cfg.paths.output_dir))
    except Exception:  # the hydra: resolver is only there inside a Hydra app
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
        return Path.cwd()


def build_datamodule(cfg: DictConfig) -> Any:
    """``cfg.data`` -> KDDataModule; unknown dataset names list the registered ones."""
    from kdkit.data import list_datasets

    name = cfg.data.get("name")
    if name not in list_datasets():
        close = difflib.get_close_matches(str(name), list_datasets(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown dataset data.name={name!r}.{hint} Available: {', '.join(list_datasets())} "
            "(config group data=: digits, cifar10, cifar100, image_folder, synthetic)."
        )
    return instantiate(cfg.data, _convert_="all")


def spec_for(cfg: DictConfig, role: str, num_classes: int, input_shape: Sequence[int]) -> dict:
    if role not in ROLES:
        raise ValueError(f"model={role!r} is not a model role; use one of {', '.join(ROLES)}.")
    node = cfg[role]
    return model_spec(node.name, node.get("kwargs") or {}, num_classes, tuple(input_shape), role)


def build_model(cfg: DictConfig, role: str, num_classes: int, input_shape: Sequence[int]):
    """A freshly initialised teacher or student, and its spec."""
    spec = spec_for(cfg, role, num_classes, input_shape)
    return build_from_spec(spec), spec


def load_teacher(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """Load ``teacher.checkpoint``, checking that it predicts the data's classes."""
    path = cfg.teacher.get("checkpoint")
    if not path:
        raise ValueError(
            "this command needs a trained teacher: pass teacher.checkpoint=<path to model.pt>, "
            "e.g. the teacher/model.pt that `kdkit train` or `kdkit run` wrote."
        )
    data = load_model_file(path, what="teacher checkpoint (teacher.checkpoint)")
    spec = data["spec"]
    if int(spec["num_classes"]) != int(num_classes):
        raise ValueError(
            f"teacher checkpoint {str(path)!r} predicts {spec['num_classes']} classes but dataset "
            f"{cfg.data.name!r} has {num_classes}; use a teacher trained on this dataset "
            "(`kdkit train model=teacher data=...`) or pick the matching data=."
        )
    if str(spec["name"]) != str(cfg.teacher.name):
        print(
            f"warning: teacher.checkpoint={path} holds a {spec['name']!r} model, not "
            f"teacher.name={cfg.teacher.name!r}; using the checkpoint's {spec['name']!r} (set "
            f"teacher={spec['name']} or teacher.name / teacher.feature_layers to match it).",
            file=sys.stderr,
            flush=True,
        )
    model = build_from_spec(spec)
    model.load_state_dict(data["state_dict"])
    model.kdkit_spec = spec  # type: ignore[assignment]
    return model.eval(), spec


def build_terms(cfg: DictConfig) -> dict[str, Term]:
    """``cfg.distill.terms`` -> ``{name: Term}`` (the mapping Distiller(terms=...) takes)."""
    return terms_from_config(cfg.distill)


def build_optimizer_factories(cfg: DictConfig) -> tuple[Any, Any]:
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return optimizer, scheduler


def build_loggers(cfg: DictConfig, stage: str) -> list[Any]:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        target = str(node._target_)
        extra: dict[str, Any] = {}
        if target.endswith(("CSVLogger", "TensorBoardLogger")):
            extra["version"] = stage
        elif target.endswith("MLFlowLogger"):
            extra["run_name"] = stage
        elif target.endswith("WandbLogger"):
            extra["name"] = stage
        loggers.append(instantiate(node, **extra))
    return loggers


class _NoVersionNumber:
    """Progress-bar mixin: drop the logger version (``v_num``), which here is the stage name."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)
        return metrics


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    stage: str,
    spec: Mapping[str, Any],
    *,
    max_epochs: int | None = None,
    checkpoints: bool = True,
    info: Mapping[str, Any] | None = None,
) -> L.Trainer:
    """The stage's Trainer: atomic checkpoints, spec in every checkpoint, the run's loggers."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

    callbacks: list[Any] = [ModelSpecCallback(spec, info)]
    if checkpoints:
        callbacks.append(
            # Lightning writes last.ckpt only in an epoch that also saved a top-k file.
            ModelCheckpoint(
                dirpath=stage_dir / "checkpoints",
                filename="epoch{epoch:03d}",
                auto_insert_metric_name=False,
                save_last=True,
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)
    if trainer_cfg.get("enable_progress_bar", True):
        bar = cfg.get("progress_bar", "rich")
        if bar in ("rich", "tqdm"):
            base = RichProgressBar if bar == "rich" else TQDMProgressBar
            callbacks.append(type(f"Stage{base.__name__}", (_NoVersionNumber, base), {})())
        else:
            trainer_cfg["enable_progress_bar"] = False
    optional = ("limit_train_batches", "limit_val_batches", "limit_test_batches")
    optional += ("gradient_clip_val",)
    for key in optional:
        if trainer_cfg.get(key) is None:
            trainer_cfg.pop(key, None)
    if max_epochs is not None:
        trainer_cfg["max_epochs"] = max_epochs
    return instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=build_loggers(cfg, stage) or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(stage_dir),
        enable_checkpointing=checkpoints,
    )


def run_info(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """What a stage's checkpoint must share with this run to be resumed by it.

    Stored in every checkpoint (``checkpoint["kdkit_run"]``); the distilled stage adds the
    method and its resolved terms, because a kd checkpoint resumed as dkd would silently be
    reported as dkd.
    """
    info: dict[str, Any] = {"stage": stage}
    if stage == "distilled":
        info["method"] = str(cfg.distill.get("method"))
        info["terms"] = _normal(to_container(cfg.distill.get("terms") or {}))
    return info


def _normal(value: Any) -> Any:
    # Compare configs as JSON: tuples/lists and key order do not matter.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _spec_key(spec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("name", "kwargs", "num_classes", "input_shape")
    return _normal({k: spec.get(k) for k in keys})


def _describe(spec: Mapping[str, Any]) -> str:
    kwargs = spec.get("kwargs") or {}
    return f"{spec.get('name')}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def _saved_run_info(path: Path, stage: str) -> dict[str, Any] | None:
    """Run info of a checkpoint written before it was stored: its run folder's config.yaml."""
    config = path.parent.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        saved = OmegaConf.load(config)
        assert isinstance(saved, DictConfig)
        return run_info(saved, stage)
    except Exception:
        return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError("it cannot be read (truncated or not a torch file)") from exc
    if not isinstance(data, Mapping) or "kdkit_model" not in data:
        raise ValueError("it is not a kdkit checkpoint (no model spec stored in it)")
    return dict(data)


def checkpoint_mismatch(
    path: Path, cfg: DictConfig, stage: str, spec: Mapping[str, Any]
) -> tuple[str | None, int | None]:
    """(why ``path`` cannot resume this stage, or None; its completed epochs)."""
    try:
        data = _read_checkpoint(path)
    except ValueError as exc:
        return str(exc), None
    epochs = int(data.get("epoch", -1)) + 1
    theirs = data["kdkit_model"]
    if _spec_key(theirs) != _spec_key(spec):
        return (
            f"it holds model {_describe(theirs)} with {theirs.get('num_classes')} classes and "
            f"input {theirs.get('input_shape')}, this run builds {_describe(spec)} with "
            f"{spec.get('num_classes')} classes and input {spec.get('input_shape')}",
            epochs,
        )
    info = data.get("kdkit_run") or _saved_run_info(path, stage)
    mine = run_info(cfg, stage)
    if info is None:
        if stage == "distilled":
            return "neither it nor its run folder says which distill method trained it", epochs
        return None, epochs
    if info.get("stage", stage) != stage:
        return f"it is a {info.get('stage')!r} checkpoint, not {stage!r}", epochs
    if stage == "distilled":
        if info.get("method") != mine["method"]:
            return (
                f"it was trained with distill={info.get('method')}, this run uses "
                f"distill={mine['method']}",
                epochs,
            )
        if _normal(info.get("terms")) != mine["terms"]:
            return (
                f"its distill.terms differ from this run's (same method {mine['method']}, other "
                "weights, layers or losses)",
                epochs,
            )
    return None, epochs


def _announce(path: Path, epochs: int | None, cfg: DictConfig, stage: str) -> None:
    total = cfg.trainer.get("max_epochs")
    if stage == "teacher" and cfg.teacher.get("max_epochs"):
        total = cfg.teacher.max_epochs
    done = "; already complete, reusing it" if total and epochs and epochs >= int(total) else ""
    print(f"resuming from {path} (epoch {epochs}{done})", flush=True)


def resolve_ckpt_path(
    cfg: DictConfig,
    stage: str,
    spec: Mapping[str, Any],
    *,
    required: bool = True,
    prefer: Path | None = None,
) -> str | None:
    """``ckpt_path``: None, a file, or ``last``.

    ``last`` takes the newest ``<stage>/checkpoints/last.ckpt`` of this run dir, of ``prefer``
    (a run dir), or of ``runs/<experiment>/*/`` whose model spec (and, for the distilled stage,
    method and terms) match this run; others are skipped, and if none matches the ValueError
    lists each one and why. With ``required=False`` (``kdkit run``: a stage that never started)
    no match means None.
    """
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if str(value) != "last":
        path = Path(str(value))
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={value!r} does not exist; pass a .ckpt file or ckpt_path=last to "
                "resume the newest matching run of this experiment."
            )
        why, epochs = checkpoint_mismatch(path, cfg, stage, spec)
        if why is not None and (why.startswith("it holds model") or epochs is None):
            raise ValueError(
                f"ckpt_path={value!r} cannot resume stage {stage!r}: {why}. Pass a checkpoint "
                "of this model (or change the student=/teacher= options to the ones it was "
                "trained with)."
            )
        if why is not None:
            print(f"warning: ckpt_path={value}: {why}; resuming it anyway.", flush=True)
        _announce(path, epochs, cfg, stage)
        return str(path)
    tail = Path(stage) / "checkpoints" / "last.ckpt"
    here = output_dir(cfg) / tail
    root = Path("runs") / str(cfg.experiment_name)
    pattern = os.path.join(root, "*", str(tail))
    found = sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)
    candidates: list[Path] = [here] if here.is_file() else []
    if prefer is not None and (prefer / tail).is_file():
        candidates.append(prefer / tail)
    for f in found:
        if Path(f).resolve() not in {c.resolve() for c in candidates}:
            candidates.append(Path(f))
    rejected = []
    for path in candidates:
        why, epochs = checkpoint_mismatch(path, cfg, stage, spec)
        if why is None:
            _announce(path, epochs, cfg, stage)
            return str(path)
        rejected.append(f"  {path}: {why}")
    if not required:
        if rejected:
            print(
                f"ckpt_path=last: no matching checkpoint for stage {stage!r}, training it "
                "from the start; skipped:\n" + "\n".join(rejected),
                flush=True,
            )
        return None
    if not rejected:
        raise FileNotFoundError(
            f"ckpt_path=last: no {tail} in this run dir nor under {root}/*/; nothing to "
            "resume. Drop ckpt_path, or pass ckpt_path=<path to a .ckpt file>."
        )
    raise ValueError(
        f"ckpt_path=last: none of the {len(rejected)} {tail} files found matches this run "
        f"(stage {stage!r}, model {_describe(spec)}"
        + (f", distill={cfg.distill.get('method')}" if stage == "distilled" else "")
        + "):\n"
        + "\n".join(rejected)
        + "\nDrop ckpt_path to start afresh, or pass ckpt_path=<path to a .ckpt file> "
        "explicitly."
    )


def to_container(cfg: DictConfig | ListConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)
