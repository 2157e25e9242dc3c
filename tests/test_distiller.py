from __future__ import annotations

import copy

import pytest
import torch
from conftest import mlp, train_supervised
from torch import nn

from kdkit import Distiller, Term
from kdkit.functional import kl_div
from kdkit.losses import HintonLoss, KLDivLoss, MSEHiddenStatesLoss


@pytest.fixture(scope="module")
def teacher(digits) -> nn.Module:
    torch.manual_seed(0)
    model = mlp(128)
    train_supervised(model, digits["x_train"], digits["y_train"])
    return model


def agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    student.eval()
    with torch.no_grad():
        return (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean().item()


def test_student_learns_from_teacher_on_digits(digits, teacher):
    torch.manual_seed(0)
    student = mlp(16, depth=1)
    distiller = Distiller(student, teacher, [Term(KLDivLoss(temperature=4.0))])
    opt = torch.optim.Adam(distiller.parameters(), lr=1e-2)
    before = agreement(student, teacher, digits["x_test"])
    gen = torch.Generator().manual_seed(2)
    distiller.train()
    for _ in range(300):
        idx = torch.randint(0, 1200, (64,), generator=gen)
        out = distiller(digits["x_train"][idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = agreement(student, teacher, digits["x_test"])
    assert before < 0.3
    assert after > 0.9


def test_teacher_stays_frozen_bit_identical(digits, teacher):
    teacher = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mlp(16, depth=1)
    distiller = Distiller(student, teacher, [Term(HintonLoss(temperature=4.0))])
    assert all(not p.requires_grad for p in teacher.parameters())
    param_ids = {id(p) for p in distiller.parameters()}
    assert not any(id(p) in param_ids for p in teacher.parameters())
    assert {k.split(".")[0] for k in distiller.state_dict()} == {"student"}
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    for step in range(10):
        distiller.train()  # a trainer flipping the parent to train must not reach the teacher
        idx = torch.arange(step * 32, step * 32 + 32)
        out = distiller(digits["x_train"][idx], digits["y_train"][idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert not teacher.training
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert set(distiller.student.state_dict()) == set(student.state_dict())
    assert type(distiller.student) is type(student)


def test_dtype_and_device_moves_reach_the_unregistered_teachers(digits, teacher):
    teachers = [copy.deepcopy(teacher), copy.deepcopy(teacher)]
    distiller = Distiller(mlp(16, depth=1), teachers, [Term(KLDivLoss(4.0))]).double()
    for t in [*teachers, distiller.student]:
        assert {p.dtype for p in t.parameters()} == {torch.float64}
    assert distiller.teacher is teachers[0] and distiller.teachers == teachers
    assert {k.split(".")[0] for k in distiller.state_dict()} == {"student"}
    x = digits["x_train"][:8].double()
    logits = distiller.compute_teacher_logits(x)
    assert logits.dtype == torch.float64
    expected = (
        torch.log_softmax(teachers[0](x), -1).exp() / 2
        + torch.log_softmax(teachers[1](x), -1).exp() / 2
    )  # two equal teachers ensembled at T=1: the mean of their probabilities
    torch.testing.assert_close(logits.softmax(-1), expected)
    assert distiller.half() is distiller
    assert {p.dtype for p in teachers[1].parameters()} == {torch.float16}


def test_terms_are_logged_detached_and_weighted(digits, teacher):
    x, y = digits["x_train"][:32], digits["y_train"][:32]
    student = mlp(16, depth=1).eval()
    distiller = Distiller(
        student,
        teacher,
        {
            "kd": Term(KLDivLoss(temperature=2.0), weight=0.7),
            "ce": Term(nn.CrossEntropyLoss(), weight=0.3, teacher=None, target=True),
        },
    ).eval()
    out = distiller(x, y)
    s, t = student(x), teacher(x)
    kd = kl_div(s, t, temperature=2.0)
    ce = nn.functional.cross_entropy(s, y)
    assert set(out.terms) == {"kd", "ce"}
    assert torch.allclose(out.terms["kd"], kd)
    assert torch.allclose(out.terms["ce"], ce)
    assert torch.allclose(out.loss, 0.7 * kd + 0.3 * ce)
    assert not out.terms["kd"].requires_grad and out.loss.requires_grad
    assert torch.equal(out.logits, s)


def test_precomputed_teacher_output_equals_online(digits, teacher):
    x = digits["x_train"][:16]
    student = mlp(16, depth=1).eval()
    distiller = Distiller(student, teacher, [Term(KLDivLoss(temperature=3.0))]).eval()
    online = distiller(x).loss
    with torch.no_grad():
        given = distiller(x, teacher_output=teacher(x)).loss
    assert torch.equal(online, given)
    without_teacher = Distiller(student, None, [Term(KLDivLoss(temperature=3.0))]).eval()
    assert torch.equal(without_teacher(x, teacher_output=teacher(x)).loss, online)


def test_several_teachers_average_softened_probabilities(digits, teacher):
    x = digits["x_train"][:16]
    torch.manual_seed(3)
    other = mlp(32).eval()
    student = mlp(16, depth=1).eval()
    temperature = 3.0
    distiller = Distiller(
        student, [teacher, other], [Term(KLDivLoss(temperature))], teacher_weights=[3.0, 1.0]
    ).eval()
    out = distiller(x)
    p = 0.75 * torch.softmax(teacher(x) / temperature, -1) + 0.25 * torch.softmax(
        other(x) / temperature, -1
    )
    log_q = torch.log_softmax(student(x) / temperature, -1)
    expected = temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


class TupleModel(nn.Module):
    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        z = self.inner(x)
        if self.kind == "tuple":
            return z, x.sum()
        if self.kind == "dict":
            return {"hidden": x, "logits": z}
        return type("Out", (), {"logits": z})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "attr"])
def test_logits_taken_from_structured_outputs(digits, teacher, kind):
    x = digits["x_train"][:8]
    student = mlp(16, depth=1).eval()
    plain = Distiller(student, teacher, [Term(KLDivLoss(2.0))]).eval()
    wrapped = Distiller(
        TupleModel(student, kind), TupleModel(teacher, kind), [Term(KLDivLoss(2.0))]
    ).eval()
    assert torch.allclose(wrapped(x).loss, plain(x).loss)


def test_feature_term_with_auto_adapter_trains_adapter(digits, teacher):
    x = digits["x_train"][:32]
    student = mlp(16, depth=1)
    distiller = Distiller(
        student,
        teacher,
        [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="auto")],
        example_input=x,
    )
    (adapter,) = distiller.adapters.values()
    weight = adapter.weight if hasattr(adapter, "weight") else next(adapter.parameters())
    assert weight.shape[-1] == 16  # student width -> teacher width 128
    assert any(p is weight for p in distiller.parameters())
    assert any(k.startswith("adapters.") for k in distiller.state_dict())
    before = weight.detach().clone()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    out = distiller(x)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert not torch.equal(before, weight.detach())
    assert not student._forward_hooks and not any(m._forward_hooks for m in student.modules())


def test_hooks_api_in_plain_loop(digits, teacher):
    torch.manual_seed(0)
    student = mlp(16, depth=1)
    distiller = Distiller(
        student,
        teacher,
        [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="linear")],
        example_input=digits["x_train"][:4],
    )
    opt = torch.optim.SGD(distiller.parameters(), lr=0.05)
    distiller.on_train_begin()
    x, y = digits["x_train"][:64], digits["y_train"][:64]
    output = student(x)
    ce = nn.functional.cross_entropy(output, y)
    loss = distiller.on_after_compute_loss(x, output, ce)
    assert torch.allclose(loss, ce + distiller.last_terms["mse_hidden_states"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    distiller.on_epoch_end()
    assert distiller.epoch == 1
    assert any(m._forward_hooks for m in student.modules())
    distiller.close()
    assert not any(m._forward_hooks for m in student.modules())


def test_hooks_removed_when_an_exception_passes(digits, teacher):
    student = mlp(16, depth=1)
    distiller = Distiller(student, teacher, [Term(MSEHiddenStatesLoss(), student="2", teacher="2")])
    with pytest.raises(RuntimeError):
        distiller(digits["x_train"][:4, :10])  # wrong input width
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


# ---------------------------------------------------------------------------------- bad input
def test_class_count_mismatch_names_both_shapes(digits, teacher):
    student = mlp(16, depth=1, num_classes=7)
    distiller = Distiller(student, teacher, [Term(KLDivLoss())])
    with pytest.raises(ValueError, match=r"10 classes.*\(4, 10\).*7.*\(4, 7\)"):
        distiller(digits["x_train"][:4])


def test_negative_weight_is_refused(teacher):
    with pytest.raises(ValueError, match=r"'kl_div' has weight -1.0.*>= 0"):
        Distiller(mlp(16), teacher, [Term(KLDivLoss(), weight=-1.0)])


def test_negative_teacher_weight_is_refused(teacher):
    with pytest.raises(ValueError, match=r"teacher_weights must be finite, >= 0"):
        Distiller(mlp(16), [teacher, teacher], [Term(KLDivLoss())], teacher_weights=[1, -1])


def test_nan_term_is_named(digits, teacher):
    distiller = Distiller(mlp(16), teacher, {"kd": Term(KLDivLoss())}).eval()
    x = digits["x_train"][:4].clone()
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"term 'kd' was NaN/Inf; lower"):
        distiller(x)


def test_unexpected_teacher_output_type_says_what_is_accepted(digits):
    distiller = Distiller(mlp(16), None, [Term(KLDivLoss())]).eval()
    with pytest.raises(TypeError, match=r"str"):
        distiller(digits["x_train"][:4], teacher_output="logits please")


def test_feature_shape_mismatch_without_adapter(digits, teacher):
    distiller = Distiller(
        mlp(16), teacher, {"hid": Term(MSEHiddenStatesLoss(), student="2", teacher="2")}
    )
    with pytest.raises(ValueError, match=r"term 'hid'.*16.*128"):
        distiller(digits["x_train"][:4])


def test_adapter_without_example_input_says_how(teacher):
    with pytest.raises(ValueError, match=r"example_input"):
        Distiller(
            mlp(16),
            teacher,
            [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="auto")],
        )


def test_unknown_module_path_lists_close_names(teacher):
    with pytest.raises(ValueError, match=r"list_modules"):
        Distiller(mlp(16), teacher, [Term(MSEHiddenStatesLoss(), student="layer9", teacher="2")])


def test_labels_missing_for_a_term_that_reads_them(digits, teacher):
    distiller = Distiller(mlp(16), teacher, [Term(HintonLoss())])
    with pytest.raises(ValueError, match=r"reads labels but target is None"):
        distiller(digits["x_train"][:4])


# ---------------------------------------------------------------------------------- speed knobs
def test_log_softmax_is_shared_within_a_step():
    from kdkit.functional import log_softmax, shared_log_softmax

    z = torch.randn(4, 10)
    assert log_softmax(z, 2.0) is not log_softmax(z, 2.0)
    with shared_log_softmax():
        first = log_softmax(z, 2.0)
        assert log_softmax(z, 2.0) is first
        assert log_softmax(z, 3.0) is not first
        z.mul_(2)  # an in-place change invalidates the shared value
        assert not torch.equal(log_softmax(z, 2.0), first)


def test_kd_and_hinton_terms_share_one_softmax_per_temperature(digits, teacher, monkeypatch):
    import kdkit.functional as KF

    calls = []
    real = KF.F.log_softmax

    def counting(x, dim):
        calls.append(tuple(x.shape))
        return real(x, dim=dim)

    monkeypatch.setattr(KF.F, "log_softmax", counting)
    distiller = Distiller(
        mlp(16, depth=1), teacher, [Term(KLDivLoss(4.0)), Term(HintonLoss(temperature=4.0))]
    ).eval()
    distiller(digits["x_train"][:8], digits["y_train"][:8])
    # student and teacher at T=4, student at T=1 for the hard term: three, not five.
    assert len(calls) == 3


class ConvNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_channels_last_and_bf16_teacher_match_plain(digits):
    torch.manual_seed(0)
    student, teacher = ConvNet(4).eval(), ConvNet(16).eval()
    x = digits["x_train"][:8].view(8, 1, 8, 8)
    plain = Distiller(student, teacher, [Term(KLDivLoss(2.0))]).eval()(x).loss
    fast = Distiller(
        copy.deepcopy(student),
        copy.deepcopy(teacher),
        [Term(KLDivLoss(2.0))],
        channels_last=True,
        autocast_dtype=torch.bfloat16,
    ).eval()
    assert fast.teacher.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = fast(x)
    assert out.teacher_logits[0].dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, plain, rtol=0.05, atol=1e-3)


def test_compile_refuses_feature_terms(teacher):
    with pytest.raises(ValueError, match=r"compile=True supports logit terms only"):
        Distiller(
            mlp(16),
            teacher,
            [Term(MSEHiddenStatesLoss(), student="2", teacher="2")],
            compile=True,
        )


def test_a_submodule_flipped_to_train_is_put_back_in_eval(digits, teacher):
    teacher = copy.deepcopy(teacher)
    distiller = Distiller(mlp(16), teacher, [Term(KLDivLoss())])
    teacher[1].train()  # only the BatchNorm, not the root
    distiller(digits["x_train"][:8])
    assert not any(m.training for m in teacher.modules())


def test_on_an_accelerator_finiteness_is_read_every_n_steps(teacher):
    from types import SimpleNamespace

    distiller = Distiller(
        mlp(16),
        teacher,
        {"kd": Term(KLDivLoss()), "hint": Term(KLDivLoss(2.0))},
        check_finite_every=3,
    )
    on_gpu = SimpleNamespace(device=torch.device("cuda"), is_cpu=False)  # only these are read
    fine = {"kd": torch.tensor(1.0), "hint": torch.tensor(2.0)}
    broken = {"kd": torch.tensor(1.0), "hint": torch.tensor(float("inf"))}
    distiller._check_finite(on_gpu, fine)
    distiller._check_finite(on_gpu, broken)  # not read yet: no sync on this step
    with pytest.raises(FloatingPointError, match=r"term 'hint' was NaN/Inf in one of the last 3"):
        distiller._check_finite(on_gpu, fine)
    for _ in range(3):  # the flags start afresh after a read
        distiller._check_finite(on_gpu, fine)
    with pytest.raises(ValueError, match=r"check_finite_every must be an int >= 1, got 0"):
        Distiller(mlp(16), teacher, [Term(KLDivLoss())], check_finite_every=0)


# ------------------------------------------------------------------ regressions from review
def test_student_with_hooks_api_attached_can_be_saved_and_copied(digits, teacher):
    import io

    student = mlp(16, depth=1)
    distiller = Distiller(
        student,
        teacher,
        [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="linear")],
        example_input=digits["x_train"][:4],
    )
    distiller.on_train_begin()
    x = digits["x_train"][:8]
    output = student(x)
    distiller.on_after_compute_loss(x, output, output.sum() * 0).backward()
    torch.save(student, io.BytesIO())  # hooks are plain objects, not closures
    twin = copy.deepcopy(distiller)
    assert torch.equal(twin.student[0].weight, student[0].weight)
    distiller.close()


def test_raw_logit_loss_with_several_teachers_reads_the_mean_logits(digits, teacher):
    from kdkit.losses import MSELogitsLoss

    x = digits["x_train"][:8]
    other = mlp(32).eval()
    student = mlp(16, depth=1).eval()
    distiller = Distiller(
        student, [teacher, other], [Term(MSELogitsLoss())], teacher_weights=[3, 1]
    ).eval()
    expected = nn.functional.mse_loss(student(x), 0.75 * teacher(x) + 0.25 * other(x))
    assert torch.allclose(distiller(x).loss, expected, atol=1e-6)


def test_adapters_follow_the_students_dtype(digits):
    torch.manual_seed(0)
    student, teacher = mlp(16, depth=1).double(), mlp(32).double().eval()
    x = digits["x_train"][:8].double()
    distiller = Distiller(
        student,
        teacher,
        [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="auto")],
        example_input=x,
    )
    assert next(distiller.adapters.parameters()).dtype == torch.float64
    assert torch.isfinite(distiller(x).loss)


def test_identity_adapter_needs_no_example_input(digits, teacher):
    student = mlp(128, depth=1)
    distiller = Distiller(
        student,
        teacher,
        [Term(MSEHiddenStatesLoss(), student="2", teacher="2", adapter="identity")],
    )
    assert len(distiller.adapters) == 0 and torch.isfinite(distiller(digits["x_train"][:4]).loss)


def test_token_logits_average_over_the_attention_mask():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 6), nn.Linear(4, 6)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    distiller = Distiller(student, teacher, [Term(KLDivLoss(2.0))])
    expected = KLDivLoss(2.0)(student(x), teacher(x), mask=mask)
    assert torch.allclose(distiller(x, mask=mask).loss, expected)
    assert not torch.allclose(distiller(x).loss, expected)


def test_module_list_of_teachers_is_several_teachers(digits, teacher):
    other = mlp(32).eval()
    x = digits["x_train"][:8]
    student = mlp(16, depth=1).eval()
    listed = Distiller(student, [teacher, other], [Term(KLDivLoss(2.0))]).eval()
    module_list = Distiller(student, nn.ModuleList([teacher, other]), [Term(KLDivLoss(2.0))])
    assert len(module_list.teachers) == 2
    assert torch.allclose(module_list.eval()(x).loss, listed(x).loss)


def test_lightning_validation_accepts_unlabeled_samples(digits, teacher):
    from kdkit.lightning import DistillationModule

    module = DistillationModule(Distiller(mlp(16), teacher, [Term(KLDivLoss())]), num_classes=10)
    module.eval()
    y = digits["y_train"][:8].clone()
    y[:3] = -1
    module.validation_step((digits["x_train"][:8], y), 0)
    preds = module.distiller.student.eval()(digits["x_train"][3:8]).argmax(-1)
    expected = (preds == y[3:]).float().mean()
    assert torch.allclose(module.val_acc.compute(), expected)
