"""Checks that a command can run here, made before it does any work: one-line errors that say
what to set, instead of a traceback from deep inside Hydra or Lightning."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from kdkit.pipeline.keys import check_overrides_are_read

GPU_ACCELERATORS = ("gpu", "cuda")
# What a missing value is, said where the config group alone does not make it clear.
_WHAT = {"data.root": "the folder that holds train/<class>/ and val/<class>/"}


def check_required_values(cfg: DictConfig) -> None:
    """Every ``???`` of the composed config has been given a value."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        what = f" ({_WHAT[key]})" if key in _WHAT else ""
        raise ValueError(
            f"{key} is not set but this config needs it{what}: pass {key}=<value> on the "
            f"command line, e.g. `kdkit {cfg.command} {key}=<...>`."
        )


def check_accelerator(cfg: DictConfig) -> None:
    """``trainer=gpu`` (``accelerator: gpu``) only where PyTorch sees a CUDA GPU."""
    trainer = cfg.get("trainer")
    if trainer is None or str(trainer.get("accelerator")) not in GPU_ACCELERATORS:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"trainer=gpu (trainer.accelerator={trainer.accelerator}) but PyTorch finds no CUDA "
            f"GPU here (torch {torch.__version__}, torch.cuda.is_available() is False): use "
            "trainer=default to train on the CPU, or install a CUDA build of PyTorch."
        )


def preflight(cfg: DictConfig, overrides: list[str]) -> None:
    """All checks, in the order a user would fix them."""
    check_overrides_are_read(cfg, overrides)
    check_required_values(cfg)
    check_accelerator(cfg)
