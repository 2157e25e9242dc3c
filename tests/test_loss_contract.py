"""The loss contract of kdkit.contract, for every loss in kdkit.losses.

* declarations (needs_target, reads_teacher, takes_mask, per_sample, temperature);
* ``reduction``: "none" is per-sample / per-token, 0 at dropped positions, and "mean" / "sum"
  are its mean over the kept entries / its sum; losses that are not per-sample refuse it;
* ``num_items_in_batch``: two half-batches accumulate to the full batch's value and gradient;
* hyper-parameters are checked once, in ``__init__``;
* the losses changed by issue 7 against hand-written float64 references, in float32 and bfloat16,
  with a mask, masked (-inf) classes, and NaN at ignored positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import kdkit.functional as KF
from kdkit import losses as L
from kdkit.contract import DistillationLoss

B, LEN, C, D = 4, 5, 7, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _token_mask() -> torch.Tensor:
    return torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool
    )


def _labels(keep: torch.Tensor, seed: int = 5) -> torch.Tensor:
    labels = torch.randint(0, C, keep.shape, generator=_gen(seed))
    return torch.where(keep, labels, torch.full_like(labels, -100))


# ---------------------------------------------------------------------------------------------
# one case per loss: how to build it, its inputs, and the positions it keeps
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    make: Callable[..., DistillationLoss]
    # (positional args, keyword args, kept positions or None for all); args[0] is the student
    inputs: Callable[[], tuple[list, dict, torch.Tensor | None]]


def _token_logits(seed: int = 1):
    g = _gen(seed)
    return torch.randn(B, LEN, C, generator=g) * 2, torch.randn(B, LEN, C, generator=g) * 2


def _masked_logits():
    s, t = _token_logits()
    keep = _token_mask()
    return [s, t], {"mask": keep}, keep


def _ignored_logits():
    s, t = _token_logits(2)
    keep = _token_mask()
    return [s, t], {"target": _labels(keep)}, keep


def _labelled_logits():
    s, t = _token_logits(3)
    keep = _token_mask()
    return [s, t, _labels(keep)], {}, keep


def _labelled_logits_and_mask():
    s, t = _token_logits(4)
    labels_keep = _token_mask()
    mask = torch.ones(B, LEN, dtype=torch.bool)
    mask[3, 0] = mask[1, 2] = False
    return [s, t, _labels(labels_keep)], {"mask": mask}, labels_keep & mask


def _student_only():
    s, _ = _token_logits(6)
    keep = _token_mask()
    return [s, _labels(keep)], {}, keep


def _token_states():
    g = _gen(7)
    s = [torch.randn(B, LEN, D, generator=g) for _ in range(2)]
    t = [torch.randn(B, LEN, D, generator=g) for _ in range(2)]
    return [s, t], {"mask": _token_mask()}, _token_mask()


def _mixed_states():
    g = _gen(8)
    shapes = [(B, D), (B, LEN, D), (B, 3, 4, 4)]
    s = [torch.randn(sh, generator=g) for sh in shapes]
    t = [torch.randn(sh, generator=g) for sh in shapes]
    return [s, t], {}, None


def _feature_maps():
    g = _gen(9)
    s = [torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 4, 4, generator=g)]
    t = [torch.randn(B, 5, 4, 4, generator=g), torch.randn(B, 6, 4, 4, generator=g)]
    return [s, t], {}, None


def _fitnets_tokens():
    g = _gen(10)
    s, t = torch.randn(B, LEN, 3, generator=g), torch.randn(B, LEN, 5, generator=g)
    return [s, t], {"mask": _token_mask()}, _token_mask()


def _fitnets_maps():
    g = _gen(11)
    return [torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 5, 4, 4, generator=g)], {}, None


def _class_logits():
    g = _gen(12)
    s, t = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    return [s, t], {}, None


def _projections(per_layer: slice = slice(None), mask: bool = True):
    """2 layers of query, key, value projections [B, L, H * d] (2 heads; widths 6 and 8), the
    ones ``per_layer`` selects of each layer."""
    g = _gen(14)
    s = [torch.randn(B, LEN, 6, generator=g) for _ in range(6)]
    t = [torch.randn(B, LEN, 8, generator=g) for _ in range(6)]
    s = [x for i in range(0, 6, 3) for x in s[i : i + 3][per_layer]]
    t = [x for i in range(0, 6, 3) for x in t[i : i + 3][per_layer]]
    return [s, t], ({"mask": _token_mask()} if mask else {}), (_token_mask() if mask else None)


def _cls_states():
    g = _gen(15)
    s = [torch.randn(B, LEN, D, generator=g), torch.randn(B, D, generator=g)]
    t = [torch.randn(B, LEN, D, generator=g), torch.randn(B, D, generator=g)]
    return [s, t], {}, None


def _seeded(make: Callable[..., DistillationLoss]) -> Callable[..., DistillationLoss]:
    """Same learned parameters for every reduction of one case."""

    def build(**kwargs):
        torch.manual_seed(0)
        return make(**kwargs)

    return build


PER_SAMPLE = [
    Case("kl_mask", lambda **k: L.KLDivLoss(2.0, **k), _masked_logits),
    Case("kl_ignore_index", lambda **k: L.KLDivLoss(2.0, -100, **k), _ignored_logits),
    Case("kl_classes", lambda **k: L.KLDivLoss(3.0, **k), _class_logits),
    Case("reverse_kl", lambda **k: L.ReverseKLDivLoss(2.0, **k), _masked_logits),
    Case("gjsd", lambda **k: L.GeneralizedJSDLoss(0.3, 2.0, **k), _masked_logits),
    Case("gjsd_reverse", lambda **k: L.GeneralizedJSDLoss(1.0, 2.0, -100, **k), _ignored_logits),
    Case("skew_kl", lambda **k: L.SkewKLDivLoss(0.1, 2.0, **k), _masked_logits),
    Case(
        "skew_reverse_kl", lambda **k: L.SkewReverseKLDivLoss(0.2, 1.0, -100, **k), _ignored_logits
    ),
    Case("tvd", lambda **k: L.TVDLoss(2.0, **k), _masked_logits),
    Case("mse_logits", lambda **k: L.MSELogitsLoss(**k), _masked_logits),
    Case("hinton", lambda **k: L.HintonLoss(0.3, 0.7, 2.0, **k), _labelled_logits),
    Case("hinton_mask", lambda **k: L.HintonLoss(0.3, 0.7, 2.0, **k), _labelled_logits_and_mask),
    Case("dkd", lambda **k: L.DKDLoss(**k), _labelled_logits),
    Case("dkd_mask", lambda **k: L.DKDLoss(**k), _labelled_logits_and_mask),
    Case("cross_entropy", lambda **k: L.CrossEntropyLoss(**k), _student_only),
    Case("mse_hidden_tokens", lambda **k: L.MSEHiddenStatesLoss(True, **k), _token_states),
    Case("mse_hidden_mixed", lambda **k: L.MSEHiddenStatesLoss(**k), _mixed_states),
    Case(
        "mse_hidden_mapped",
        _seeded(lambda **k: L.MSEHiddenStatesLoss(False, True, D, D, 2, **k)),
        _token_states,
    ),
    Case("cosine_tokens", lambda **k: L.CosineHiddenStatesLoss(**k), _token_states),
    Case("cosine_mixed", lambda **k: L.CosineHiddenStatesLoss(**k), _mixed_states),
    Case("attention", lambda **k: L.AttentionLoss(2, **k), _feature_maps),
    Case(
        "fitnets_linear", _seeded(lambda **k: L.FitNetsLoss(3, 5, "linear", **k)), _fitnets_tokens
    ),
    Case("fitnets_conv", _seeded(lambda **k: L.FitNetsLoss(3, 5, "conv", **k)), _fitnets_maps),
    Case(
        "tinybert_attention",
        lambda **k: L.TinyBERTAttentionLoss(2, **k),
        lambda: _projections(slice(0, 2)),
    ),
    Case(
        "minilm_attention",
        lambda **k: L.MiniLMAttentionLoss(2, **k),
        lambda: _projections(slice(0, 2), mask=False),
    ),
    Case(
        "minilm_value",
        lambda **k: L.MiniLMValueRelationLoss(2, **k),
        lambda: _projections(slice(2, 3)),
    ),
    Case("minilmv2", lambda **k: L.MiniLMv2RelationLoss(2, **k), _projections),
    Case("patient_kd", lambda **k: L.PatientKDLoss(**k), _cls_states),
]

BATCH_RELATIONAL = [
    (lambda **k: L.DISTLoss(**k), _class_logits),
    (lambda **k: L.PKTLoss(**k), _class_logits),
    (lambda **k: L.RKDLoss(**k), _class_logits),
]


def _take(x, rows: slice):
    if isinstance(x, list):
        return [_take(v, rows) for v in x]
    return x[rows]


def _students(args: list) -> list[torch.Tensor]:
    return args[0] if isinstance(args[0], list) else [args[0]]


def _with_grad(args: list) -> list:
    first = args[0]
    if isinstance(first, list):
        return [[v.clone().requires_grad_(True) for v in first], *args[1:]]
    return [first.clone().requires_grad_(True), *args[1:]]


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------

DECLARED = {
    # class: (needs_target, reads_teacher, takes_mask, per_sample, has a temperature)
    L.KLDivLoss: (False, True, True, True, True),
    L.ReverseKLDivLoss: (False, True, True, True, True),
    L.GeneralizedJSDLoss: (False, True, True, True, True),
    L.SkewKLDivLoss: (False, True, True, True, True),
    L.SkewReverseKLDivLoss: (False, True, True, True, True),
    L.TVDLoss: (False, True, True, True, True),
    L.FusedLinearJSDLoss: (False, True, True, True, True),
    L.MSELogitsLoss: (False, True, True, True, False),
    L.SparseKLDivLoss: (False, True, True, True, True),
    L.HintonLoss: (True, True, True, True, True),
    L.DKDLoss: (True, True, True, True, True),
    L.DISTLoss: (False, True, True, False, True),
    L.CrossEntropyLoss: (True, False, True, True, False),
    L.MSEHiddenStatesLoss: (False, True, True, True, False),
    L.CosineHiddenStatesLoss: (False, True, True, True, False),
    L.AttentionLoss: (False, True, False, True, False),
    L.FitNetsLoss: (False, True, True, True, False),
    L.PKTLoss: (False, True, False, False, False),
    L.RKDLoss: (False, True, False, False, False),
    L.TinyBERTAttentionLoss: (False, True, True, True, False),
    L.MiniLMAttentionLoss: (False, True, True, True, False),
    L.MiniLMValueRelationLoss: (False, True, True, True, False),
    L.MiniLMv2RelationLoss: (False, True, True, True, False),
    L.PatientKDLoss: (False, True, False, True, False),
}

# the positional arguments a loss cannot be built without
REQUIRED_ARGS = {
    L.FitNetsLoss: (3, 5),
    L.TinyBERTAttentionLoss: (2,),
    L.MiniLMAttentionLoss: (2,),
    L.MiniLMValueRelationLoss: (2,),
    L.MiniLMv2RelationLoss: (2,),
}


def test_every_loss_declares_its_contract():
    assert set(DECLARED) == {getattr(L, name) for name in L.__all__}
    for cls, (needs_target, reads_teacher, takes_mask, per_sample, soft) in DECLARED.items():
        assert issubclass(cls, DistillationLoss), cls.__name__
        got = (cls.needs_target, cls.reads_teacher, cls.takes_mask, cls.per_sample)
        assert got == (needs_target, reads_teacher, takes_mask, per_sample), cls.__name__
        loss = cls(*REQUIRED_ARGS.get(cls, ()))
        assert (loss.temperature is not None) == soft, cls.__name__
        if soft:
            assert isinstance(loss.temperature, float)
        assert loss.reduction == "mean"


def test_forward_signatures_follow_the_family():
    """The Distiller codes against these: target third positional only where needs_target."""

    def keyword_only(cls):
        params = inspect.signature(cls.forward).parameters.values()
        return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def positional(cls):
        params = inspect.signature(cls.forward).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    for cls in DECLARED:
        assert {"mask", "num_items_in_batch"} <= keyword_only(cls), cls.__name__
        if cls is L.CrossEntropyLoss:
            assert positional(cls) == ["self", "logits", "target"]
        elif cls is L.FusedLinearJSDLoss:  # hidden states and lm_head weights, not logits
            assert positional(cls) == [
                "self",
                "student_input",
                "student_weight",
                "teacher_input",
                "teacher_weight",
                "labels",
            ]
        elif cls.needs_target:
            assert positional(cls) == ["self", "student", "teacher", "target"], cls.__name__
        else:
            assert positional(cls) == ["self", "student", "teacher"], cls.__name__
    for cls in (L.KLDivLoss, L.ReverseKLDivLoss, L.GeneralizedJSDLoss, L.MSELogitsLoss):
        assert "target" in keyword_only(cls)


def test_labelled_losses_take_the_target_by_position_or_keyword():
    s, t, y = _labelled_logits()[0]
    for loss in (L.HintonLoss(), L.DKDLoss()):
        assert torch.equal(loss(s, t, y), loss(s, t, target=y))
        with pytest.raises(ValueError, match=f"{type(loss).__name__} needs the ground-truth"):
            loss(s, t)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss needs the ground-truth target"):
        L.CrossEntropyLoss()(s)


# ---------------------------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c.name)
def test_reduction_none_mean_and_sum_agree(case):
    args, kwargs, keep = case.inputs()
    none = case.make(reduction="none")(*args, **kwargs)
    mean = case.make()(*args, **kwargs)
    total = case.make(reduction="sum")(*args, **kwargs)
    expected_shape = keep.shape if keep is not None else (B,)
    assert none.shape == expected_shape
    assert mean.dim() == 0 and total.dim() == 0
    if keep is not None:
        assert torch.equal(none[~keep], torch.zeros_like(none[~keep])), "dropped positions are 0"
        kept = none[keep]
    else:
        kept = none.flatten()
    assert bool((kept != 0).all())
    torch.testing.assert_close(mean, kept.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total, none.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c.name)
def test_num_items_in_batch_accumulates_to_the_full_batch(case):
    args, kwargs, keep = case.inputs()
    full_args = _with_grad(args)
    full = case.make()(*full_args, **kwargs)
    full.backward()

    count = int(keep.sum()) if keep is not None else B
    half_args = _with_grad(args)
    accumulated = torch.zeros(())
    for rows in (slice(0, B // 2), slice(B // 2, B)):
        part_args = [_take(a, rows) for a in half_args]
        part_kwargs = {k: _take(v, rows) for k, v in kwargs.items()}
        part = case.make()(*part_args, **part_kwargs, num_items_in_batch=count)
        part.backward()
        accumulated = accumulated + part.detach()
    torch.testing.assert_close(accumulated, full.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(_students(half_args), _students(full_args), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c.name)
def test_num_items_in_batch_that_is_no_count_is_refused(case):
    args, kwargs, _ = case.inputs()
    for count in (0, -3, 2.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"num_items_in_batch must be a whole number >= 1"):
            case.make()(*args, **kwargs, num_items_in_batch=count)
    with pytest.raises(ValueError, match=r"one-element tensor, got a tensor of shape \(2,\)"):
        case.make()(*args, **kwargs, num_items_in_batch=torch.tensor([4, 4]))


@pytest.mark.parametrize("make, inputs", BATCH_RELATIONAL)
def test_batch_relational_losses_refuse_per_sample_reductions(make, inputs):
    name = type(make()).__name__
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match=rf"{name} compares the whole batch.*'mean'"):
            make(reduction=reduction)
    args, _, _ = inputs()
    with pytest.raises(ValueError, match=rf"{name} compares the samples.*num_items_in_batch=8"):
        make()(*args, num_items_in_batch=8)


@pytest.mark.parametrize("cls", list(DECLARED), ids=lambda c: c.__name__)
def test_unknown_reduction_is_refused(cls):
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
        cls(*REQUIRED_ARGS.get(cls, ()), reduction="batchmean")


@pytest.mark.parametrize(
    "loss, args",
    [
        (L.AttentionLoss(), _feature_maps()[0]),
        (L.PKTLoss(), _class_logits()[0]),
        (L.RKDLoss(), _class_logits()[0]),
    ],
    ids=["attention", "pkt", "rkd"],
)
def test_a_mask_is_refused_where_the_loss_takes_none(loss, args):
    with pytest.raises(ValueError, match=r"takes no token mask \(takes_mask=False\).*drop mask="):
        loss(*args, mask=torch.ones(B, dtype=torch.bool))


def test_hinton_none_with_unlabeled_samples():
    """-1 (unlabeled) keeps the soft term only; "mean" averages each term over its own rows."""
    g = _gen(13)
    s, t = torch.randn(6, C, generator=g, dtype=torch.float64), torch.randn(6, C, generator=g)
    t = t.double()
    y = torch.tensor([2, -1, 0, -100, 5, -1])
    hard = -torch.log_softmax(s, -1)[torch.arange(6), y.clamp(min=0)]
    soft = -(torch.softmax(t / 2, -1) * torch.log_softmax(s / 2, -1)).sum(-1) * 4
    labeled, kept = y >= 0, y != -100
    none = L.HintonLoss(0.3, 0.7, 2.0, reduction="none")(s, t, y)
    expected = torch.where(kept, 0.3 * torch.where(labeled, hard, 0) + 0.7 * soft, 0)
    torch.testing.assert_close(none, expected)
    mean = L.HintonLoss(0.3, 0.7, 2.0)(s, t, y)
    torch.testing.assert_close(mean, 0.3 * hard[labeled].mean() + 0.7 * soft[kept].mean())


# ---------------------------------------------------------------------------------------------
# checks run once
# ---------------------------------------------------------------------------------------------


def test_hyper_parameters_are_checked_in_init_not_per_call(monkeypatch):
    calls = []

    def counting(value):
        calls.append(value)
        return float(value)

    monkeypatch.setattr(KF, "check_temperature", counting)
    s, t, y = _labelled_logits()[0]
    losses = [L.KLDivLoss(2.0), L.ReverseKLDivLoss(2.0), L.GeneralizedJSDLoss(0.5, 2.0)]
    for loss in [*losses, L.HintonLoss(), L.DKDLoss(), L.DISTLoss()]:
        loss(s, t, y) if loss.needs_target else loss(s, t)
    assert calls == [], "a module re-checked its temperature in the functional call"
    KF.kl_div(s, t, 2.0)  # the functional API checks for direct callers
    assert calls == [2.0]
    assert KF.check_temperature is counting  # the public name stays importable


# ---------------------------------------------------------------------------------------------
# the changed losses against hand-written float64 references
# ---------------------------------------------------------------------------------------------


def ref_reverse_kl(s, t, keep, temperature):
    rows = []
    for zs, zt in zip(s.reshape(-1, C), t.reshape(-1, C), strict=True):
        allowed = torch.isfinite(zt)
        log_ps = torch.log_softmax(zs[allowed] / temperature, -1)
        log_pt = torch.log_softmax(zt[allowed] / temperature, -1)
        rows.append((log_ps.exp() * (log_ps - log_pt)).sum() * temperature**2)
    return torch.stack(rows)[keep.flatten()].mean()


def _ce(log_p_target, log_q):
    p = log_p_target.exp()
    return -(p * torch.where(p > 0, log_q, torch.zeros_like(log_q))).sum()


def ref_hinton(s, t, y, keep, alpha, beta, temperature):
    hard, soft = [], []
    for zs, zt, label, k in zip(
        s.reshape(-1, C), t.reshape(-1, C), y.flatten(), keep.flatten(), strict=True
    ):
        if not k:
            continue
        hard.append(-torch.log_softmax(zs, -1)[label])
        log_pt, log_ps = (torch.log_softmax(z / temperature, -1) for z in (zt, zs))
        soft.append(_ce(log_pt, log_ps) * temperature**2)
    return alpha * torch.stack(hard).mean() + beta * torch.stack(soft).mean()


def ref_dkd(s, t, y, keep, alpha, beta, temperature):
    def kl(log_p, log_q):
        p = log_p.exp()
        return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum()

    rows = []
    for zs, zt, g, k in zip(
        s.reshape(-1, C), t.reshape(-1, C), y.flatten(), keep.flatten(), strict=True
    ):
        if not k:
            continue
        ps, pt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
        b_s, b_t = torch.stack([ps[g], 1 - ps[g]]), torch.stack([pt[g], 1 - pt[g]])
        others = torch.arange(C) != g
        nckd = kl(
            torch.log_softmax(zt[others] / temperature, -1),
            torch.log_softmax(zs[others] / temperature, -1),
        )
        rows.append(temperature**2 * (alpha * kl(b_t.log(), b_s.log()) + beta * nckd))
    return torch.stack(rows).mean()


def ref_dist(s, t, keep, beta, gamma, temperature):
    ys = torch.softmax(s.reshape(-1, C)[keep.flatten()] / temperature, -1)
    yt = torch.softmax(t.reshape(-1, C)[keep.flatten()] / temperature, -1)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm())

    inter = 1 - torch.stack([pearson(a, b) for a, b in zip(ys, yt, strict=True)]).mean()
    intra = 1 - torch.stack([pearson(a, b) for a, b in zip(ys.T, yt.T, strict=True)]).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def ref_mse_logits(s, t, keep):
    rows = []
    for zs, zt in zip(s.reshape(-1, C), t.reshape(-1, C), strict=True):
        allowed = torch.isfinite(zs)
        rows.append(((zs[allowed] - zt[allowed]) ** 2).mean())
    return torch.stack(rows)[keep.flatten()].mean()


def _masked_vocab_batch(dtype):
    """Token logits with the vocab masked (-inf) in both models at classes 5, 6 of some tokens,
    in the teacher only at class 4 of one token, labels avoiding masked classes, -100 padding."""
    g = _gen(14)
    s = (torch.randn(B, LEN, C, generator=g) * 2).to(dtype).double()
    t = (torch.randn(B, LEN, C, generator=g) * 2).to(dtype).double()
    keep = _token_mask()
    s[0, :2, 5:] = t[0, :2, 5:] = float("-inf")
    s[2, 1, 6] = t[2, 1, 6] = float("-inf")
    labels = torch.where(keep, torch.randint(0, 4, (B, LEN), generator=g), -100)
    return s, t, labels, keep


CHANGED = {
    "reverse_kl": (
        lambda s, t, y, m: L.ReverseKLDivLoss(2.0)(s, t, mask=m),
        lambda s, t, y, k: ref_reverse_kl(s, t, k, 2.0),
        True,
    ),
    "hinton": (
        lambda s, t, y, m: L.HintonLoss(0.3, 0.7, 2.0)(s, t, y, mask=m),
        lambda s, t, y, k: ref_hinton(s, t, y, k, 0.3, 0.7, 2.0),
        False,
    ),
    "dkd": (
        lambda s, t, y, m: L.DKDLoss(1.0, 8.0, 2.0)(s, t, y, mask=m),
        lambda s, t, y, k: ref_dkd(s, t, y, k, 1.0, 8.0, 2.0),
        False,
    ),
    "dist": (
        lambda s, t, y, m: L.DISTLoss(1.0, 2.0, 2.0)(s, t, mask=m),
        lambda s, t, y, k: ref_dist(s, t, k, 1.0, 2.0, 2.0),
        False,
    ),
    "mse_logits": (
        lambda s, t, y, m: L.MSELogitsLoss()(s, t, mask=m),
        lambda s, t, y, k: ref_mse_logits(s, t, k),
        False,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CHANGED))
def test_changed_losses_match_a_reference_with_masks_masked_classes_and_nan_padding(name, dtype):
    loss_fn, ref_fn, teacher_only_masks = CHANGED[name]
    s, t, labels, keep = _masked_vocab_batch(dtype)
    if teacher_only_masks:
        t[1, 3, 4] = float("-inf")
    ref_s = s.clone().requires_grad_(True)
    expected = ref_fn(ref_s, t, labels, keep)
    expected.backward()

    poisoned = s.clone()
    poisoned[~keep] = float("nan")  # padding: whatever is there must not matter
    student = poisoned.to(dtype).requires_grad_(True)
    teacher = t.clone()
    teacher[~keep] = float("inf")
    value = loss_fn(student, teacher.to(dtype), labels, keep)
    value.backward()

    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    grad_tol = (
        {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    )
    torch.testing.assert_close(student.grad.double(), ref_s.grad, **grad_tol)
    assert torch.equal(student.grad[~keep], torch.zeros_like(student.grad[~keep]))


def test_reverse_kl_support_restriction_has_no_degenerate_minimum():
    """Parking mass on classes the teacher forbids must not lower the loss."""
    t = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]])
    s_good = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    s_parked = torch.tensor([[0.0, 1.0, 50.0, 50.0]])  # nearly all mass on forbidden classes
    loss = L.ReverseKLDivLoss()
    assert loss(s_parked, t).item() == pytest.approx(loss(s_good, t).item(), abs=1e-6)
    assert loss(s_good, t).item() == pytest.approx(0.0, abs=1e-6)
