"""Chunked token losses (kdkit.chunked): the same values and gradients as without chunks, for
every chunk size, reduction, dtype, mask, ignore_index, masked vocabulary and NaN padding; no
[N, V] tensor saved for the backward; the DistiLLM divergences against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import kdkit.functional as KF
from kdkit import losses as L
from kdkit.chunked import CHUNK_ELEMENTS, rows_per_chunk

B, LEN, V = 3, 7, 11

FACTORIES = {
    "kl": lambda **k: L.KLDivLoss(2.0, -100, **k),
    "reverse_kl": lambda **k: L.ReverseKLDivLoss(1.5, -100, **k),
    "jsd": lambda **k: L.GeneralizedJSDLoss(0.3, 2.0, -100, **k),
    "jsd_forward": lambda **k: L.GeneralizedJSDLoss(0.0, 1.0, -100, **k),
    "jsd_reverse": lambda **k: L.GeneralizedJSDLoss(1.0, 2.0, -100, **k),
    "skew_kl": lambda **k: L.SkewKLDivLoss(0.1, 2.0, -100, **k),
    "skew_reverse_kl": lambda **k: L.SkewReverseKLDivLoss(0.1, 1.0, -100, **k),
    "tvd": lambda **k: L.TVDLoss(2.0, -100, **k),
}
CHUNKS = [1, 2, 5, "auto", 1000]


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, LEN, V, generator=g) * 3).to(dtype)
    t = (torch.randn(B, LEN, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, LEN), generator=g)
    labels[0, :3] = -100
    labels[2, 5] = -100
    mask = torch.ones(B, LEN, dtype=torch.bool)
    mask[1, 0] = mask[2, 6] = False
    return s, t, labels, mask


def _value_and_grad(loss, s, t, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    value = loss(s, t, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), s)
    return value.detach(), grad


def _assert_same(chunked, plain, dtype):
    (value, grad), (ref_value, ref_grad) = chunked, plain
    assert torch.equal(value, ref_value), "chunked values differ from the unchunked loss"
    assert bool(torch.isfinite(grad).all())
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # the upstream scale rounds once more in bfloat16: at most ~1 ulp
        torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_chunked_equals_unchunked(name, chunk_size, reduction):
    s, t, labels, mask = _inputs()
    make = FACTORIES[name]
    kwargs = {"target": labels, "mask": mask}
    chunked = _value_and_grad(make(chunk_size=chunk_size, reduction=reduction), s, t, **kwargs)
    plain = _value_and_grad(make(chunk_size=None, reduction=reduction), s, t, **kwargs)
    _assert_same(chunked, plain, torch.float32)


@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_chunked_equals_unchunked_in_bfloat16(name, chunk_size):
    s, t, labels, _ = _inputs(torch.bfloat16, seed=1)
    make = FACTORIES[name]
    chunked = _value_and_grad(make(chunk_size=chunk_size), s, t, target=labels)
    plain = _value_and_grad(make(chunk_size=None), s, t, target=labels)
    assert chunked[1].dtype == torch.bfloat16
    _assert_same(chunked, plain, torch.bfloat16)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_masked_vocabulary_nan_padding_and_num_items(name):
    s, t, labels, mask = _inputs(seed=2)
    s[..., 9:] = t[..., 9:] = float("-inf")  # a padded vocabulary, masked in both
    t[1, 2, 4] = float("-inf")  # a class only the teacher rules out
    s[0, 1] = float("nan")  # ignored (-100) positions carry garbage
    t[0, 0] = float("inf")
    make = FACTORIES[name]
    for kwargs in ({"target": labels}, {"target": labels, "mask": mask, "num_items_in_batch": 40}):
        chunked = _value_and_grad(make(chunk_size=3), s, t, **kwargs)
        plain = _value_and_grad(make(chunk_size=None), s, t, **kwargs)
        assert bool(torch.isfinite(chunked[0]).all())
        _assert_same(chunked, plain, torch.float32)
        assert bool((chunked[1][0, :3] == 0).all()), "ignored tokens get no gradient"


def test_gradient_accumulation_with_num_items_in_batch_matches_the_full_batch():
    s, t, labels, _ = _inputs(seed=3)
    loss = L.GeneralizedJSDLoss(0.5, 2.0, -100, chunk_size=2)
    full = _value_and_grad(loss, s, t, target=labels)
    kept = int((labels != -100).sum())
    grads, total = [], torch.zeros(())
    for rows in (slice(0, 1), slice(1, B)):
        value, grad = _value_and_grad(
            loss, s[rows], t[rows], target=labels[rows], num_items_in_batch=kept
        )
        total, grads = total + value, [*grads, grad]
    torch.testing.assert_close(total, full[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.cat(grads), full[1], rtol=1e-5, atol=1e-7)


def test_nothing_of_size_n_by_v_is_saved_for_the_backward():
    s, t, labels, _ = _inputs(seed=4)
    s.requires_grad_(True)

    def saved_entries(loss):
        sizes = []

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss(s, t, target=labels)
        return sizes

    logits = B * LEN * V
    for name, make in FACTORIES.items():
        assert max(saved_entries(make(chunk_size=None)), default=0) >= logits, name
        assert max(saved_entries(make(chunk_size=4)), default=0) < logits, name


def test_the_shared_log_softmax_memo_keeps_no_chunk():
    s, t, _, _ = _inputs(seed=5)
    s.requires_grad_(True)
    with KF.shared_log_softmax():
        for chunk_size in (2, None):
            L.KLDivLoss(chunk_size=chunk_size)(s, t).backward()
            memo = KF._SHARED.get()
            assert memo is not None
            held = len(memo)
            if chunk_size is not None:
                assert held == 0, "the chunked path memoised a chunk's log-softmax"
    assert held > 0  # the unchunked path still shares (this test can see a memo)


def test_without_grad_and_with_a_teacher_that_needs_grad():
    s, t, labels, _ = _inputs(seed=6)
    loss, plain = L.KLDivLoss(2.0, -100, chunk_size=2), L.KLDivLoss(2.0, -100, chunk_size=None)
    with torch.no_grad():
        assert torch.equal(loss(s, t, target=labels), plain(s, t, target=labels))
    t_leaf, t_ref = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss(s, t_leaf, target=labels).backward()
    plain(s, t_ref, target=labels).backward()
    torch.testing.assert_close(t_leaf.grad, t_ref.grad)  # falls back: the teacher gets its grad


def test_class_logits_and_a_second_backward():
    s = torch.randn(5, V, requires_grad=True)
    t = torch.randn(5, V)
    assert torch.equal(L.KLDivLoss()(s, t), L.KLDivLoss(chunk_size=None)(s, t))
    value = L.KLDivLoss(chunk_size=2)(s.unsqueeze(0), t.unsqueeze(0))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward ran twice.*chunk_size=None"):
        value.backward()


def test_chunk_size_is_checked_and_auto_scales_with_the_vocabulary():
    for bad in (0, -3, 2.5, True, "big"):
        with pytest.raises(ValueError, match=r"KLDivLoss: chunk_size must be a positive number"):
            L.KLDivLoss(chunk_size=bad)
    assert L.KLDivLoss().chunk_size == "auto"
    assert rows_per_chunk("auto", 32000) == CHUNK_ELEMENTS // 32000
    assert rows_per_chunk("auto", 10 * CHUNK_ELEMENTS) == 1
    assert rows_per_chunk(7, 32000) == 7


# ---------------------------------------------------------------------------------------------
# the DistiLLM divergences against float64 references (DistiLLM's own formulas)
# ---------------------------------------------------------------------------------------------


def _probs(s, t, temperature):
    return torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)


def _kl(p, q):
    return (p * torch.where(p > 0, p.log() - q.log(), torch.zeros_like(p))).sum(-1)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_skew_divergences_and_tvd_known_answers(alpha, temperature):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, V, generator=g, dtype=torch.float64) * 2, torch.randn(6, V).double()
    p_s, p_t = _probs(s, t, temperature)
    skl = _kl(p_t, alpha * p_t + (1 - alpha) * p_s).mean() * temperature**2
    srkl = _kl(p_s, alpha * p_s + (1 - alpha) * p_t).mean() * temperature**2
    tvd = 0.5 * (p_t - p_s).abs().sum(-1).mean()
    assert KF.skew_kl_div(s, t, alpha, temperature).item() == pytest.approx(skl.item(), rel=1e-9)
    assert KF.skew_reverse_kl_div(s, t, alpha, temperature).item() == pytest.approx(
        srkl.item(), rel=1e-9
    )
    assert KF.tvd(s, t, temperature).item() == pytest.approx(tvd.item(), rel=1e-9)
    # DistiLLM's skewed_forward_kl returns the cross-entropy: the same up to the teacher entropy
    entropy = -(p_t * p_t.log()).sum(-1).mean() * temperature**2
    cross = -(p_t * (alpha * p_t + (1 - alpha) * p_s).log()).sum(-1).mean() * temperature**2
    assert skl.item() == pytest.approx((cross - entropy).item(), rel=1e-9)


def test_skew_endpoints_and_masked_classes():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    assert KF.skew_kl_div(s, t, 0.0, 2.0).item() == pytest.approx(KF.kl_div(s, t, 2.0).item())
    assert KF.skew_reverse_kl_div(s, t, 0.0).item() == pytest.approx(KF.reverse_kl_div(s, t).item())
    t[0, 5:] = float("-inf")  # teacher-only: the mixture still covers the student's classes
    s[1, :2] = t[1, :2] = float("-inf")  # masked in both
    leaf = s.clone().requires_grad_(True)
    value = KF.skew_reverse_kl_div(leaf, t, 0.1)
    value.backward()
    p_s, p_t = _probs(s.double(), t.double(), 1.0)
    expected = _kl(p_s, 0.1 * p_s + 0.9 * p_t).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert bool(torch.isfinite(leaf.grad).all()) and bool((leaf.grad[1, :2] == 0).all())
    for fn in (KF.skew_kl_div, KF.tvd):
        leaf = s.clone().requires_grad_(True)
        (fn(leaf, t) if fn is KF.tvd else fn(leaf, t, 0.1)).backward()
        assert math.isfinite(leaf.grad.abs().sum().item()), fn.__name__


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, "0.1"])
def test_skew_alpha_is_checked(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\)"):
        L.SkewKLDivLoss(alpha)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\)"):
        KF.skew_reverse_kl_div(torch.zeros(2, 3), torch.zeros(2, 3), alpha)
