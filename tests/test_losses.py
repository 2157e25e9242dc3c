"""Tests for the nn.Module wrappers in kdkit.losses: values, masks, mappings, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, Term
from kdkit import losses as L


def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    e = np.exp(z / temperature - (z / temperature).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    return (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )


@pytest.fixture
def tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[3, 1, -100, -100], [-100, 5, 0, 2]])
    return s, t, labels


# ---------------------------------------------------------------------------------------------
# class attributes
# ---------------------------------------------------------------------------------------------


def test_needs_target_and_temperature_attributes():
    assert L.HintonLoss.needs_target and L.DKDLoss.needs_target
    for cls in [
        L.KLDivLoss,
        L.ReverseKLDivLoss,
        L.GeneralizedJSDLoss,
        L.MSELogitsLoss,
        L.DISTLoss,
        L.MSEHiddenStatesLoss,
        L.CosineHiddenStatesLoss,
        L.AttentionLoss,
        L.PKTLoss,
        L.RKDLoss,
        L.FitNetsLoss,
    ]:
        assert cls.needs_target is False, cls.__name__
    for loss in [
        L.KLDivLoss(3),
        L.ReverseKLDivLoss(3),
        L.GeneralizedJSDLoss(0.5, 3),
        L.HintonLoss(temperature=3),
        L.DKDLoss(temperature=3),
        L.DISTLoss(temperature=3),
    ]:
        assert loss.temperature == 3.0 and isinstance(loss.temperature, float)


# ---------------------------------------------------------------------------------------------
# logit losses
# ---------------------------------------------------------------------------------------------


def test_kl_div_loss_known_answer(pair):
    s, t = pair
    expected = 4.0 * np.mean(np_kl_rows(np_softmax(t.numpy(), 2), np_softmax(s.numpy(), 2)))
    assert L.KLDivLoss(temperature=2.0)(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_kl_div_loss_token_mask_and_ignore_index(tokens):
    s, t, labels = tokens
    keep = (labels != -100).numpy()
    per_token = np_kl_rows(np_softmax(t.numpy(), 1.5), np_softmax(s.numpy(), 1.5))
    expected = 1.5**2 * per_token[keep].sum() / keep.sum()

    by_mask = L.KLDivLoss(1.5)(s, t, mask=labels != -100)
    by_ignore = L.KLDivLoss(1.5, ignore_index=-100)(s, t, target=labels)
    assert by_mask.item() == pytest.approx(expected, rel=1e-10)
    assert by_ignore.item() == pytest.approx(expected, rel=1e-10)
    # Without a mask every token counts.
    assert L.KLDivLoss(1.5)(s, t).item() == pytest.approx(1.5**2 * per_token.mean(), rel=1e-10)
    # mask and ignore_index combine: only tokens kept by both.
    extra = torch.ones(2, 4, dtype=torch.bool)
    extra[1, 1] = False
    both = L.KLDivLoss(1.5, ignore_index=-100)(s, t, mask=extra, target=labels)
    keep2 = keep & extra.numpy()
    assert both.item() == pytest.approx(1.5**2 * per_token[keep2].mean(), rel=1e-10)


def test_reverse_kl_loss_known_answer(tokens):
    s, t, labels = tokens
    keep = (labels != -100).numpy()
    per_token = np_kl_rows(np_softmax(s.numpy()), np_softmax(t.numpy()))
    value = L.ReverseKLDivLoss(ignore_index=-100)(s, t, target=labels)
    assert value.item() == pytest.approx(per_token[keep].mean(), rel=1e-10)
    assert not isinstance(L.ReverseKLDivLoss(), L.KLDivLoss)


def test_generalized_jsd_loss_endpoints_and_middle(pair):
    s, t = pair
    assert L.GeneralizedJSDLoss(0.0, 2.0)(s, t).item() == pytest.approx(
        L.KLDivLoss(2.0)(s, t).item(), rel=1e-12
    )
    assert L.GeneralizedJSDLoss(1.0, 2.0)(s, t).item() == pytest.approx(
        L.ReverseKLDivLoss(2.0)(s, t).item(), rel=1e-12
    )
    p_t, p_s = np_softmax(t.numpy(), 2), np_softmax(s.numpy(), 2)
    m = 0.25 * p_t + 0.75 * p_s
    expected = 4.0 * np.mean(0.25 * np_kl_rows(p_t, m) + 0.75 * np_kl_rows(p_s, m))
    assert L.GeneralizedJSDLoss(0.25, 2.0)(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_hinton_loss_known_answer(pair):
    s, t = pair
    y = torch.tensor([0, 7, 3, 3, 1])
    hard = np.mean(-np.log(np_softmax(s.numpy())[np.arange(5), y.numpy()]))
    soft = np.mean(-np.sum(np_softmax(t.numpy(), 4) * np.log(np_softmax(s.numpy(), 4)), axis=-1))
    expected = 0.1 * hard + 0.9 * 16 * soft
    assert L.HintonLoss()(s, t, y).item() == pytest.approx(expected, rel=1e-10)
    # The hard term is plain cross-entropy at T = 1.
    only_hard = L.HintonLoss(alpha=1.0, beta=0.0)(s, t, y)
    assert only_hard.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-12)


def test_mse_logits_loss_known_answer_and_gradient(pair):
    s, t = pair
    s = s.clone().requires_grad_(True)
    value = L.MSELogitsLoss()(s, t)
    assert value.item() == pytest.approx(np.mean((s.detach().numpy() - t.numpy()) ** 2), rel=1e-12)
    value.backward()
    torch.testing.assert_close(s.grad, 2 * (s.detach() - t) / s.numel())


def test_dkd_loss_known_answer(pair):
    s, t = pair
    y = torch.tensor([4, 0, 7, 2, 2])
    temp = 4.0
    total = 0.0
    for zs, zt, g in zip(s.numpy(), t.numpy(), y.tolist(), strict=True):
        ps, pt = np_softmax(zs, temp), np_softmax(zt, temp)
        tckd = np_kl_rows(np.array([pt[g], 1 - pt[g]]), np.array([ps[g], 1 - ps[g]]))
        rest = np.arange(8) != g
        nckd = np_kl_rows(np_softmax(zt[rest], temp), np_softmax(zs[rest], temp))
        total += temp**2 * (1.0 * tckd + 8.0 * nckd)
    assert L.DKDLoss()(s, t, y).item() == pytest.approx(total / 5, rel=1e-9)


def test_dist_loss_known_answer(pair):
    s, t = pair
    y_s, y_t = np_softmax(s.numpy(), 3), np_softmax(t.numpy(), 3)

    def one_minus_pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return 1 - np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b))

    inter = np.mean([one_minus_pearson(a, b) for a, b in zip(y_s, y_t, strict=True)])
    intra = np.mean([one_minus_pearson(a, b) for a, b in zip(y_s.T, y_t.T, strict=True)])
    expected = 9 * (2.0 * inter + 0.5 * intra)
    assert L.DISTLoss(2.0, 0.5, 3.0)(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("cls", [L.HintonLoss, L.DKDLoss])
def test_missing_target_error(pair, cls):
    s, t = pair
    with pytest.raises(ValueError, match=rf"{cls.__name__} needs the ground-truth target"):
        cls()(s, t)


# ---------------------------------------------------------------------------------------------
# hidden-state losses
# ---------------------------------------------------------------------------------------------


def test_mse_hidden_states_loss_tensor_and_list():
    g = torch.Generator().manual_seed(12)
    s = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)]
    t = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)]
    per_layer = [((a - b) ** 2).sum().item() / a.numel() for a, b in zip(s, t, strict=True)]
    assert L.MSEHiddenStatesLoss()(s, t).item() == pytest.approx(np.mean(per_layer), rel=1e-6)
    assert L.MSEHiddenStatesLoss()(tuple(s), tuple(t)).item() == pytest.approx(
        np.mean(per_layer), rel=1e-6
    )
    assert L.MSEHiddenStatesLoss()(s[0], t[0]).item() == pytest.approx(per_layer[0], rel=1e-6)


def test_mse_hidden_states_normalize_4d_uses_channel_dim():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                u = s[b, :, i, j] / s[b, :, i, j].norm()
                v = t[b, :, i, j] / t[b, :, i, j].norm()
                total += ((u - v) ** 2).sum().item()
    value = L.MSEHiddenStatesLoss(normalize=True)(s, t)
    assert value.item() == pytest.approx(total / s.numel(), rel=1e-10)


@pytest.mark.parametrize("num_layers", [None, 2])
def test_mse_hidden_states_mapping_student_to_teacher(num_layers):
    loss = L.MSEHiddenStatesLoss(
        need_mapping=True,
        student_hidden_state_dim=4,
        teacher_hidden_state_dim=6,
        num_layers=num_layers,
    )
    linears = [m for m in loss.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (num_layers or 1)
    assert all(m.in_features == 4 and m.out_features == 6 for m in linears)

    g = torch.Generator().manual_seed(14)
    s = [torch.randn(2, 5, 4, generator=g), torch.randn(2, 4, 3, 3, generator=g)]
    t = [torch.randn(2, 5, 6, generator=g), torch.randn(2, 6, 3, 3, generator=g)]
    value = loss(s, t)
    value.backward()
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

    # Known answer: the mapping is a Linear on the last dim, a 1x1 conv on 4D channels.
    with torch.no_grad():
        first = linears[0]
        second = linears[-1]
        mapped0 = s[0] @ first.weight.T + first.bias
        mapped1 = F.conv2d(s[1], second.weight[:, :, None, None], second.bias)
        expected = (F.mse_loss(mapped0, t[0]) + F.mse_loss(mapped1, t[1])) / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mse_hidden_states_mapping_errors():
    with pytest.raises(ValueError, match=r"need_mapping=True\) needs both dims.*=None"):
        L.MSEHiddenStatesLoss(need_mapping=True, teacher_hidden_state_dim=8)
    loss = L.MSEHiddenStatesLoss(
        need_mapping=True, student_hidden_state_dim=4, teacher_hidden_state_dim=6, num_layers=2
    )
    with pytest.raises(ValueError, match="num_layers=2 mappings but got 1"):
        loss([torch.randn(2, 4)], [torch.randn(2, 6)])
    with pytest.raises(ValueError, match=r"hidden state 1 has shape \(2, 5\).*=4"):
        loss([torch.randn(2, 4), torch.randn(2, 5)], [torch.randn(2, 6), torch.randn(2, 6)])


def test_mse_hidden_states_shape_mismatch_suggests_mapping():
    with pytest.raises(
        ValueError,
        match=r"hidden state 0 has student shape \(2, 3, 4\) but teacher shape \(2, 3, 8\).*"
        r"need_mapping=True.*adapter",
    ):
        L.MSEHiddenStatesLoss()([torch.randn(2, 3, 4)], [torch.randn(2, 3, 8)])
    with pytest.raises(ValueError, match="2 student hidden states but 1 teacher"):
        L.MSEHiddenStatesLoss()([torch.randn(2, 4)] * 2, [torch.randn(2, 4)])
    with pytest.raises(TypeError, match="student hidden states must be a Tensor or a list"):
        L.MSEHiddenStatesLoss()({"a": torch.randn(2, 4)}, torch.randn(2, 4))


def test_cosine_hidden_states_loss_known_answer():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    # cosines 0 and 1 -> losses 1 and 0.
    assert L.CosineHiddenStatesLoss()(s, t).item() == pytest.approx(0.5, abs=1e-7)
    assert L.CosineHiddenStatesLoss()([s, s], [t, -s]).item() == pytest.approx(
        (0.5 + 2.0) / 2, abs=1e-7
    )


def test_attention_loss_known_answer_and_scale_invariance():
    s = torch.zeros(1, 2, 1, 2)
    s[0, 0, 0, 0] = 1.0  # attention map [1, 0]
    t = torch.zeros(1, 3, 1, 2)
    t[0, :, 0, :] = 2.0  # attention map [1, 1] / sqrt(2)
    a = 1 / math.sqrt(2)
    expected = ((1 - a) ** 2 + a**2) / 2
    loss = L.AttentionLoss(p=2)
    assert loss(s, t).item() == pytest.approx(expected, rel=1e-6)

    g = torch.Generator().manual_seed(15)
    fs = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    ft = [torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)]
    base = loss(fs, ft)
    assert loss(fs, [f * 7.3 for f in ft]).item() == pytest.approx(base.item(), rel=1e-5)
    assert loss(fs, [x.clone() for x in ft]).item() > 0
    assert loss(ft, [x.clone() for x in ft]).item() == 0.0


def test_pkt_and_rkd_losses():
    g = torch.Generator().manual_seed(16)
    s = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(6, 10, generator=g, dtype=torch.float64)
    assert L.PKTLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert L.PKTLoss()(s, t).item() > 0
    assert L.RKDLoss()(s, 2.5 * s).item() == pytest.approx(0.0, abs=1e-10)  # scale-free
    only_distance = L.RKDLoss(distance_weight=1.0, angle_weight=0.0)(s, t)
    only_angle = L.RKDLoss(distance_weight=0.0, angle_weight=1.0)(s, t)
    assert L.RKDLoss()(s, t).item() == pytest.approx(
        25 * only_distance.item() + 50 * only_angle.item(), rel=1e-10
    )


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fitnets_loss_regressor(kind):
    g = torch.Generator().manual_seed(17)
    loss = L.FitNetsLoss(3, 5, kind=kind)
    if kind == "conv":
        s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
        mapped = loss.regressor(s)
        assert isinstance(loss.regressor, nn.Conv2d) and loss.regressor.kernel_size == (1, 1)
    else:
        s, t = torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 5, generator=g)
        mapped = s @ loss.regressor.weight.T + loss.regressor.bias
    value = loss(s, t)
    assert value.item() == pytest.approx(((mapped - t) ** 2).mean().item(), rel=1e-5)
    value.backward()
    assert all(p.grad is not None for p in loss.parameters())
    with pytest.raises(ValueError, match=r"C = 3, got shape \(2, 4, 4, 4\)|D = 3, got shape"):
        loss(torch.randn(2, 4, 4, 4), t)
    with pytest.raises(ValueError, match="kind must be 'conv'"):
        L.FitNetsLoss(3, 5, kind="mlp")


# ---------------------------------------------------------------------------------------------
# constructor errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.KLDivLoss(temperature=-1.0),
        lambda: L.ReverseKLDivLoss(temperature=-1.0),
        lambda: L.GeneralizedJSDLoss(temperature=-1.0),
        lambda: L.HintonLoss(temperature=-1.0),
        lambda: L.DKDLoss(temperature=-1.0),
        lambda: L.DISTLoss(temperature=-1.0),
    ],
)
def test_negative_temperature_rejected_at_construction(make):
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1\.0; "):
        make()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: L.HintonLoss(alpha=-0.5), "alpha"),
        (lambda: L.HintonLoss(beta=-0.5), "beta"),
        (lambda: L.DKDLoss(alpha=-1.0), "alpha"),
        (lambda: L.DKDLoss(beta=-1.0), "beta"),
        (lambda: L.DISTLoss(gamma=-1.0), "gamma"),
        (lambda: L.RKDLoss(angle_weight=-1.0), "angle_weight"),
    ],
)
def test_negative_weights_rejected(make, name):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got -"):
        make()


def test_gjsd_beta_out_of_range():
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\], got -0\.2"):
        L.GeneralizedJSDLoss(beta=-0.2)


def test_class_count_mismatch_in_module():
    with pytest.raises(ValueError, match=r"shape \(2, 10\).*shape \(2, 100\)"):
        L.KLDivLoss()(torch.randn(2, 10), torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"shape \(2, 10\).*shape \(2, 100\)"):
        L.HintonLoss()(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))


def test_cross_entropy_skips_unlabeled_samples():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([0, -1, 2])
    log_q = torch.log_softmax(logits, -1)
    expected = -(log_q[0, 0] + log_q[2, 2]) / 2
    assert torch.allclose(L.CrossEntropyLoss()(logits, target), expected)
    none_labeled = L.CrossEntropyLoss()(logits, torch.full((3,), -1))
    assert none_labeled.item() == 0.0


def test_kl_term_with_ignore_index_reads_labels_as_keyword():
    from kdkit import Distiller, Term

    student, teacher = torch.nn.Linear(4, 5), torch.nn.Linear(4, 5)
    x = torch.randn(2, 3, 4)
    target = torch.tensor([[1, -100, 2], [0, 4, -100]])
    term = Term(L.KLDivLoss(temperature=2.0, ignore_index=-100), target=True)
    out = Distiller(student, teacher, [term])(x, target)
    expected = L.KLDivLoss(2.0)(student(x), teacher(x), mask=target != -100)
    assert torch.allclose(out.loss, expected)


# ------------------------------------------------------------------ regressions from review
def test_labels_can_never_be_taken_for_a_mask():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 1, -100], [2, -100, 0]])
    with pytest.raises(TypeError):
        L.KLDivLoss(2.0, ignore_index=-100)(s, t, labels)  # mask and target are keyword-only
    with pytest.raises(ValueError, match=r"ignore_index is None"):
        L.KLDivLoss(2.0)(s, t, target=labels)
    with pytest.raises(ValueError, match=r"mask shape \(3,\) does not match"):
        L.KLDivLoss(2.0, ignore_index=-100)(
            s, t, mask=torch.ones(3, dtype=torch.bool), target=labels
        )
    with pytest.raises(ValueError, match=r"values other than 0/1"):
        L.KLDivLoss(2.0)(s, t, mask=labels)


@pytest.mark.parametrize(
    "loss",
    [L.KLDivLoss(2.0), L.ReverseKLDivLoss(2.0), L.GeneralizedJSDLoss(0.5, 2.0), L.MSELogitsLoss()],
)
def test_nan_in_a_masked_token_does_not_reach_the_gradients(loss):
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    with torch.no_grad():
        s[0, 2] = float("nan")
    t[1, 0] = float("inf")
    mask = torch.tensor([[True, True, False], [False, True, True]])
    value = loss(s, t, mask=mask)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[0, 2], torch.zeros(5))


def test_gjsd_with_a_class_masked_in_both_models_has_finite_gradients():
    s = torch.tensor([[1.0, 0.5, float("-inf")]], requires_grad=True)
    t = torch.tensor([[0.2, 1.5, float("-inf")]])
    value = L.GeneralizedJSDLoss(beta=0.5)(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_rkd_treats_the_teacher_as_a_target():
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    L.RKDLoss()(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_shared_log_softmax_respects_grad_mode():
    from kdkit.functional import log_softmax, shared_log_softmax

    z = torch.randn(3, 4, requires_grad=True)
    with shared_log_softmax():
        with torch.no_grad():
            log_softmax(z, 2.0)
        assert log_softmax(z, 2.0).requires_grad


@pytest.mark.parametrize("loss", [L.MSEHiddenStatesLoss(), L.CosineHiddenStatesLoss()])
def test_hidden_state_losses_average_over_kept_tokens(loss):
    torch.manual_seed(0)
    s = torch.randn(2, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    keep = mask.nonzero(as_tuple=True)
    expected = loss(s[keep].unsqueeze(0), t[keep].unsqueeze(0))  # kept tokens only
    with torch.no_grad():
        s[0, 3] = float("nan")  # a dropped token: no effect, no NaN gradient
    value = loss(s, t, mask=mask)
    value.backward()
    assert torch.allclose(value, expected, atol=1e-6) and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match=r"token mask needs token states \[B, L, D\]"):
        loss(torch.randn(2, 6), torch.randn(2, 6), mask=mask)


# ------------------------------------------------------------------ issue 7, section 4 defects
def np_log_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def teacher_masks_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """The outside check's repro: -inf only in the teacher (row 0, classes 7..9)."""
    g = torch.Generator().manual_seed(21)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    t[0, 7:] = float("-inf")
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_reverse_kl_with_classes_masked_only_in_the_teacher(temperature):
    s, t = teacher_masks_classes()
    s = s.double().requires_grad_(True)
    t = t.double()
    value = L.ReverseKLDivLoss(temperature)(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    # Reference: the student renormalised over the classes the teacher allows.
    allowed = torch.isfinite(t).numpy()
    zs, zt = s.detach().numpy() / temperature, t.numpy() / temperature
    rows = []
    for a, b, ok in zip(zs, zt, allowed, strict=True):
        rows.append(np_kl_rows(np_softmax(a[ok]), np_softmax(b[ok])))
    assert value.item() == pytest.approx(temperature**2 * np.mean(rows), rel=1e-10)
    # The forbidden classes get no gradient: the student cannot lower the loss through them.
    assert torch.equal(s.grad[0, 7:], torch.zeros(3, dtype=s.dtype))
    # beta = 1 of the generalized JSD is the same reverse KL.
    same = L.GeneralizedJSDLoss(1.0, temperature)(s.detach(), t)
    assert same.item() == pytest.approx(value.item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_with_classes_masked_only_in_the_teacher(beta):
    s, t = teacher_masks_classes()
    s = s.double().requires_grad_(True)
    t = t.double()
    value = L.GeneralizedJSDLoss(beta, 2.0)(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    # 0 < beta < 1 is finite on the full support: the mixture m covers every class of p_s.
    p_s, p_t = np_softmax(s.detach().numpy(), 2.0), np.exp(np_log_softmax(t.numpy(), 2.0))
    m = beta * p_t + (1 - beta) * p_s
    kl_t = np.sum(np.where(p_t > 0, p_t * (np.log(np.where(p_t > 0, p_t, 1)) - np.log(m)), 0), -1)
    kl_s = np.sum(p_s * (np.log(p_s) - np.log(m)), -1)
    expected = 4.0 * np.mean(beta * kl_t + (1 - beta) * kl_s)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def poisoned_token_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(22)
    s = torch.randn(2, 4, 6, generator=g).to(dtype)
    t = torch.randn(2, 4, 6, generator=g).to(dtype)
    labels = torch.tensor([[3, 1, -100, -100], [-100, 5, 0, 2]])
    poisoned_s, poisoned_t = s.clone(), t.clone()
    ignored = labels == -100
    poisoned_s[ignored] = float("nan")
    poisoned_s[1, 0, 2] = float("inf")
    poisoned_t[ignored] = float("inf")
    return (s, t), (poisoned_s, poisoned_t), labels


@pytest.mark.parametrize("make", [L.HintonLoss, L.DKDLoss], ids=["hinton", "dkd"])
def test_nan_in_ignored_tokens_does_not_reach_the_gradients_of_labelled_losses(make):
    (s, t), (ps, pt), labels = poisoned_token_batch()
    for teacher in (t, pt) if make is L.DKDLoss else (t,):
        clean = s.clone().requires_grad_(True)
        make()(clean, t, labels).backward()
        dirty = ps.clone().requires_grad_(True)
        value = make()(dirty, teacher, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(dirty.grad).all()
        torch.testing.assert_close(dirty.grad, clean.grad)
        assert value.item() == pytest.approx(make()(s, t, labels).item(), rel=1e-6)


def test_dist_loss_takes_a_token_mask():
    g = torch.Generator().manual_seed(23)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss = L.DISTLoss(1.0, 2.0, 2.0)
    kept = loss(s.detach()[mask], t[mask])
    with torch.no_grad():
        s[~mask] = float("nan")  # padding: any value, it must not matter
    value = loss(s, t, mask=mask)
    value.backward()
    assert value.item() == pytest.approx(kept.item(), rel=1e-12)
    assert torch.isfinite(s.grad).all() and torch.equal(s.grad[~mask], torch.zeros(3, 7).double())


def test_mse_logits_with_classes_masked_in_both_models():
    g = torch.Generator().manual_seed(24)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    s[0, 4:], t[0, 4:] = float("-inf"), float("-inf")  # row 0 allows classes 0..3 only
    s = s.requires_grad_(True)
    value = L.MSELogitsLoss()(s, t)
    value.backward()
    d = (s.detach() - t).numpy()
    expected = np.mean([np.mean(d[0, :4] ** 2), np.mean(d[1] ** 2), np.mean(d[2] ** 2)])
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(s.grad).all() and torch.equal(s.grad[0, 4:], torch.zeros(2).double())
    torch.testing.assert_close(s.grad[1], 2 * torch.tensor(d[1]) / (3 * 6))


def test_mse_logits_refuses_a_class_masked_in_one_model_only():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    t[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"-inf in the teacher logits only.*same classes"):
        L.MSELogitsLoss()(s, t)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t, y: L.CrossEntropyLoss()(s, y),
        lambda s, t, y: L.HintonLoss()(s, t, y),
        lambda s, t, y: L.CrossEntropyLoss()(s.view(2, 2, 10), y.view(2, 2)),  # token logits
        lambda s, t, y: Distiller(
            nn.Identity(), None, [Term(L.CrossEntropyLoss(), teacher=None, target=True)]
        )(s, y),
    ],
    ids=["cross_entropy", "hinton", "token_cross_entropy", "distiller"],
)
def test_a_label_past_the_last_class_names_the_class_count(call):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([1, -1, 10, 3])
    with pytest.raises(ValueError, match=r"class index 10 but the logits have 10 classes"):
        call(s, t, y)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: L.DISTLoss()(s, torch.randn(2, 3, 5), mask=torch.zeros(2, 3, dtype=torch.bool)),
        lambda s: L.PKTLoss()(s[:0, 0], torch.randn(0, 5)),
        lambda s: L.RKDLoss()(s[:0, 0], torch.randn(0, 5)),
        lambda s: L.CosineHiddenStatesLoss()(s[:0], torch.randn(0, 3, 5)),
    ],
    ids=["dist_all_masked", "pkt_empty", "rkd_empty", "cosine_empty"],
)
def test_losses_give_zero_when_nothing_is_kept(call):
    s = torch.randn(2, 3, 5, requires_grad=True)
    value = call(s)
    assert value.item() == 0.0
    value.backward()
    assert s.grad is None or not s.grad.any()
