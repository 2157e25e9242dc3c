"""OmegaConf resolvers the shipped configs use; registered when ``kdkit.pipeline`` is imported.

``${kdkit.feature_layers:<model name>,<model kwargs>}``: the feature points the model registers
(:func:`kdkit.models.feature_paths`), so the student/teacher configs do not repeat them.
"""

from __future__ import annotations

import functools
import json
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


def register() -> None:
    OmegaConf.register_new_resolver("kdkit.feature_layers", feature_layers, replace=True)


register()
