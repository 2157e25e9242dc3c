"""FusedLinearJSDLoss: equals GeneralizedJSDLoss on the full logits (values and the gradients
w.r.t. the student's hidden states and lm_head weight), for several chunk sizes, betas, dtypes,
labels with -100 and masks; clear errors for mismatched shapes."""

from __future__ import annotations

import pytest
import torch

from kdkit import losses as L

B, LEN, H_S, H_T, V = 3, 6, 5, 8, 13


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(B, LEN, H_S, generator=g).to(dtype)
    w_s = torch.randn(V, H_S, generator=g).to(dtype)
    x_t = torch.randn(B, LEN, H_T, generator=g).to(dtype)
    w_t = torch.randn(V, H_T, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, LEN), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return x_s, w_s, x_t, w_t, labels


def _grads(value, x_s, w_s):
    return (value.detach(), *torch.autograd.grad(value, (x_s, w_s)))


def _fused(loss, x_s, w_s, x_t, w_t, *args, **kwargs):
    x_s, w_s = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    return _grads(loss(x_s, w_s, x_t, w_t, *args, **kwargs), x_s, w_s)


def _reference(beta, temperature, x_s, w_s, x_t, w_t, reduction="mean", **kwargs):
    x_s, w_s = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss = L.GeneralizedJSDLoss(beta, temperature, -100, chunk_size=None, reduction=reduction)
    value = loss(x_s @ w_s.T, x_t @ w_t.T, **kwargs)
    return _grads(value, x_s, w_s)


def _close(got, expected, dtype=torch.float32):
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, "auto", 1000])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_equals_generalized_jsd_on_the_full_logits(beta, chunk_size):
    x_s, w_s, x_t, w_t, labels = _inputs()
    mask = torch.ones(B, LEN, dtype=torch.bool)
    mask[1, 3] = False
    loss = L.FusedLinearJSDLoss(beta, 2.0, -100, chunk_size)
    got = _fused(loss, x_s, w_s, x_t, w_t, labels, mask=mask)
    _close(got, _reference(beta, 2.0, x_s, w_s, x_t, w_t, target=labels, mask=mask))


@pytest.mark.parametrize("chunk_size", [3, "auto"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_bfloat16(beta, chunk_size):
    x_s, w_s, x_t, w_t, labels = _inputs(torch.bfloat16, seed=1)
    loss = L.FusedLinearJSDLoss(beta, 1.0, -100, chunk_size)
    got = _fused(loss, x_s, w_s, x_t, w_t, labels)
    _close(got, _reference(beta, 1.0, x_s, w_s, x_t, w_t, target=labels), torch.bfloat16)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_float64_keeps_float64(ce_weight):
    """Value and gradients in float64, as the unfused loss on float64 logits gives them (the
    chunk loop accumulates in at least float32, never below the inputs' precision)."""
    x_s, w_s, x_t, w_t, labels = _inputs(torch.float64, seed=3)
    loss = L.FusedLinearJSDLoss(0.5, 2.0, -100, 4, ce_weight=ce_weight)
    got = _fused(loss, x_s, w_s, x_t, w_t, labels)
    x_r, w_r = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    jsd = L.GeneralizedJSDLoss(0.5, 2.0, -100, chunk_size=None)
    expected = jsd(x_r @ w_r.T, x_t @ w_t.T, target=labels)
    if ce_weight:
        expected = expected + ce_weight * L.CrossEntropyLoss()(x_r @ w_r.T, labels)
    for a, b in zip(got, _grads(expected, x_r, w_r), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_flat_rows_sum_and_num_items_in_batch():
    x_s, w_s, x_t, w_t, labels = _inputs(seed=2)
    flat = [x_s.reshape(-1, H_S), w_s, x_t.reshape(-1, H_T), w_t]
    got = _fused(L.FusedLinearJSDLoss(0.5, chunk_size=5, reduction="sum"), *flat, labels.flatten())
    _close(got, _reference(0.5, 1.0, *flat, reduction="sum", target=labels.flatten()))
    got = _fused(L.FusedLinearJSDLoss(0.5, chunk_size=5), *flat, num_items_in_batch=40)
    _close(got, _reference(0.5, 1.0, *flat, num_items_in_batch=40))


def test_no_labels_averages_over_every_token_and_eval_gives_the_same_value():
    x_s, w_s, x_t, w_t, _ = _inputs(seed=3)
    loss = L.FusedLinearJSDLoss(0.5, 1.5, chunk_size=4)
    got = _fused(loss, x_s, w_s, x_t, w_t)
    _close(got, _reference(0.5, 1.5, x_s, w_s, x_t, w_t))
    with torch.no_grad():
        torch.testing.assert_close(loss(x_s, w_s, x_t, w_t), got[0])


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_nan_hidden_states_at_ignored_tokens_reach_no_gradient(ce_weight):
    x_s, w_s, x_t, w_t, labels = _inputs(seed=4)
    x_s[0, 0] = float("nan")
    x_t[0, 1] = float("inf")
    loss = L.FusedLinearJSDLoss(chunk_size=4, ce_weight=ce_weight)
    value, grad_x, grad_w = _fused(loss, x_s, w_s, x_t, w_t, labels)
    assert torch.isfinite(value)
    assert bool(torch.isfinite(grad_x).all()) and bool(torch.isfinite(grad_w).all())
    assert bool((grad_x[0, :2] == 0).all())
    clean = _inputs(seed=4)
    _close((value, grad_x[1:], grad_w), _drop_first(_fused(loss, *clean)))


def _drop_first(result):
    value, grad_x, grad_w = result
    return value, grad_x[1:], grad_w


def test_the_teacher_gets_no_gradient():
    x_s, w_s, x_t, w_t, labels = _inputs(seed=5)
    w_t.requires_grad_(True)
    x_s.requires_grad_(True)
    L.FusedLinearJSDLoss()(x_s, w_s, x_t, w_t, labels).backward()
    assert x_s.grad is not None and w_t.grad is None


def test_errors_name_the_problem():
    x_s, w_s, x_t, w_t, labels = _inputs()
    loss = L.FusedLinearJSDLoss()
    with pytest.raises(ValueError, match=r"student's lm_head has 13 rows.*teacher's has 12"):
        loss(x_s, w_s, x_t, w_t[:12])
    with pytest.raises(ValueError, match=r"student_input has shape \(3, 6, 5\) and student_weig"):
        loss(x_s, w_t, x_t, w_t)
    with pytest.raises(ValueError, match=r"cover different tokens"):
        loss(x_s, w_s, x_t[:, :4], w_t)
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) does not match"):
        loss(x_s, w_s, x_t, w_t, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got target but ignore_index is None"):
        L.FusedLinearJSDLoss(ignore_index=None)(x_s, w_s, x_t, w_t, labels)
    with pytest.raises(ValueError, match=r"reduction='none' is not available"):
        L.FusedLinearJSDLoss(reduction="none")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive number of token rows"):
        L.FusedLinearJSDLoss(chunk_size=None)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        L.FusedLinearJSDLoss(beta=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_weight_adds_the_students_cross_entropy_on_the_kept_tokens(chunk_size, reduction, dtype):
    x_s, w_s, x_t, w_t, labels = _inputs(dtype, seed=2)
    mask = torch.ones(B, LEN, dtype=torch.bool)
    mask[1, 3] = False
    loss = L.FusedLinearJSDLoss(0.5, 2.0, -100, chunk_size, ce_weight=0.3, reduction=reduction)
    got = _fused(loss, x_s, w_s, x_t, w_t, labels, mask=mask)

    x_r, w_r = x_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    logits = x_r @ w_r.T
    jsd = L.GeneralizedJSDLoss(0.5, 2.0, -100, chunk_size=None, reduction=reduction)
    ce = L.CrossEntropyLoss(reduction=reduction)
    keep = mask & (labels != -100)
    expected = jsd(logits, x_t @ w_t.T, target=labels, mask=mask) + 0.3 * ce(
        logits, labels, mask=keep
    )
    _close(got, _grads(expected, x_r, w_r), dtype)


def test_ce_weight_needs_labels_and_an_ignore_index():
    x_s, w_s, x_t, w_t, _ = _inputs()
    with pytest.raises(ValueError, match="ce_weight=0.5 trains on the labels.*ignore_index"):
        L.FusedLinearJSDLoss(0.5, ignore_index=None, ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight=0.5\\) needs the labels"):
        L.FusedLinearJSDLoss(0.5, ce_weight=0.5)(x_s, w_s, x_t, w_t)
    with pytest.raises(ValueError, match="ce_weight must be a finite number >= 0"):
        L.FusedLinearJSDLoss(0.5, ce_weight=-1.0)
