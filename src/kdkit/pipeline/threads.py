"""The default intra-op thread count (``threads: null``): picked from the models' size.

On the 2-core machine of benchmarks/RESULTS.md ("Threads"), the digits pipeline on 2
intra-op threads took 8x as long as on 1 while other processes kept the cores busy (the
issue's own measurement: 176 s against 12.4 s), with the same accuracies: a small model's ops
are too short for threads to pay for their synchronisation, and a descheduled thread stalls
every op. So models under ``SMALL_MODEL_PARAMS`` parameters
(teacher and student both) run on one thread; larger ones keep PyTorch's default. The choice
depends on the config only, never on the machine's load, so a run's numbers do not either.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from kdkit.pipeline.build import ROLES, hf_directory, spec_for
from kdkit.pipeline.checkpoint import build_from_spec

# The digits models (<= 95k parameters) are under it, the CIFAR zoo (>= 278k) above it.
SMALL_MODEL_PARAMS = 200_000


def _parameter_count(cfg: DictConfig, role: str, datamodule: Any) -> int:
    spec = spec_for(cfg, role, datamodule.num_classes, datamodule.input_shape)
    if hf_directory(spec["name"]) is not None:
        # from_pretrained refuses the meta device: a model directory is read as it is
        model = build_from_spec(spec)
    else:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = build_from_spec(spec)
    return sum(p.numel() for p in model.parameters())


def default_threads(cfg: DictConfig, datamodule: Any) -> int | None:
    """1 when every model of ``cfg`` is small, else None (PyTorch's default)."""
    largest = max(_parameter_count(cfg, role, datamodule) for role in ROLES)
    return 1 if largest < SMALL_MODEL_PARAMS else None


def set_threads(cfg: DictConfig, datamodule: Any) -> None:
    """``cfg.threads`` if set, else :func:`default_threads` (None leaves torch's setting)."""
    threads = cfg.threads if cfg.threads is not None else default_threads(cfg, datamodule)
    if threads:
        torch.set_num_threads(int(threads))
