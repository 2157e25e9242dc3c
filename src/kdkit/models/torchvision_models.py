"""torchvision classification models by name (``tv:<name>``), always randomly initialised.

Feature points follow torchvision's own module names. ResNet-style models register their four
stages ``layer1`` .. ``layer4`` as ``feature_paths``; for others (VGG / MobileNet /
EfficientNet ``features.<i>``) list the modules with ``kdkit.capture.list_modules(model)``.
"""

from __future__ import annotations

import difflib

from torch import nn
from torchvision import models as tvm


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=1,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, new)
            return
    raise ValueError(
        f"tv:{name} has no Conv2d to adapt to in_channels={in_channels}; use in_channels=3"
    )


def create_torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    cifar_stem: bool = False,
    image_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` plus small-image fixes.

    ``cifar_stem=True`` (ResNet-style models with ``conv1`` and ``maxpool``) swaps the 7x7
    stride-2 stem for a 3x3 stride-1 conv and drops the max-pool, the usual way to train an
    ImageNet ResNet on 32x32 images. ``in_channels != 3`` replaces the first conv.
    ``image_size`` is forwarded only to models that take it (``vit_*``).
    """
    available = tvm.list_models(module=tvm)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join('tv:' + c for c in close)}?" if close else ""
        raise ValueError(
            f"unknown torchvision model 'tv:{name}'.{hint} "
            "torchvision.models.list_models() lists the classification models."
        )
    if "weights" in kwargs or kwargs.pop("pretrained", False):
        raise ValueError(
            f"tv:{name} is always built with weights=None (kdkit never downloads weights); "
            "load a state_dict yourself after create_model if you need pretrained weights"
        )
    if image_size is not None and name.startswith("vit_"):
        kwargs["image_size"] = image_size
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if cifar_stem:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise ValueError(
                f"cifar_stem=True needs a ResNet-style model with 'conv1' and 'maxpool' "
                f"(resnet*, resnext*, wide_resnet*); tv:{name} has none. Set cifar_stem=false."
            )
        model.conv1 = nn.Conv2d(in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNet-style stages
        model.feature_paths = ("layer1", "layer2", "layer3", "layer4")  # type: ignore[assignment]
    return model
