from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.adapters import Conv1x1Adapter, LinearAdapter, build_adapter, probe_shapes


def _build(kind, s, t, **kw):
    return build_adapter(kind, s, t, student_name="s.layer", teacher_name="t.layer", **kw)


# ---------------------------------------------------------------------------------------------
# each kind maps the student shape to the teacher shape
# ---------------------------------------------------------------------------------------------


def test_identity_returns_input_unchanged():
    adapter = _build("identity", (2, 5, 8), (2, 5, 8))
    x = torch.randn(2, 5, 8)
    assert isinstance(adapter, nn.Identity)
    assert adapter(x) is x


@pytest.mark.parametrize(
    ("s", "t"),
    [((4, 16), (4, 32)), ((4, 7, 16), (4, 7, 32)), ((4, 8, 5, 5), (4, 12, 5, 5))],
)
def test_linear_maps_to_teacher_shape(s, t):
    adapter = _build("linear", s, t)
    assert isinstance(adapter, LinearAdapter)
    assert adapter(torch.randn(s)).shape == t


def test_linear_on_channels_equals_per_pixel_matmul():
    adapter = _build("linear", (2, 3, 4, 4), (2, 5, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    w, b = adapter.proj.weight, adapter.proj.bias
    expected = torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(adapter(x), expected)


def test_linear_norm_adds_layernorm():
    adapter = _build("linear", (4, 16), (4, 32), norm=True)
    y = adapter(torch.randn(4, 16))
    assert isinstance(adapter.norm, nn.LayerNorm)
    # LayerNorm at init: zero mean, unit (biased) variance per row
    torch.testing.assert_close(y.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("s", "t", "resize"),
    [
        ((2, 8, 6, 6), (2, 16, 6, 6), None),
        ((2, 8, 8, 8), (2, 16, 4, 4), "pool"),
        ((2, 8, 4, 4), (2, 16, 8, 8), "interpolate"),
        ((2, 8, 4, 8), (2, 16, 8, 4), "interpolate"),
    ],
)
def test_conv_maps_to_teacher_shape(s, t, resize):
    adapter = _build("conv", s, t)
    assert isinstance(adapter, Conv1x1Adapter)
    assert adapter.resize == resize
    assert isinstance(adapter.conv, nn.Conv2d) and adapter.conv.kernel_size == (1, 1)
    assert adapter(torch.randn(s)).shape == t


def test_conv_pooling_averages_regions():
    adapter = _build("conv", (1, 1, 4, 4), (1, 1, 2, 2))
    with torch.no_grad():
        adapter.conv.weight.fill_(1.0)
        adapter.conv.bias.zero_()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).view(1, 1, 2, 2)
    torch.testing.assert_close(adapter(x), expected)


def test_conv_norm_adds_batchnorm_without_conv_bias():
    adapter = _build("conv", (4, 8, 5, 5), (4, 16, 5, 5), norm=True)
    assert isinstance(adapter.norm, nn.BatchNorm2d) and adapter.norm.num_features == 16
    assert adapter.conv.bias is None
    y = adapter.train()(torch.randn(4, 8, 5, 5))
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# auto
# ---------------------------------------------------------------------------------------------


def test_auto_choices():
    assert isinstance(_build("auto", (2, 8), (2, 8)), nn.Identity)
    assert isinstance(_build("auto", (2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)

    lin2 = _build("auto", (2, 8), (2, 12))
    assert isinstance(lin2, LinearAdapter) and lin2.proj.in_features == 8
    assert lin2.proj.out_features == 12
    lin3 = _build("auto", (2, 5, 8), (2, 5, 12))
    assert isinstance(lin3, LinearAdapter) and lin3(torch.randn(2, 5, 8)).shape == (2, 5, 12)

    conv = _build("auto", (2, 8, 4, 4), (2, 16, 4, 4), norm=True)
    assert isinstance(conv, Conv1x1Adapter) and isinstance(conv.conv, nn.Conv2d)
    assert isinstance(conv.norm, nn.BatchNorm2d) and conv.resize is None

    pool_conv = _build("auto", (2, 8, 8, 8), (2, 16, 4, 4))
    assert pool_conv.resize == "pool" and isinstance(pool_conv.conv, nn.Conv2d)
    assert pool_conv(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)

    # only the spatial size differs: pooling, no learned conv
    pool_only = _build("auto", (2, 8, 8, 8), (2, 8, 2, 2))
    assert pool_only.resize == "pool" and isinstance(pool_only.conv, nn.Identity)
    assert sum(p.numel() for p in pool_only.parameters()) == 0
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(pool_only(x), F.adaptive_avg_pool2d(x, 2))

    up = _build("auto", (2, 8, 2, 2), (2, 8, 4, 4))
    assert up.resize == "interpolate" and up(torch.randn(2, 8, 2, 2)).shape == (2, 8, 4, 4)


# ---------------------------------------------------------------------------------------------
# errors name both layers and both shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "s", "t", "why"),
    [
        ("auto", (2, 8), (2, 4, 8), "ranks differ"),
        ("auto", (2, 5, 8), (2, 7, 8), "all dims but the last must match"),
        ("auto", (2, 8), (3, 8), "batch sizes differ"),
        ("linear", (2, 8, 4, 4), (2, 16, 2, 2), "spatial sizes differ"),
        ("identity", (2, 8), (2, 16), "identity needs equal shapes"),
        ("conv", (2, 5, 8), (2, 5, 16), r"conv needs \[B, C, H, W\]"),
    ],
)
def test_impossible_mismatch_names_layers_and_shapes(kind, s, t, why):
    with pytest.raises(ValueError, match=why) as info:
        _build(kind, s, t)
    msg = str(info.value)
    assert "student layer 's.layer'" in msg and "teacher layer 't.layer'" in msg
    assert str(s) in msg and str(t) in msg
    assert f"'{kind}' adapter" in msg
    assert "Allowed kinds: identity, linear, conv, auto" in msg


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"adapter kind must be one of .*got 'mlp'"):
        _build("mlp", (2, 8), (2, 16))


# ---------------------------------------------------------------------------------------------
# training and probing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("s", "t"), [((4, 6, 8), (4, 6, 12)), ((4, 8, 6, 6), (4, 16, 3, 3))])
def test_adapter_weights_change_after_one_step(s, t):
    torch.manual_seed(0)
    adapter = _build("auto", s, t)
    before = [p.detach().clone() for p in adapter.parameters()]
    assert before, "auto adapter for a width change must be learnable"
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    student_feature, teacher_feature = torch.randn(s), torch.randn(t)
    loss = F.mse_loss(adapter(student_feature), teacher_feature)
    loss.backward()
    opt.step()
    for old, new in zip(before, adapter.parameters(), strict=True):
        assert not torch.equal(old, new)
    # the step moved the adapter downhill
    with torch.no_grad():
        assert F.mse_loss(adapter(student_feature), teacher_feature) < loss


def test_probe_then_build_end_to_end():
    student = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 16, 16)
    s = probe_shapes(student, ["1"], x)["1"]
    t = probe_shapes(teacher, ["1"], x)["1"]
    assert s == (2, 4, 8, 8) and t == (2, 8, 4, 4)
    adapter = build_adapter("auto", s, t, student_name="1", teacher_name="1")
    assert adapter(student(x)).shape == teacher(x).shape
