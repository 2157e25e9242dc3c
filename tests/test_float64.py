"""Float64 in, float64 out: the ensemble, sparse (top-k), mixture, chunked and vocabulary paths keep
the inputs' precision (only half precision is upcast, to float32), and a float32 student with a
float64 teacher gives what the unchunked loss gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit import Distiller, Term
from kdkit import functional as KF
from kdkit import losses as L
from kdkit.vocab import VocabMap

F64 = {"rtol": 1e-12, "atol": 1e-14}


def _logits(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def test_weighted_ensemble_of_float64_teachers_is_exact():
    teachers = [nn.Linear(5, 7).double(), nn.Linear(5, 7).double()]
    distiller = Distiller(
        nn.Linear(5, 7).double(), teachers, [Term(L.KLDivLoss(2.0))], teacher_weights=[1, 2]
    )
    x = _logits(4, 5)
    got = distiller.compute_teacher_logits(x)
    expected = torch.log(teachers[0](x).softmax(-1) / 3 + 2 * teachers[1](x).softmax(-1) / 3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.log_softmax(-1), expected, **F64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_with_every_class_kept_equals_dense_kl_in_float64(temperature):
    student, teacher = _logits(6, 12, seed=1), _logits(6, 12, seed=2, scale=3.0)
    values, indices = teacher.log_softmax(-1).topk(12, -1)
    tail = torch.full((6,), float("-inf"), dtype=torch.float64)
    got = KF.sparse_kl_div(student, (values, indices, tail), temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, KF.kl_div(student, teacher, temperature), **F64)
    kept, _ = KF.topk_at_temperature(values, tail, 12, temperature)
    assert kept.dtype == torch.float64


@pytest.mark.parametrize(
    "loss",
    [L.GeneralizedJSDLoss(0.5), L.SkewKLDivLoss(0.1), L.SkewReverseKLDivLoss(0.1)],
    ids=lambda loss: type(loss).__name__,
)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.float64])
def test_mixture_losses_take_a_student_and_teacher_of_different_dtypes(loss, student_dtype):
    loss.chunk_size = None
    teacher = _logits(2, 3, 9, seed=3)
    student = _logits(2, 3, 9, seed=4).to(student_dtype)
    pairs = [(student, teacher), (teacher, student)]  # float64 on either side
    for s, t in pairs:
        got = loss(s, t)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, loss(s.double(), t.double()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda chunk: L.KLDivLoss(2.0, chunk_size=chunk),
        lambda chunk: L.ReverseKLDivLoss(2.0, chunk_size=chunk),
        lambda chunk: L.GeneralizedJSDLoss(0.5, 2.0, chunk_size=chunk),
        lambda chunk: L.SkewKLDivLoss(0.1, 2.0, chunk_size=chunk),
    ],
    ids=["kl", "reverse_kl", "jsd", "skew_kl"],
)
def test_chunked_loss_of_a_float32_student_and_a_float64_teacher_matches_unchunked(make):
    teacher = _logits(2, 5, 11, seed=5, scale=2.0)
    student = _logits(2, 5, 11, seed=6).float()
    values = []
    for chunk in (None, 3):
        s = student.clone().requires_grad_(True)
        value = make(chunk)(s, teacher)
        values.append((value.detach(), *torch.autograd.grad(value, s)))
    (v_full, g_full), (v_chunked, g_chunked) = values
    assert v_chunked.dtype == v_full.dtype == torch.float64
    torch.testing.assert_close(v_chunked, v_full, **F64)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-6, atol=1e-7)  # float32, as the student


def test_fused_loss_of_float32_student_weights_and_a_float64_teacher_matches_unfused():
    g = torch.Generator().manual_seed(7)
    x_s, w_s = torch.randn(2, 4, 3, generator=g), torch.randn(11, 3, generator=g)
    x_t, w_t = _logits(2, 4, 5, seed=8), _logits(11, 5, seed=9)
    fused = L.FusedLinearJSDLoss(0.5, 2.0, chunk_size=3)(x_s, w_s, x_t, w_t)
    unfused = L.GeneralizedJSDLoss(0.5, 2.0, chunk_size=None)(x_s @ w_s.T, x_t @ w_t.T)
    assert fused.dtype == unfused.dtype == torch.float64
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-7)


def test_shared_mass_of_float64_logits_is_float64():
    shared = torch.arange(0, 50, 2)
    vocab_map = VocabMap(shared, shared, student_vocab_size=50, teacher_vocab_size=50)
    logits = _logits(4, 50, seed=10)
    got = vocab_map.shared_mass(logits)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, logits.softmax(-1)[..., ::2].sum(-1), **F64)
