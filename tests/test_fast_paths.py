"""The step's fast paths give the general paths' values and gradients.

Each common case has a shorter route (benchmarks/overhead.py, vs_torchdistill.py): hard labels
all >= 0 on the CPU take one ``F.nll_loss``, the plain KL mean reads the teacher as
probabilities (one floor fewer), the plain hidden-state MSE takes ``F.mse_loss``'s own mean, the
Distiller adds a term with a number weight in one ``torch.add(alpha=w)``. The general routes
stay for the other inputs; both must agree.
"""

from __future__ import annotations

import pytest
import torch

import kdkit.functional as KF
from kdkit import Distiller, Term
from kdkit.losses import CrossEntropyLoss, KLDivLoss


def _grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
def test_cross_entropy_of_all_labelled_cpu_batch_equals_the_masked_route(shape) -> None:
    torch.manual_seed(0)
    logits = torch.randn(*shape, dtype=torch.float64)
    target = torch.randint(0, shape[-1], shape[:-1])
    everything = torch.ones(shape[:-1], dtype=torch.bool)  # a mask takes the general route
    fast, g_fast = _grad(lambda z: KF.cross_entropy(z, target), logits)
    general, g_general = _grad(lambda z: KF.cross_entropy(z, target, mask=everything), logits)
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_fast, g_general, rtol=1e-12, atol=1e-15)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, shape[-1]), target.reshape(-1))
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=0)


def test_cross_entropy_with_an_unlabelled_sample_still_averages_the_labelled_ones() -> None:
    logits = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, -1, 2, -100])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], target[[0, 2]])
    torch.testing.assert_close(KF.cross_entropy(logits, target), expected)
    assert float(KF.cross_entropy(logits, torch.tensor([-1, -1, -100, -1]))) == 0.0


def test_cross_entropy_of_half_logits_is_computed_in_float32() -> None:
    logits = torch.randn(8, 6).bfloat16()
    target = torch.randint(0, 6, (8,))
    value = KF.cross_entropy(logits, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(
        value, torch.nn.functional.cross_entropy(logits.float(), target), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_mean_with_teacher_as_probabilities_equals_the_log_target_route(temperature) -> None:
    torch.manual_seed(1)
    student = torch.randn(6, 9, dtype=torch.float64)
    teacher = torch.randn(6, 9, dtype=torch.float64)
    teacher[0, 6:] = float("-inf")  # classes the teacher rules out
    student[0, 7:] = float("-inf")  # two of them the student rules out too
    # A teacher that requires grad takes the log-target route (d(p log p)/dp is infinite at 0).
    fast, g_fast = _grad(lambda s: KF.kl_div(s, teacher, temperature), student)
    general, g_general = _grad(
        lambda s: KF.kl_div(s, teacher.clone().requires_grad_(True), temperature), student
    )
    assert torch.isfinite(fast) and torch.isfinite(g_fast).all()
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_fast, g_general, rtol=1e-12, atol=1e-15)
    p_t = torch.softmax(teacher / temperature, -1)
    log_q = torch.log_softmax(student / temperature, -1)
    terms = torch.where(p_t > 0, p_t * (p_t.log() - log_q), torch.zeros_like(p_t))
    torch.testing.assert_close(fast, temperature**2 * terms.sum(-1).mean(), rtol=1e-12, atol=0)


def test_hidden_state_mse_mean_equals_the_mean_of_its_per_sample_values() -> None:
    torch.manual_seed(2)
    student = [torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(2)]

    def mean(layer: torch.Tensor) -> torch.Tensor:
        return KF.mse_hidden_states([layer, student[1]], teacher)

    def per_sample(layer: torch.Tensor) -> torch.Tensor:
        return KF.mse_hidden_states([layer, student[1]], teacher, reduction="none").mean()

    fused, g_fused = _grad(mean, student[0])
    general, g_general = _grad(per_sample, student[0])
    torch.testing.assert_close(fused, general, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_fused, g_general, rtol=1e-12, atol=1e-15)
    expected = sum(((s - t) ** 2).mean() for s, t in zip(student, teacher, strict=True)) / 2
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=0)


def test_cross_entropy_shares_the_log_softmax_of_a_soft_term_at_t1() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.randint(0, 4, (5,))
    # Within the Distiller's block, the log-softmax another term took of the same logits at
    # T = 1 (Hinton, KL, DKD) is the one CE reads: one node for both in the graph.
    with KF.shared_log_softmax():
        first = KF.log_softmax(logits, 1.0)
        ce = KF.cross_entropy(logits, target)
    assert ce.grad_fn.next_functions[0][0] is first.grad_fn


def test_a_tensor_weight_set_after_construction_trains_with_the_student() -> None:
    torch.manual_seed(3)
    student, teacher = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    distiller = Distiller(student, teacher, [Term(CrossEntropyLoss()), Term(KLDivLoss(2.0))])
    weight = torch.nn.Parameter(torch.tensor(0.25))
    distiller.terms["kl_div"].weight = weight  # e.g. a schedule or a learned weight
    out = distiller(x, y)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out.terms["cross_entropy"] + 0.25 * out.terms["kl_div"])
    torch.testing.assert_close(weight.grad, out.terms["kl_div"])
    distiller.terms["kl_div"].weight = 0.25  # a number: the one-kernel add, the same total
    torch.testing.assert_close(distiller(x, y).loss, out.loss)
