"""Objects from config: data module, models, optimizer factories, loggers, trainer."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdkit.models.hf_models import HF_PREFIX, is_local_path
from kdkit.pipeline.callbacks import build_callbacks
from kdkit.pipeline.checkpoint import (
    AtomicCheckpointIO,
    ModelSpecCallback,
    build_from_spec,
    load_model_file,
    model_spec,
)
from kdkit.pipeline.log import get_logger

log = get_logger(__name__)

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
    """``cfg.data`` -> KDDataModule (an unknown ``data.name`` lists the registered data sets)."""
    return instantiate(cfg.data, _convert_="all")


def spec_for(cfg: DictConfig, role: str, num_classes: int, input_shape: Sequence[int]) -> dict:
    if role not in ROLES:
        raise ValueError(f"model={role!r} is not a model role; use one of {', '.join(ROLES)}.")
    node = cfg[role]
    kwargs = dict(node.kwargs or {})
    if hf_directory(str(node.name)) is not None and kwargs.pop("config", None):
        # The directory's config.json is the model: overrides of its sizes would re-initialise
        # the weights they touch (transformers only reports it).
        log.info("%s.name=%s: %s.kwargs.config is not applied to a model directory", role,
                 node.name, role)  # fmt: skip
    return model_spec(node.name, kwargs, num_classes, tuple(input_shape), role)


def build_model(cfg: DictConfig, role: str, num_classes: int, input_shape: Sequence[int]):
    """A freshly initialised teacher or student, and its spec."""
    spec = spec_for(cfg, role, num_classes, input_shape)
    return build_from_spec(spec), spec


def hf_directory(name: str) -> Path | None:
    """The local directory of model name ``hf:<directory>``, else None."""
    if not name.startswith(HF_PREFIX) or not is_local_path(name[len(HF_PREFIX) :]):
        return None
    return Path(name[len(HF_PREFIX) :]).expanduser()


def teacher_is_trained(cfg: DictConfig) -> bool:
    """Whether the teacher is used as it is, without a training stage: ``teacher.checkpoint``
    is set, or ``teacher.name`` is ``hf:<local directory>`` (a trained Hugging Face model,
    e.g. a ``<run>/teacher/hf`` folder) and ``teacher.finetune`` is not true."""
    if cfg.teacher.checkpoint:
        return True
    return hf_directory(str(cfg.teacher.name)) is not None and not cfg.teacher.get("finetune")


def _load_hf_teacher(
    cfg: DictConfig, num_classes: int, input_shape: Sequence[int]
) -> tuple[nn.Module, dict]:
    directory = hf_directory(str(cfg.teacher.name))
    assert directory is not None
    if (directory / "config.json").is_file():
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(str(directory), local_files_only=True).num_labels
        if labels != int(num_classes):
            raise ValueError(
                f"teacher.name={cfg.teacher.name}: the model in {str(directory)!r} predicts "
                f"{labels} classes but dataset {cfg.data.name!r} has {num_classes}; use a "
                "model trained on this data set, or fine-tune this one first "
                "(teacher.finetune=true: a new head, trained with labels)."
            )
    model, spec = build_model(cfg, "teacher", num_classes, input_shape)
    model.kdkit_spec = spec  # type: ignore[assignment]
    return model.eval(), spec


def load_teacher(
    cfg: DictConfig, num_classes: int, input_shape: Sequence[int] = ()
) -> tuple[nn.Module, dict]:
    """Load ``teacher.checkpoint``, or the trained Hugging Face model ``teacher.name=hf:<dir>``
    (:func:`teacher_is_trained`), checking that it predicts the data's classes."""
    path = cfg.teacher.checkpoint
    if not path and teacher_is_trained(cfg):
        return _load_hf_teacher(cfg, num_classes, input_shape)
    if not path:
        raise ValueError(
            "this command needs a trained teacher: pass teacher.checkpoint=<path to model.pt>, "
            "e.g. the teacher/model.pt that `kdkit train` or `kdkit run` wrote, or "
            "teacher.name=hf:<directory> for a trained Hugging Face model (save_pretrained)."
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
        log.warning(
            "teacher.checkpoint=%s holds a %r model, not teacher.name=%r; using the checkpoint's "
            "%r (set teacher=%s or teacher.name / teacher.feature_layers to match it).",
            path,
            spec["name"],
            str(cfg.teacher.name),
            spec["name"],
            spec["name"],
        )
    model = build_from_spec(spec)
    model.load_state_dict(data["state_dict"])
    model.kdkit_spec = spec  # type: ignore[assignment]
    return model.eval(), spec


def build_optimizer_factories(cfg: DictConfig) -> tuple[Any, Any]:
    optimizer = instantiate(cfg.optimizer) if cfg.optimizer else None
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    return optimizer, scheduler


# Each logger's own argument for "which run of the experiment this is": the stage.
_STAGE_ARGUMENT = {
    "CSVLogger": "version",
    "TensorBoardLogger": "version",
    "MLFlowLogger": "run_name",
    "WandbLogger": "name",
}


def finish_loggers() -> None:
    """End the W&B run a stage left open: Lightning's WandbLogger would otherwise log the next
    stage (scratch after teacher) into the same run, and an in-process caller never gets its
    files finished."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_loggers(cfg: DictConfig, stage: str) -> list[Any]:
    finish_loggers()
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        argument = _STAGE_ARGUMENT.get(str(node._target_).rsplit(".", 1)[-1])
        loggers.append(instantiate(node, **({argument: stage} if argument else {})))
    return loggers


def build_trainer(
    cfg: DictConfig,
    stage_dir: Path,
    stage: str,
    spec: Mapping[str, Any],
    *,
    max_epochs: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> L.Trainer:
    """The stage's Trainer from ``cfg.trainer``: the ``callbacks`` group, the model spec (and
    ``info``) in every checkpoint, atomic checkpoint files, the run's loggers."""
    callbacks = [ModelSpecCallback(spec, info), *build_callbacks(cfg, stage_dir)]
    extra = {"max_epochs": max_epochs} if max_epochs is not None else {}
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_loggers(cfg, stage) or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(stage_dir),
        # callbacks=none means no checkpoints, not Lightning's default ModelCheckpoint
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        _convert_="all",
        **extra,
    )


def to_container(cfg: DictConfig | ListConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)
