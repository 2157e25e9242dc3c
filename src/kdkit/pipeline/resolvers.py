"""OmegaConf resolvers the shipped configs use; registered when ``kdkit.pipeline`` is imported.

``${kdkit.feature_layers:<model name>,<model kwargs>}``: the feature points the model registers
(:func:`kdkit.models.feature_paths`), so the student/teacher configs do not repeat them.

``${kdkit.unique_dir:<path>}``: a run folder made for this run alone (:func:`unique_dir`);
``hydra.run.dir`` and ``hydra.sweep.dir`` use it, so concurrent runs never share a folder.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf


@functools.lru_cache(maxsize=64)
def _feature_layers(name: str, kwargs_json: str) -> tuple[str, ...]:
    from kdkit.models import feature_paths

    return feature_paths(name, **json.loads(kwargs_json))


def feature_layers(name: str, kwargs: DictConfig | dict[str, Any] | None = None) -> list[str]:
    """``model.feature_paths`` of registry model ``name`` built with ``kwargs``."""
    if isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)  # type: ignore[assignment]
    return list(_feature_layers(str(name), json.dumps(kwargs or {}, sort_keys=True)))


# path asked for -> folder made, for the current `kdkit` invocation (see forget_run_dirs).
_made: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """``path``, or ``path-1``, ``path-2``, ... : the first that did not exist, now created.

    ``os.mkdir`` is atomic, so of several processes asking for the same name (two runs started
    in the same second) each gets its own folder. Hydra resolves ``hydra.run.dir`` more than
    once, so the answer is kept: the same ``path`` gives the same folder until
    :func:`forget_run_dirs` (each `kdkit` invocation starts with it).
    """
    if path not in _made:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        suffix = 0
        while True:
            candidate = f"{path}-{suffix}" if suffix else path
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                suffix += 1
        _made[path] = candidate
    return _made[path]


def forget_run_dirs() -> None:
    """Start a new invocation: the next ``${kdkit.unique_dir:...}`` makes a new folder."""
    _made.clear()


def register() -> None:
    OmegaConf.register_new_resolver("kdkit.feature_layers", feature_layers, replace=True)
    OmegaConf.register_new_resolver("kdkit.unique_dir", unique_dir, replace=True)


register()
