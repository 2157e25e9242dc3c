"""Objects from config: data module, models, distillation terms, trainer, loggers."""

from __future__ import annotations

import difflib
import glob
import os
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
) -> L.Trainer:
    """The stage's Trainer: atomic checkpoints, spec in every checkpoint, the run's loggers."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

    callbacks: list[Any] = [ModelSpecCallback(spec)]
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


def resolve_ckpt_path(cfg: DictConfig, stage: str) -> str | None:
    """``ckpt_path``: None, a file, or ``last`` (newest last.ckpt of this stage, experiment)."""
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if str(value) != "last":
        if not Path(str(value)).is_file():
            raise FileNotFoundError(
                f"ckpt_path={value!r} does not exist; pass a .ckpt file or ckpt_path=last to "
                "resume the newest run of this experiment."
            )
        return str(value)
    here = output_dir(cfg) / stage / "checkpoints" / "last.ckpt"
    if here.is_file():
        return str(here)
    root = Path("runs")
    pattern = os.path.join(root, str(cfg.experiment_name), "*", stage, "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no {stage}/checkpoints/last.ckpt in this run dir nor under "
            f"{root}/{cfg.experiment_name}/*/; nothing to resume. Drop ckpt_path or pass a path."
        )
    return found[-1]


def to_container(cfg: DictConfig | ListConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)
