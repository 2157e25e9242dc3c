"""Model registry: create any student or teacher by name.

Three namespaces:

* plain names registered with :func:`register_model` (``mlp``, ``small_cnn``, the CIFAR zoo
  ``resnet8x4`` ... ``mobilenetv2``); see :func:`list_models`;
* ``tv:<name>`` — any torchvision classification model, always built with ``weights=None``;
* ``timm:<name>`` — any timm model (``pretrained=False``), needs ``pip install 'kdkit[timm]'``;
* ``hf:<model_type>`` / ``hf:<local directory>`` — a Hugging Face model from a config or a
  ``save_pretrained`` directory (:mod:`kdkit.models.hf_models`), needs ``pip install 'kdkit[hf]'``.

Every model's ``forward`` returns logits ``[B, num_classes]``, except ``hf:`` models, which keep
Hugging Face's keyword-argument forward and ``ModelOutput``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch
from torch import nn

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(num_classes, in_channels=3, **options) -> nn.Module`` under ``name``."""
    if ":" in name:
        raise ValueError(
            f"model name {name!r} contains ':', which is reserved for the 'tv:' and 'timm:' "
            "namespaces; choose a name without ':'"
        )

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(
                f"model name {name!r} is already registered (by {_MODELS[name].__module__}."
                f"{_MODELS[name].__qualname__}); pick another name"
            )
        _MODELS[name] = builder
        return builder

    return decorator


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once; ``trainable_only``: those with
    ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def feature_paths(name: str, **kwargs) -> tuple[str, ...]:
    """The feature points model ``name`` registers (``model.feature_paths``), built on the meta
    device (no memory, no init cost); ``()`` for a model that registers none.

    Feature points are dotted module paths that suit feature distillation (timm keeps the same
    in ``feature_info``); they do not depend on the class count or the input size, so the model
    is built with placeholder ones. The shipped student/teacher configs read their
    ``feature_layers`` from here.
    """
    kwargs.setdefault("image_size", 32)
    with torch.device("meta"):
        model = create_model(name, num_classes=2, **kwargs)
    return tuple(getattr(model, "feature_paths", ()))


def list_models() -> list[str]:
    """Sorted names of the registered models (``tv:*`` and ``timm:*`` are resolved on demand)."""
    return sorted(_MODELS)


def _accepts(builder: ModelBuilder, option: str) -> bool:
    params = inspect.signature(builder).parameters
    return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way head for ``in_channels``-channel images.

    ``image_size`` may always be given: models that need it (``mlp``, ``tv:vit_*``) use it,
    size-agnostic ones (global average pooling) ignore it, so a caller can pass the data's
    size without knowing the model. Any other option goes to the model's builder.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"num_classes for model {name!r} must be a positive int, got {num_classes!r}"
        )
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(
            f"in_channels for model {name!r} must be a positive int, got {in_channels!r}"
        )
    if name.startswith(TV_PREFIX):
        from kdkit.models.torchvision_models import create_torchvision_model

        return create_torchvision_model(
            name[len(TV_PREFIX) :], num_classes=num_classes, in_channels=in_channels, **kwargs
        )
    if name.startswith(HF_PREFIX):
        from kdkit.models.hf_models import create_hf_model

        kwargs.pop("image_size", None)  # text models: no image size, no channels
        return create_hf_model(name[len(HF_PREFIX) :], num_classes=num_classes, **kwargs)
    if name.startswith(TIMM_PREFIX):
        from kdkit.models.timm_models import create_timm_model

        kwargs.pop("image_size", None)
        return create_timm_model(
            name[len(TIMM_PREFIX) :], num_classes=num_classes, in_channels=in_channels, **kwargs
        )
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}; "
            "or 'tv:<torchvision name>' (e.g. 'tv:resnet18') or 'timm:<timm name>'."
        )
    builder = _MODELS[name]
    if "image_size" in kwargs and not _accepts(builder, "image_size"):
        kwargs.pop("image_size")
    unknown = [k for k in kwargs if not _accepts(builder, k)]
    if unknown:
        allowed = [
            p
            for p in inspect.signature(builder).parameters
            if p not in ("num_classes", "in_channels")
        ]
        raise TypeError(
            f"model {name!r} got unknown option(s) {unknown}; it accepts {allowed} "
            "(plus num_classes, in_channels, image_size)"
        )
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
