"""The weight initialisation the RepDistiller / mdistiller CIFAR models share."""

from __future__ import annotations

from torch import nn


def he_init(
    model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """He (fan-out, ReLU) normal init of every conv, zero conv biases, unit BatchNorm.

    Linear layers keep PyTorch's default unless ``linear_std`` is given (normal(0, std) weights,
    zero bias) or ``zero_linear_bias`` is set.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)
