"""Model registry and zoo: names, errors, parameter counts against the published KD tables."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn

from kdkit.models import count_parameters, create_model, list_models, register_model
from kdkit.models.registry import _MODELS

# Exact counts of RepDistiller's definitions (100 classes), and the tables' rounded millions.
ZOO_100 = {
    "resnet56": (861_620, 0.86),
    "resnet20": (278_324, 0.28),
    "resnet110": (1_736_564, 1.74),
    "resnet32x4": (7_433_860, 7.43),
    "resnet8x4": (1_233_540, 1.23),
    "wrn_40_2": (2_255_156, 2.26),
    "wrn_16_2": (703_284, 0.70),
    "vgg13": (9_462_180, 9.46),
    "vgg8": (3_965_028, 3.96),
    "mobilenetv2": (812_836, 0.81),
}


@pytest.mark.parametrize("name", sorted(ZOO_100))
def test_zoo_parameter_counts_match_published(name):
    exact, published_m = ZOO_100[name]
    model = create_model(name, num_classes=100)
    n = count_parameters(model)
    assert n == exact
    assert abs(n / 1e6 - published_m) / published_m < 0.02


@pytest.mark.parametrize("name", sorted(ZOO_100))
def test_zoo_forward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["resnet8x4", "resnet20", "wrn_16_2", "vgg8", "mobilenetv2", "small_cnn"]
)
def test_single_channel_8x8_digits(name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_feature_paths_are_addressable_and_have_expected_shapes():
    model = create_model("resnet8x4", num_classes=10).eval()
    shapes = {}
    hooks = [
        model.get_submodule(p).register_forward_hook(
            lambda m, i, o, p=p: shapes.__setitem__(p, tuple(o.shape))
        )
        for p in model.feature_paths
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == {
        "layer1": (2, 64, 32, 32),
        "layer2": (2, 128, 16, 16),
        "layer3": (2, 256, 8, 8),
    }
    wrn = create_model("wrn_40_2", num_classes=10)
    assert [wrn.get_submodule(p).__class__.__name__ for p in wrn.feature_paths] == [
        "Sequential"
    ] * 3
    mbv2 = create_model("mobilenetv2", num_classes=10)
    for p in mbv2.feature_paths:
        mbv2.get_submodule(p)


def test_mlp_uses_image_size_and_hidden_sizes():
    model = create_model("mlp", 10, in_channels=1, image_size=8, hidden_sizes=[32])
    # 64*32 + 32 + 32*10 + 10
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 10 + 10
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="image_size"):
        create_model("mlp", 10, in_channels=1)
    with pytest.raises(ValueError, match="64 values per sample but got 192"):
        model(torch.rand(2, 3, 8, 8))


def test_small_cnn_width_and_image_size_ignored():
    a = create_model("small_cnn", 10, in_channels=1, width=8, image_size=8)
    # convs 1*8*9 + 8*16*9 + 16*32*9, three BNs (2*(8+16+32)), fc 32*10+10
    expected = 72 + 1152 + 4608 + 2 * (8 + 16 + 32) + 330
    assert count_parameters(a) == expected
    assert a(torch.rand(3, 1, 32, 32)).shape == (3, 10)


def test_unknown_model_lists_available_and_close_matches():
    with pytest.raises(ValueError) as err:
        create_model("resnet8x5", 10)
    msg = str(err.value)
    assert "'resnet8x4'" in msg and "Did you mean" in msg
    assert "wrn_40_2" in msg and "tv:" in msg


def test_unknown_option_is_a_type_error_naming_the_model():
    with pytest.raises(TypeError, match="'resnet20' got unknown option"):
        create_model("resnet20", 10, width=3)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", 0)


def test_register_model_and_duplicate():
    @register_model("_test_tiny")
    def tiny(num_classes, in_channels=3):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "_test_tiny" in list_models()
        assert isinstance(create_model("_test_tiny", 3), nn.Sequential)
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny")(lambda num_classes, in_channels=3: None)
    finally:
        _MODELS.pop("_test_tiny", None)
    with pytest.raises(ValueError, match="reserved"):
        register_model("tv:x")


def test_torchvision_resnet18_cifar_stem():
    plain = create_model("tv:resnet18", 10)
    cifar = create_model("tv:resnet18", 10, cifar_stem=True)
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    # 11,181,642 params for torchvision resnet18 with a 10-way head; stem 64*3*49 -> 64*3*9
    assert count_parameters(plain) == 11_181_642
    assert count_parameters(cifar) == 11_181_642 - 64 * 3 * (49 - 9)
    x = torch.randn(2, 3, 32, 32)
    shapes = {}
    h = cifar.layer4.register_forward_hook(lambda m, i, o: shapes.__setitem__("l4", o.shape))
    cifar.eval()
    with torch.no_grad():
        assert cifar(x).shape == (2, 10)
    h.remove()
    assert tuple(shapes["l4"]) == (2, 512, 4, 4)


def test_torchvision_in_channels_and_errors():
    gray = create_model("tv:resnet18", 5, in_channels=1)
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)
    assert gray.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    gray_cifar = create_model("tv:resnet18", 5, in_channels=1, cifar_stem=True)
    assert gray_cifar.conv1.in_channels == 1
    mnv2 = create_model("tv:mobilenet_v2", 4, in_channels=1)
    assert mnv2.features[0][0].in_channels == 1
    with pytest.raises(ValueError, match="tv:resnet18"):
        create_model("tv:resnet81", 10)
    with pytest.raises(ValueError, match="cifar_stem"):
        create_model("tv:mobilenet_v2", 10, cifar_stem=True)
    with pytest.raises(ValueError, match="weights=None"):
        create_model("tv:resnet18", 10, pretrained=True)


def test_timm_missing_gives_install_hint(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'kdkit\[timm\]'"):
        create_model("timm:resnet18", 10)


def test_timm_model_when_installed():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", 7, in_channels=1)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)
