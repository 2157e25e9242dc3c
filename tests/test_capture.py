from __future__ import annotations

import gc
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from kdkit.capture import (
    FeatureCapture,
    list_modules,
    map_layers,
    probe_shapes,
    resolve_module,
    select_tensor,
)

# ---------------------------------------------------------------------------------------------
# a small HuggingFace-like encoder: blocks return tuples, the model returns a ModelOutput-like
# OrderedDict subclass with attribute access
# ---------------------------------------------------------------------------------------------


class FakeModelOutput(OrderedDict):
    """Mimics transformers.utils.ModelOutput: an OrderedDict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


@dataclass
class DataclassOutput:
    last_hidden_state: Tensor | None = None
    hidden_states: tuple | None = None


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None):
        out = torch.tanh(self.dense(hidden_states))
        attn = out.mean(-1)  # stands in for attention probabilities
        return (out, attn)


class Encoder(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.layer = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: Tensor):
        states = []
        for block in self.layer:
            # HF calls layers with keyword arguments
            x = block(hidden_states=x)[0]
            states.append(x)
        return FakeModelOutput(last_hidden_state=x, hidden_states=tuple(states))


class FakeHF(nn.Module):
    def __init__(self, d: int = 8, n: int = 4, classes: int = 3):
        super().__init__()
        self.encoder = Encoder(d, n)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x: Tensor):
        enc = self.encoder(x)
        logits = self.classifier(enc.last_hidden_state[:, 0])
        return FakeModelOutput(logits=logits, hidden_states=enc.hidden_states)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# resolve_module / list_modules
# ---------------------------------------------------------------------------------------------


def test_resolve_module_dotted_and_integer_paths():
    model = resnet18(weights=None)
    assert resolve_module(model, "layer3.1.conv2") is model.layer3[1].conv2
    assert resolve_module(model, "") is model
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 3)))
    assert resolve_module(seq, "2.0") is seq[2][0]
    hf = FakeHF()
    assert resolve_module(hf, "encoder.layer.3") is hf.encoder.layer[3]


def test_resolve_module_unknown_path_lists_closest_names():
    model = resnet18(weights=None)
    with pytest.raises(ValueError, match=r"layer3\.1\.conv2") as info:
        resolve_module(model, "layer3.1.conv22")
    msg = str(info.value)
    assert "no module at path 'layer3.1.conv22'" in msg
    assert "kdkit.capture.list_modules(model)" in msg
    # a non-module attribute is not a module either
    with pytest.raises(ValueError, match="no module at path 'fc.weight'"):
        resolve_module(model, "fc.weight")


def test_list_modules_names():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    assert list_modules(seq) == ["0", "1", "1.0"]


# ---------------------------------------------------------------------------------------------
# select_tensor
# ---------------------------------------------------------------------------------------------


def test_select_tensor_defaults():
    a, b = torch.zeros(1), torch.ones(1)
    assert select_tensor(a, None) is a
    assert select_tensor((a, b), None) is a
    assert select_tensor([b, a], None) is b
    assert select_tensor({"x": a, "logits": b}, None) is b
    assert select_tensor({"pooler": a, "last_hidden_state": b}, None) is b
    assert select_tensor({"x": a, "y": b}, None) is a
    assert select_tensor(FakeModelOutput(logits=b, hidden_states=(a,)), None) is b

    class WithLogits:
        logits = b

    assert select_tensor(WithLogits(), None) is b
    assert select_tensor(DataclassOutput(last_hidden_state=a), None) is a
    # the first non-None field is a tuple, not a tensor: the user must choose
    with pytest.raises(TypeError, match="picked a tuple out of DataclassOutput"):
        select_tensor(DataclassOutput(hidden_states=(b,)), None)


def test_select_tensor_explicit_selectors():
    a, b = torch.zeros(1), torch.ones(1)
    assert select_tensor((a, b), 1) is b
    assert select_tensor((a, b), -1) is b
    assert select_tensor({"x": a, "y": b}, 1) is b
    assert select_tensor({"x": a, "y": b}, "y") is b
    assert select_tensor(DataclassOutput(last_hidden_state=a), "last_hidden_state") is a
    out = FakeModelOutput(logits=a, hidden_states=(a, b))
    assert select_tensor(out, lambda o: o.hidden_states[-1]) is b


def test_select_tensor_errors_name_type_and_keys():
    a = torch.zeros(1)
    with pytest.raises(TypeError, match=r"dict with keys \['x', 'y'\]"):
        select_tensor({"x": a, "y": a}, "z")
    with pytest.raises(TypeError, match="cannot take a tensor from str"):
        select_tensor("hello", None)
    with pytest.raises(TypeError, match="out of range for tuple of length 2"):
        select_tensor((a, a), 5)
    with pytest.raises(TypeError, match="int selector 0 needs a tuple"):
        select_tensor(a, 0)
    with pytest.raises(TypeError, match="picked a tuple"):
        select_tensor(((a,), a), None)
    with pytest.raises(TypeError, match="selector must be None, an int, a str or a callable"):
        select_tensor((a,), 1.5)
    with pytest.raises(TypeError, match="selector="):
        select_tensor({}, None)


# ---------------------------------------------------------------------------------------------
# FeatureCapture
# ---------------------------------------------------------------------------------------------


def test_capture_resnet_features_match_direct_computation():
    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with FeatureCapture(model, ["layer2", "layer3.1.conv2", "avgpool"]) as cap:
        logits = model(x)
        feats = cap.features
    assert feats["layer2"].shape == (2, 128, 8, 8)
    assert feats["layer3.1.conv2"].shape == (2, 256, 4, 4)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        expected_l2 = model.layer2(model.layer1(h))
    torch.testing.assert_close(feats["layer2"], expected_l2)
    torch.testing.assert_close(model.fc(feats["avgpool"].flatten(1)), logits)
    assert _hook_count(model) == 0


def test_capture_input_of_fc_is_pooled_features():
    model = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureCapture(model, ["fc", "avgpool"], capture="input") as cap:
        model(x)
    with FeatureCapture(model, ["avgpool"]) as out_cap:
        model(x)
    assert cap.features["fc"].shape == (2, 512)
    torch.testing.assert_close(cap.features["fc"], out_cap.features["avgpool"].flatten(1))


def test_capture_hf_like_tuple_outputs_and_per_path_selectors():
    torch.manual_seed(0)
    model = FakeHF(d=8, n=4)
    x = torch.randn(2, 5, 8)
    paths = ["encoder.layer.1", "encoder.layer.3", "encoder"]
    selector = {"encoder.layer.3": 1, "encoder": "last_hidden_state"}
    with FeatureCapture(model, paths, selector=selector) as cap:
        out = model(x)
    f = cap.features
    # tuple output, default selector -> hidden states (element 0)
    torch.testing.assert_close(f["encoder.layer.1"], out.hidden_states[1])
    # int selector 1 -> the attention-like second element
    torch.testing.assert_close(f["encoder.layer.3"], out.hidden_states[3].mean(-1))
    torch.testing.assert_close(f["encoder"], out.hidden_states[3])
    assert f["encoder.layer.1"].requires_grad  # not detached: feature losses backpropagate


def test_capture_input_called_with_kwargs_only():
    model = FakeHF(d=8, n=2)
    x = torch.randn(2, 5, 8)
    with FeatureCapture(model, ["encoder.layer.1"], capture="input", selector="hidden_states") as c:
        out = model(x)
    torch.testing.assert_close(c.features["encoder.layer.1"], out.hidden_states[0])


def test_capture_selector_error_names_path():
    model = FakeHF(d=8, n=2)
    with FeatureCapture(model, ["encoder.layer.0"], selector="nope"):
        with pytest.raises(TypeError, match=r"FeatureCapture at 'encoder.layer.0'"):
            model(torch.randn(1, 3, 8))
    assert _hook_count(model) == 0


def test_features_hold_most_recent_forward_and_clear():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    nn.init.eye_(model[0].weight)
    cap = FeatureCapture(model, ["0"])
    model(torch.ones(1, 2))
    model(torch.full((1, 2), 3.0))
    torch.testing.assert_close(cap.features["0"], torch.full((1, 2), 3.0))
    cap.features.clear()  # the property returns a copy
    assert "0" in cap.features
    cap.clear()
    assert cap.features == {}
    cap.close()


def test_stale_features_are_dropped_on_next_forward():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Identity()
            self.b = nn.Identity()

        def forward(self, x, use_b):
            return self.b(x) if use_b else self.a(x)

    model = Branchy()
    with FeatureCapture(model, ["a", "b"]) as cap:
        model(torch.ones(1), True)
        assert set(cap.features) == {"b"}
        model(torch.ones(1), False)
        assert set(cap.features) == {"a"}


def test_hooks_removed_on_close():
    model = resnet18(weights=None)
    cap = FeatureCapture(model, ["layer1", "layer4.1.conv2"])
    assert len(model.layer1._forward_hooks) == 1
    assert len(model._forward_pre_hooks) == 1
    cap.close()
    cap.close()  # idempotent
    assert cap.closed
    assert len(model.layer1._forward_hooks) == 0
    assert len(model.layer4[1].conv2._forward_hooks) == 0
    assert _hook_count(model) == 0


def test_hooks_removed_on_exit_with_exception():
    model = resnet18(weights=None)
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCapture(model, ["layer1", "fc"], capture="input"):
            assert len(model.fc._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(model.fc._forward_pre_hooks) == 0
    assert _hook_count(model) == 0


def test_hooks_removed_on_garbage_collection():
    model = resnet18(weights=None)
    cap = FeatureCapture(model, ["layer1", "layer2.0"])
    model(torch.randn(2, 3, 32, 32))  # tensors captured by the hooks must not keep cap alive
    assert len(model.layer1._forward_hooks) == 1
    del cap
    gc.collect()
    assert len(model.layer1._forward_hooks) == 0
    assert _hook_count(model) == 0


def test_capture_argument_errors():
    model = resnet18(weights=None)
    with pytest.raises(ValueError, match="repeated"):
        FeatureCapture(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="capture must be 'output' or 'input'"):
        FeatureCapture(model, ["layer1"], capture="grad")
    with pytest.raises(ValueError, match=r"not captured: \['layer2'\]"):
        FeatureCapture(model, ["layer1"], selector={"layer2": 0})
    with pytest.raises(ValueError, match="closest"):
        FeatureCapture(model, ["layer1", "layr2"])
    # a failed construction leaves no hooks behind
    assert _hook_count(model) == 0


# ---------------------------------------------------------------------------------------------
# probe_shapes
# ---------------------------------------------------------------------------------------------


def test_probe_shapes_restores_modes_and_bn_stats():
    model = resnet18(weights=None)
    model.train()
    model.layer1.eval()  # a mixed state, e.g. a frozen block, must survive the probe
    bn = model.bn1
    mean_before = bn.running_mean.clone()
    tracked_before = bn.num_batches_tracked.clone()
    shapes = probe_shapes(model, ["layer1", "layer3", "fc"], torch.randn(2, 3, 64, 64))
    assert shapes == {
        "layer1": torch.Size([2, 64, 16, 16]),
        "layer3": torch.Size([2, 256, 4, 4]),
        "fc": torch.Size([2, 1000]),
    }
    torch.testing.assert_close(bn.running_mean, mean_before)
    assert bn.num_batches_tracked == tracked_before
    assert model.training and bn.training
    assert not model.layer1.training and not model.layer1[0].bn1.training
    assert model.layer2.training
    assert _hook_count(model) == 0


def test_probe_shapes_hf_like_kwargs_and_unreached_path():
    model = FakeHF(d=8, n=2, classes=3)
    shapes = probe_shapes(model, ["encoder.layer.0", "classifier"], {"x": torch.randn(4, 6, 8)})
    assert shapes == {"encoder.layer.0": torch.Size([4, 6, 8]), "classifier": torch.Size([4, 3])}

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Identity()
            self.unused = nn.Identity()

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\].*not called"):
        probe_shapes(Skips(), ["used", "unused"], (torch.ones(1),))


# ---------------------------------------------------------------------------------------------
# map_layers
# ---------------------------------------------------------------------------------------------


def test_map_layers_uniform_12_to_6():
    pairs = map_layers("s.{i}", "t.{i}", 6, 12, "uniform")
    assert pairs == [
        ("s.0", "t.1"),
        ("s.1", "t.3"),
        ("s.2", "t.5"),
        ("s.3", "t.7"),
        ("s.4", "t.9"),
        ("s.5", "t.11"),
    ]


def test_map_layers_skip_and_last_12_to_6():
    skip = map_layers("encoder.layer.{i}", "bert.encoder.layer.{i}", 6, 12, "skip")
    assert skip == [
        (f"encoder.layer.{j}", f"bert.encoder.layer.{t}")
        for j, t in zip(range(5), [1, 3, 5, 7, 9], strict=True)
    ]
    last = map_layers("s{i}", "t{i}", 6, 12, "last")
    assert last == [("s0", "t6"), ("s1", "t7"), ("s2", "t8"), ("s3", "t9"), ("s4", "t10")]


def test_map_layers_other_counts():
    assert map_layers("s{i}", "t{i}", 4, 12) == [
        ("s0", "t2"),
        ("s1", "t5"),
        ("s2", "t8"),
        ("s3", "t11"),
    ]
    # counts that do not divide: the nearest layer to m * N / n, the deepest one kept
    assert [t for _, t in map_layers("s{i}", "t{i}", 5, 12)] == ["t1", "t4", "t6", "t9", "t11"]
    assert map_layers("s{i}", "t{i}", 3, 3) == [("s0", "t0"), ("s1", "t1"), ("s2", "t2")]
    assert map_layers("s{i}", "t{i}", 2, 6, "last") == [("s0", "t4")]


@pytest.mark.parametrize(
    ("n", "teacher"),
    [
        (6, [2, 4, 6, 8, 10, 12]),  # TinyBERT: g(m) = m * N / n, 1-indexed
        (4, [3, 6, 9, 12]),
        (5, [2, 5, 7, 10, 12]),  # round(m * 12 / 5): 2.4, 4.8, 7.2, 9.6, 12
    ],
)
def test_map_layers_and_pair_layers_share_tinyberts_uniform_rule(n: int, teacher: list[int]):
    from kdkit.capture import pair_layers

    want = [f"t{g - 1}" for g in teacher]  # the paths are 0-indexed
    assert [t for _, t in map_layers("s{i}", "t{i}", n, 12)] == want
    students = [f"s{i}" for i in range(n)]
    assert pair_layers(students, [f"t{i}" for i in range(12)]) == (students, want)
    # and with the roles swapped (a longer student list is sampled the same way)
    assert pair_layers([f"t{i}" for i in range(12)], students) == (want, students)
    # PKD-Skip is the uniform map without its final pair
    assert map_layers("s{i}", "t{i}", n, 12, "skip") == list(
        zip(students[:-1], want[:-1], strict=True)
    )


def test_map_layers_errors():
    with pytest.raises(ValueError, match=r"num_student_layers \(8\) exceeds num_teacher_layers"):
        map_layers("s{i}", "t{i}", 8, 4)
    with pytest.raises(ValueError, match="num_student_layers must be a positive int, got 0"):
        map_layers("s{i}", "t{i}", 0, 4)
    with pytest.raises(ValueError, match="num_teacher_layers must be a positive int, got -1"):
        map_layers("s{i}", "t{i}", 1, -1)
    with pytest.raises(ValueError, match="at least 2 student layers"):
        map_layers("s{i}", "t{i}", 1, 4, "skip")
    with pytest.raises(ValueError, match="strategy must be one of"):
        map_layers("s{i}", "t{i}", 2, 4, "random")
    with pytest.raises(ValueError, match=r"teacher_pattern must contain '\{i\}'"):
        map_layers("s{i}", "t", 2, 4)
    with pytest.raises(ValueError, match=r"student_pattern .* no other braces, got 's\{i\}.\{j\}'"):
        map_layers("s{i}.{j}", "t{i}", 2, 4)


def test_pair_layers_refuses_a_string_for_a_list():
    from kdkit.capture import pair_layers

    with pytest.raises(TypeError, match=r"student_paths is the string 'layer1'.*\['layer1'\]"):
        pair_layers("layer1", ["t1", "t2"])


def test_pair_layers_keeps_the_deepest_and_can_exclude_ends():
    from kdkit.capture import pair_layers

    teacher = [f"t{i}" for i in range(12)]
    student = [f"s{i}" for i in range(6)]
    s, t = pair_layers(student, teacher)
    assert s == student and t == ["t1", "t3", "t5", "t7", "t9", "t11"]
    s, t = pair_layers(student, teacher, exclude_first_and_last=True)
    assert s == ["s1", "s2", "s3", "s4"] and t == ["t2", "t5", "t8", "t10"]
    assert pair_layers(["a", "b"], ["x", "y"]) == (["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"at least 3 student layers"):
        pair_layers(["a", "b"], teacher, exclude_first_and_last=True)


def test_config_exclude_first_and_last_reaches_the_terms():
    from hydra import compose, initialize_config_dir

    from kdkit.cli import CONFIG_DIR
    from kdkit.config import terms_from_config

    overrides = [
        "distill=at",
        "student=small_cnn",
        "student.feature_layers=[block1,block2,block3]",
        "teacher.feature_layers=[block1,block2,block3]",
        "distill.exclude_first_and_last=true",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    term = terms_from_config(cfg.distill)["at"]
    assert term.student == ["block2"] and term.teacher == ["block2"]


# ------------------------------------------------------------------ StepCapture
def test_step_capture_reads_one_call_and_leaves_no_hooks():
    from kdkit.capture import StepCapture

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    capture = StepCapture(model, ["0", "2"])
    x = torch.randn(5, 3)
    out, features = capture(model, x)
    assert torch.equal(out, model(x))
    assert torch.equal(features["0"], model[0](x))
    assert torch.equal(features["2"], out)
    assert features["2"].requires_grad  # not detached
    assert not any(m._forward_hooks for m in model.modules())
    _, again = capture(model, x)
    assert again is not features  # a fresh dict per call


def test_step_capture_removes_its_hooks_when_the_call_raises():
    from kdkit.capture import StepCapture

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    capture = StepCapture(model, ["1"])
    with pytest.raises(RuntimeError):
        capture(model, torch.randn(5, 7))  # wrong width
    assert not any(m._forward_hooks for m in model.modules())


def test_step_capture_names_a_missing_path_at_construction():
    from kdkit.capture import StepCapture

    with pytest.raises(ValueError, match="no module at path 'blocks.9'"):
        StepCapture(nn.Sequential(nn.Linear(2, 2)), ["blocks.9"])
