"""timm models by name (``timm:<name>``), optional dependency, never pretrained."""

from __future__ import annotations

from torch import nn


def create_timm_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``; its
    ``feature_info`` modules become ``feature_paths``."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"model 'timm:{name}' needs the timm package, which is not installed; "
            "install it with: pip install 'kdkit[timm]'"
        ) from err
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"timm:{name} is always built with pretrained=False (kdkit never downloads weights)"
        )
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model 'timm:{name}'; timm.list_models('*{name[:6]}*') shows similar ones"
        )
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
    )
    # timm describes its feature points once, in feature_info: kdkit reads them from there.
    info = getattr(model, "feature_info", None) or []
    model.feature_paths = tuple(i["module"] for i in info if i.get("module"))
    return model
