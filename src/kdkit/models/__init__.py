"""Model registry and the model zoo; ``create_model(name, num_classes, in_channels)``.

Registered names: ``mlp``, ``small_cnn``; CIFAR zoo ``resnet8/14/20/32/44/56/110``,
``resnet8x4``, ``resnet32x4``, ``wrn_16_1/16_2/40_1/40_2``, ``vgg8/11/13/16`` (BN),
``mobilenetv2`` (= ``mobile_half``); plus ``tv:<torchvision name>`` and ``timm:<timm name>``.
Models carry ``feature_paths``: dotted paths that are good feature-distillation points (the zoo's
own, ``layer1..layer4`` of torchvision ResNets, timm's ``feature_info``); ``feature_paths(name)``
reads them without building the weights.
"""

from kdkit.models import cifar_resnet, mobilenetv2, small, vgg, wrn  # noqa: F401  (registration)
from kdkit.models.registry import (
    count_parameters,
    create_model,
    feature_paths,
    list_models,
    register_model,
)

__all__ = ["count_parameters", "create_model", "feature_paths", "list_models", "register_model"]
