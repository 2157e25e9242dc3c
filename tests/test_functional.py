"""Known-answer and property tests for kdkit.functional.

Every reference below is written independently of the library (numpy, explicit loops), so a
shared mistake cannot make both sides agree.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit import functional as KF

# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------


def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


def rows(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().reshape(-1, x.shape[-1]).numpy()


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(6, 7, generator=g, dtype=torch.float64) * 2,
        torch.randn(6, 7, generator=g, dtype=torch.float64) * 2,
    )


@pytest.fixture
def token_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    return s, t, mask


# ---------------------------------------------------------------------------------------------
# known answers: logit losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_div_known_answer(logits, temperature):
    s, t = logits
    expected = (
        np.mean(
            [
                np_kl(np_softmax(zt, temperature), np_softmax(zs, temperature))
                for zs, zt in zip(rows(s), rows(t), strict=True)
            ]
        )
        * temperature**2
    )
    assert KF.kl_div(s, t, temperature).item() == pytest.approx(expected, rel=1e-10)


def test_kl_div_matches_torch_batchmean(logits):
    s, t = logits
    torch_value = (
        F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    )
    assert KF.kl_div(s, t, 2.0).item() == pytest.approx(torch_value.item(), rel=1e-10)


def test_reverse_kl_known_answer(logits):
    s, t = logits
    expected = 4.0 * np.mean(
        [
            np_kl(np_softmax(zs, 2), np_softmax(zt, 2))
            for zs, zt in zip(rows(s), rows(t), strict=True)
        ]
    )
    assert KF.reverse_kl_div(s, t, 2.0).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_known_answer(logits, beta):
    s, t = logits
    values = []
    for zs, zt in zip(rows(s), rows(t), strict=True):
        p_t, p_s = np_softmax(zt, 1.5), np_softmax(zs, 1.5)
        m = beta * p_t + (1 - beta) * p_s
        values.append(beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m))
    expected = 1.5**2 * np.mean(values)
    assert KF.generalized_jsd(s, t, beta, 1.5).item() == pytest.approx(expected, rel=1e-9)


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl(logits):
    s, t = logits
    assert KF.generalized_jsd(s, t, 0.0, 2.0).item() == pytest.approx(
        KF.kl_div(s, t, 2.0).item(), rel=1e-12
    )
    assert KF.generalized_jsd(s, t, 1.0, 2.0).item() == pytest.approx(
        KF.reverse_kl_div(s, t, 2.0).item(), rel=1e-12
    )


def test_generalized_jsd_half_is_symmetric_jsd(logits):
    s, t = logits
    assert KF.generalized_jsd(s, t, 0.5).item() == pytest.approx(
        KF.generalized_jsd(t, s, 0.5).item(), rel=1e-10
    )


def test_soft_cross_entropy_known_answer(logits):
    s, t = logits
    expected = 9.0 * np.mean(
        [
            -np.sum(np_softmax(zt, 3) * np.log(np_softmax(zs, 3)))
            for zs, zt in zip(rows(s), rows(t), strict=True)
        ]
    )
    assert KF.soft_cross_entropy(s, t, 3.0).item() == pytest.approx(expected, rel=1e-10)


def test_hinton_loss_known_answer(logits):
    s, t = logits
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    alpha, beta, temp = 0.3, 0.7, 4.0
    total = 0.0
    for zs, zt, label in zip(rows(s), rows(t), y.tolist(), strict=True):
        hard = -np.log(np_softmax(zs)[label])
        soft = -np.sum(np_softmax(zt, temp) * np.log(np_softmax(zs, temp)))
        total += alpha * hard + beta * temp**2 * soft
    expected = total / len(y)
    assert KF.hinton_loss(s, t, y, alpha, beta, temp).item() == pytest.approx(expected, rel=1e-10)


def test_hinton_loss_soft_target_and_ignored_tokens(token_logits):
    s, t, mask = token_logits
    y = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(3))
    y_ignored = torch.where(mask, y, torch.full_like(y, -100))
    keep = mask.flatten().numpy()
    s_kept, t_kept, y_kept = rows(s)[keep], rows(t)[keep], y.flatten().numpy()[keep]
    hard = np.mean([-np.log(np_softmax(z)[k]) for z, k in zip(s_kept, y_kept, strict=True)])
    soft = np.mean(
        [
            -np.sum(np_softmax(b, 2) * np.log(np_softmax(a, 2)))
            for a, b in zip(s_kept, t_kept, strict=True)
        ]
    )
    expected = 0.5 * hard + 0.5 * 4 * soft
    value = KF.hinton_loss(s, t, y_ignored, 0.5, 0.5, 2.0)
    assert value.item() == pytest.approx(expected, rel=1e-10)

    one_hot = F.one_hot(torch.tensor([1, 4]), 11).double()
    a, b = s[0, :2], t[0, :2]
    assert KF.hinton_loss(a, b, one_hot, 0.5, 0.5, 2.0).item() == pytest.approx(
        KF.hinton_loss(a, b, torch.tensor([1, 4]), 0.5, 0.5, 2.0).item(), rel=1e-12
    )


def test_hinton_loss_unlabeled_samples_get_soft_term_only(logits):
    s, t = logits
    y = torch.tensor([2, -1, 0, -1, 5, 1])
    labeled = [i for i, k in enumerate(y.tolist()) if k >= 0]
    hard = np.mean([-np.log(np_softmax(rows(s)[i])[y[i].item()]) for i in labeled])
    soft = np.mean(
        [
            -np.sum(np_softmax(b, 2) * np.log(np_softmax(a, 2)))
            for a, b in zip(rows(s), rows(t), strict=True)
        ]
    )
    value = KF.hinton_loss(s, t, y, 0.4, 0.6, 2.0)
    assert value.item() == pytest.approx(0.4 * hard + 0.6 * 4 * soft, rel=1e-10)


def test_dkd_skips_unlabeled_samples(logits):
    s, t = logits
    y = torch.tensor([2, -1, 0, -100, 5, 1])
    keep = y >= 0
    expected = KF.dkd(s[keep], t[keep], y[keep])
    assert KF.dkd(s, t, y).item() == pytest.approx(expected.item(), rel=1e-12)


def test_mse_logits_known_answer(logits):
    s, t = logits
    diff = rows(s) - rows(t)
    expected = sum(d * d for d in diff.flatten()) / diff.size
    assert KF.mse_logits(s, t).item() == pytest.approx(expected, rel=1e-12)


def mdistiller_style_dkd(s, t, target, alpha, beta, temperature):
    """Reference after mdistiller's dkd_loss: softmax, cat_mask, log, -1000 masking."""
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    p_s = F.softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

    b_s, b_t = cat_mask(p_s), cat_mask(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * temperature**2 / s.shape[0]
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller_formulation(logits):
    s, t = logits
    y = torch.tensor([1, 0, 6, 3, 3, 2])
    expected = mdistiller_style_dkd(s, t, y, 1.0, 8.0, 4.0)
    assert KF.dkd(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(expected.item(), rel=1e-9)


def test_dkd_known_answer_explicit_loops(logits):
    s, t = logits
    y = [2, 2, 0, 6, 1, 4]
    alpha, beta, temp = 0.5, 2.0, 3.0
    total = 0.0
    for zs, zt, g in zip(rows(s), rows(t), y, strict=True):
        ps, pt = np_softmax(zs, temp), np_softmax(zt, temp)
        tckd = np_kl(np.array([pt[g], 1 - pt[g]]), np.array([ps[g], 1 - ps[g]]))
        others = [c for c in range(len(zs)) if c != g]
        nckd = np_kl(np_softmax(zt[others], temp), np_softmax(zs[others], temp))
        total += temp**2 * (alpha * tckd + beta * nckd)
    value = KF.dkd(s, t, torch.tensor(y), alpha, beta, temp)
    assert value.item() == pytest.approx(total / len(y), rel=1e-9)


def test_dist_known_answer(logits):
    s, t = logits
    temp, beta, gamma = 2.0, 1.5, 0.5
    y_s, y_t = np_softmax(rows(s), temp), np_softmax(rows(t), temp)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s, y_t, strict=True)])
    intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s.T, y_t.T, strict=True)])
    expected = temp**2 * (beta * inter + gamma * intra)
    assert KF.dist(s, t, beta, gamma, temp).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients and limits
# ---------------------------------------------------------------------------------------------


def test_kl_gradient_is_t_times_q_minus_p_over_b(logits):
    s, t = logits
    temp = 2.5
    s = s.clone().requires_grad_(True)
    KF.kl_div(s, t, temp).backward()
    q = torch.softmax(s.detach() / temp, -1)
    p = torch.softmax(t / temp, -1)
    torch.testing.assert_close(s.grad, temp * (q - p) / s.shape[0], rtol=1e-10, atol=1e-12)


def test_high_temperature_kl_gradient_approaches_logit_matching():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(8, 10, generator=g, dtype=torch.float64)
    v = torch.randn(8, 10, generator=g, dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)).requires_grad_(True)
    v = v - v.mean(-1, keepdim=True)
    batch, classes = z.shape
    KF.kl_div(z, v, temperature=100.0).backward()
    limit = (z.detach() - v) / (classes * batch)
    assert torch.allclose(z.grad, limit, rtol=0.01, atol=0.01 * limit.abs().max().item())
    assert ((z.grad - limit).norm() / limit.norm()).item() < 0.01

    z2 = z.detach().clone().requires_grad_(True)
    KF.mse_logits(z2, v).backward()
    torch.testing.assert_close(z2.grad, 2 * limit)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t, m: KF.kl_div(s, t, 2.0, m),
        lambda s, t, m: KF.reverse_kl_div(s, t, 2.0, m),
        lambda s, t, m: KF.generalized_jsd(s, t, 0.3, 2.0, m),
        lambda s, t, m: KF.soft_cross_entropy(s, t, 2.0, m),
        lambda s, t, m: KF.mse_logits(s, t, m),
    ],
    ids=["kl", "reverse_kl", "gjsd", "soft_ce", "mse"],
)
def test_token_mask_means_over_kept_tokens_only(token_logits, fn):
    s, t, mask = token_logits
    # Garbage in the masked tokens must not leak into the value.
    s_noisy = torch.where(mask.unsqueeze(-1), s, torch.full_like(s, 1e4))
    kept = [fn(s[b, i][None], t[b, i][None], None) for b, i in mask.nonzero().tolist()]
    expected = torch.stack(kept).mean()
    assert fn(s_noisy, t, mask).item() == pytest.approx(expected.item(), rel=1e-10)
    # With everything kept, tokens are flattened: the mean over all B * L tokens.
    flat = fn(s.reshape(-1, 11), t.reshape(-1, 11), None)
    assert fn(s, t, None).item() == pytest.approx(flat.item(), rel=1e-12)


def test_all_masked_gives_zero_not_nan(token_logits):
    s, t, _ = token_logits
    value = KF.kl_div(s, t, 1.0, torch.zeros(3, 5, dtype=torch.bool))
    assert value.item() == 0.0


def test_teacher_minus_inf_logits_are_finite():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf")]] * 2)
    value = KF.kl_div(s, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_half_precision_is_computed_in_float32(logits):
    s, t = logits
    value = KF.kl_div(s.half(), t.half(), 2.0)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(
        KF.kl_div(s.half().double(), t.half().double(), 2.0).item(), rel=1e-4
    )


# ---------------------------------------------------------------------------------------------
# known answers: feature losses
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def layers() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    shapes = [(4, 6), (2, 3, 5), (2, 3, 4, 4)]
    student = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    teacher = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    return student, teacher


def np_unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x))


def feature_vectors(x: torch.Tensor) -> np.ndarray:
    """Rows = feature vectors: last dim for 2D/3D, channels for 4D."""
    a = x.detach().numpy()
    if a.ndim == 4:
        a = np.transpose(a, (0, 2, 3, 1))
    return a.reshape(-1, a.shape[-1])


@pytest.mark.parametrize("normalize", [False, True])
def test_mse_hidden_states_known_answer(layers, normalize):
    student, teacher = layers
    per_layer = []
    for s, t in zip(student, teacher, strict=True):
        vs, vt = feature_vectors(s), feature_vectors(t)
        if normalize:
            vs = np.stack([np_unit(v) for v in vs])
            vt = np.stack([np_unit(v) for v in vt])
        per_layer.append(np.mean((vs - vt) ** 2))
    expected = np.mean(per_layer)
    value = KF.mse_hidden_states(student, teacher, normalize=normalize)
    assert value.item() == pytest.approx(expected, rel=1e-10)


def test_cosine_hidden_states_known_answer(layers):
    student, teacher = layers
    per_layer = []
    for s, t in zip(student, teacher, strict=True):
        cos = [
            np.dot(np_unit(a), np_unit(b))
            for a, b in zip(feature_vectors(s), feature_vectors(t), strict=True)
        ]
        per_layer.append(1 - np.mean(cos))
    assert KF.cosine_hidden_states(student, teacher).item() == pytest.approx(
        np.mean(per_layer), rel=1e-10
    )


def np_attention(x: np.ndarray, p: float) -> np.ndarray:
    maps = []
    for sample in x:
        a = np.zeros(sample.shape[1:])
        for channel in sample:
            a += np.abs(channel) ** p
        maps.append(np_unit(a.flatten()))
    return np.stack(maps)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_attention_transfer_known_answer(p):
    g = torch.Generator().manual_seed(4)
    s1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t1 = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    s2 = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64)  # larger: pooled to 4 x 3
    t2 = torch.randn(2, 7, 4, 3, generator=g, dtype=torch.float64)
    pooled = s2.numpy().reshape(2, 3, 4, 2, 3, 2).mean(axis=(3, 5))
    expected = np.mean(
        [
            np.mean((np_attention(s1.numpy(), p) - np_attention(t1.numpy(), p)) ** 2),
            np.mean((np_attention(pooled, p) - np_attention(t2.numpy(), p)) ** 2),
        ]
    )
    value = KF.attention_transfer([s1, s2], [t1, t2], p=p)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert KF.attention_map(s1, p).shape == (2, 16)
    torch.testing.assert_close(
        KF.attention_map(s1, p).norm(dim=1), torch.ones(2, dtype=torch.float64)
    )


def test_attention_transfer_is_scale_invariant():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.randn(3, 6, 5, 5, generator=g)
    base = KF.attention_transfer([s], [t])
    assert base.item() > 0
    assert KF.attention_transfer([s], [t * 7.3]).item() == pytest.approx(base.item(), rel=1e-5)


def test_pkt_known_answer():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 9, generator=g, dtype=torch.float64)
    eps = 1e-7

    def conditional(x):
        n = len(x)
        k = np.array(
            [
                [
                    (
                        np.dot(x[i], x[j])
                        / (np.linalg.norm(x[i]) + eps)
                        / (np.linalg.norm(x[j]) + eps)
                        + 1
                    )
                    / 2
                    for j in range(n)
                ]
                for i in range(n)
            ]
        )
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = conditional(s.numpy()), conditional(t.numpy())
    expected = np.mean(pt * np.log((pt + eps) / (ps + eps)))
    assert KF.pkt(s, t).item() == pytest.approx(expected, rel=1e-8)


def np_smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))


def test_rkd_known_answer():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3
    n = 5

    def distances(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(x):
        out = []
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = x[j] - x[i], x[k] - x[i]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            out.append(0.0 if na == 0 or nb == 0 else np.dot(a, b) / (na * nb))
        return np.array(out)

    expected = 25 * np_smooth_l1(distances(s.numpy()), distances(t.numpy())) + 50 * np_smooth_l1(
        angles(s.numpy()), angles(t.numpy())
    )
    assert KF.rkd(s, t).item() == pytest.approx(expected, rel=1e-8)


def test_rkd_gradients_are_finite():
    s = torch.randn(4, 3, requires_grad=True)
    KF.rkd(s, torch.randn(4, 5)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# identical inputs give zero
# ---------------------------------------------------------------------------------------------


def test_identical_inputs_give_zero(logits, layers):
    s, _ = logits
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    student, _ = layers
    feats = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    emb = torch.randn(6, 8, dtype=torch.float64)
    values = {
        "kl": KF.kl_div(s, s.clone(), 3.0),
        "reverse_kl": KF.reverse_kl_div(s, s.clone(), 3.0),
        "gjsd": KF.generalized_jsd(s, s.clone(), 0.4, 3.0),
        "mse_logits": KF.mse_logits(s, s.clone()),
        "dkd": KF.dkd(s, s.clone(), y),
        "dist": KF.dist(s, s.clone()),
        "mse_hidden": KF.mse_hidden_states(student, [x.clone() for x in student], normalize=True),
        "cosine": KF.cosine_hidden_states(student, [x.clone() for x in student]),
        "attention": KF.attention_transfer([feats], [feats.clone()]),
        "pkt": KF.pkt(emb, emb.clone()),
        "rkd": KF.rkd(emb, emb.clone()),
    }
    for name, value in values.items():
        # DIST keeps its reference eps=1e-8 in the Pearson denominator, hence not exactly 0.
        assert abs(value.item()) < 1e-6, name


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(logits, bad):
    s, t = logits
    with pytest.raises(ValueError, match=r"temperature must be > 0, got"):
        KF.kl_div(s, t, bad)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        KF.check_temperature(bad)


def test_temperature_error_names_value():
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1\.0; "):
        KF.check_temperature(-1)
    with pytest.raises(TypeError, match="temperature must be a positive number"):
        KF.check_temperature("4")
    assert KF.check_temperature(2) == 2.0


def test_class_count_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"10 classes \(shape \(4, 10\)\).*12 \(shape \(4, 12\)\)"):
        KF.kl_div(torch.randn(4, 10), torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"\(4, 10\) != teacher logits shape \(3, 10\)"):
        KF.dist(torch.randn(4, 10), torch.randn(3, 10))


def test_negative_weights_raise(logits):
    s, t = logits
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0, got -0\.1"):
        KF.hinton_loss(s, t, y, alpha=-0.1)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -8\.0"):
        KF.dkd(s, t, y, beta=-8.0)
    with pytest.raises(ValueError, match="gamma"):
        KF.dist(s, t, gamma=-1)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\], got 1\.5"):
        KF.generalized_jsd(s, t, beta=1.5)


def test_bad_mask_and_target_shapes(token_logits):
    s, t, mask = token_logits
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) does not match .* \(3, 5\)"):
        KF.kl_div(s, t, 1.0, mask[:, :4])
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match logits shape"):
        KF.hinton_loss(s, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class index 11 but the logits have 11 classes"):
        KF.dkd(s[:, 0], t[:, 0], torch.tensor([0, 11, 3]))


def test_hidden_state_mismatch_names_layer_and_shapes():
    s = [torch.randn(2, 3, 8), torch.randn(2, 3, 8)]
    t = [torch.randn(2, 3, 8), torch.randn(2, 3, 16)]
    with pytest.raises(
        ValueError, match=r"hidden state 1 .* \(2, 3, 8\) .* \(2, 3, 16\).*need_mapping"
    ):
        KF.mse_hidden_states(s, t)
    with pytest.raises(ValueError, match=r"hidden state 1 .*adapter"):
        KF.cosine_hidden_states(s, t)
    with pytest.raises(ValueError, match="2 student hidden states but 1 teacher"):
        KF.mse_hidden_states(s, t[:1])
    with pytest.raises(ValueError, match=r"hidden state 0 .*\[B, C, H, W\]"):
        KF.attention_transfer([torch.randn(2, 3, 4, 4)], [torch.randn(3, 3, 4, 4)])


# ------------------------------------------------------------------ fused fast paths (issue 7 §5)
@pytest.mark.parametrize("p", [2, 4, 2.0])
def test_attention_map_even_power_skips_abs_with_the_same_value_and_gradient(p):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = F.normalize(x.abs().pow(p).mean(dim=1).flatten(1), dim=1)
    (ref_grad,) = torch.autograd.grad(ref.pow(3).sum(), x)
    value = KF.attention_map(x, p)
    (grad,) = torch.autograd.grad(value.pow(3).sum(), x)
    torch.testing.assert_close(value, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_attention_map_odd_power_still_takes_the_absolute_value():
    x = -torch.ones(1, 2, 2, 2)
    torch.testing.assert_close(KF.attention_map(x, 3), torch.full((1, 4), 0.5))


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_kl_div_fused_mean_equals_the_mean_of_per_sample_values(shape):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    t[..., -1] = float("-inf")  # a class the teacher masks
    s[..., -1] = float("-inf")  # ... and the student too: 0 log 0 = 0
    for loss in (KF.kl_div, KF.reverse_kl_div):
        s_ = s.clone().requires_grad_()
        mean = loss(s_, t, 2.0)
        (grad,) = torch.autograd.grad(mean, s_)
        none = loss(s, t, 2.0, reduction="none")
        assert mean.item() == pytest.approx(none.mean().item(), rel=1e-12)
        assert torch.isfinite(grad).all()


def test_cross_entropy_labels_drop_out_of_every_reduction():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([1, -1, 3, -100, 0])
    rows = -torch.log_softmax(z, -1)[torch.arange(5), y.clamp(min=0)]
    rows = torch.where(y >= 0, rows, torch.zeros_like(rows))
    torch.testing.assert_close(KF.cross_entropy(z, y, reduction="none"), rows)
    torch.testing.assert_close(KF.cross_entropy(z, y, reduction="sum"), rows.sum())
    torch.testing.assert_close(KF.cross_entropy(z, y), rows.sum() / 3)
    torch.testing.assert_close(KF.cross_entropy(z, y, num_items_in_batch=6), rows.sum() / 6)
    # nothing labelled: 0 (not NaN), with zero gradients
    z_ = z.clone().requires_grad_()
    value = KF.cross_entropy(z_, torch.full((5,), -1))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(z_.grad, torch.zeros_like(z))


def test_cross_entropy_token_logits_with_a_mask_match_the_reference():
    g = torch.Generator().manual_seed(14)
    z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([[0, 1, -100], [3, -1, 2]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    keep = (y >= 0) & mask
    rows = -torch.log_softmax(z, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    torch.testing.assert_close(KF.cross_entropy(z, y, mask=mask, reduction="none"), rows)
    torch.testing.assert_close(KF.cross_entropy(z, y, mask=mask), rows.sum() / keep.sum())


def test_feature_losses_plain_mean_equals_the_mean_of_per_sample_values():
    g = torch.Generator().manual_seed(15)
    s = [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    for loss in (KF.mse_hidden_states, KF.cosine_hidden_states, KF.attention_transfer):
        mean = loss(s, t)
        none = loss(s, t, reduction="none")
        assert none.shape == (4,)
        assert mean.item() == pytest.approx(none.mean().item(), rel=1e-12)
        assert loss(s, t, reduction="sum").item() == pytest.approx(none.sum().item(), rel=1e-12)


def test_shared_log_softmax_computes_once_per_tensor_and_temperature():
    z = torch.randn(3, 4)
    with KF.shared_log_softmax():
        a = KF.log_softmax(z, 2.0)
        assert KF.log_softmax(z, 2.0) is a
        assert KF.log_softmax(z, 1.0) is not a
    assert KF.log_softmax(z, 2.0) is not a  # the block is closed
