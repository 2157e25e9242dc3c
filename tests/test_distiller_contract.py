"""The Distiller reads each loss's declared contract (kdkit.contract), never its signature."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from conftest import mlp
from torch import Tensor, nn

from kdkit import Distiller, Term
from kdkit.contract import DistillationLoss
from kdkit.losses import KLDivLoss

SRC = Path(__file__).resolve().parents[1] / "src" / "kdkit"


class Recording(DistillationLoss):
    """A loss that records how it was called; its declarations are set per test."""

    def __init__(
        self, *, needs_target=False, reads_teacher=True, takes_mask=False, per_sample=True
    ):
        self.needs_target = needs_target
        self.reads_teacher = reads_teacher
        self.takes_mask = takes_mask
        self.per_sample = per_sample
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    def forward(self, *args, **kwargs) -> Tensor:
        self.calls.append((len(args), dict(kwargs)))
        return args[0].float().pow(2).mean()


@pytest.fixture
def x():
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def models():
    torch.manual_seed(0)
    return mlp(16, depth=1).eval(), mlp(32).eval()


def test_distiller_modules_never_inspect_a_signature():
    for name in ("distiller.py", "term.py", "teachers.py", "hooks.py"):
        path = SRC / name
        assert path.is_file(), f"{name} is missing"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "inspect" not in names, f"{name} imports inspect"


def test_declarations_decide_what_a_loss_is_given(models, x):
    student, teacher = models
    y, mask = torch.arange(4), torch.ones(4, dtype=torch.bool)
    labeled = Recording(needs_target=True, takes_mask=True)
    no_teacher = Recording(needs_target=True, reads_teacher=False)
    relational = Recording(per_sample=False)
    terms = {"labeled": Term(labeled), "ce": Term(no_teacher), "rel": Term(relational)}
    distiller = Distiller(student, teacher, terms)
    distiller(x, y, mask=mask, num_items_in_batch=10)
    # target by keyword; mask only where declared; num_items_in_batch to per-sample terms only
    assert labeled.calls == [(2, {"target": y, "mask": mask, "num_items_in_batch": 10})]
    # a loss that reads no teacher gets (student, target), even with Term's default teacher
    assert no_teacher.calls == [(2, {"num_items_in_batch": 10})]
    assert relational.calls == [(2, {})]


def test_a_student_only_term_does_not_run_the_teacher(models, x):
    student, teacher = models
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    loss = Recording(needs_target=True, reads_teacher=False)
    Distiller(student, teacher, [Term(loss)])(x, torch.arange(4))
    assert calls == []


def test_num_items_in_batch_replaces_the_mean_denominator():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 6), nn.Linear(4, 6)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    class TokenKL(DistillationLoss):
        takes_mask = True

        def forward(self, s, t, *, target=None, mask=None, num_items_in_batch=None):
            return self.reduce(_token_kl(s, t), mask, num_items_in_batch)

    distiller = Distiller(student, teacher, [Term(TokenKL())])
    per_token = _token_kl(student(x), teacher(x))
    expected = (per_token * mask).sum() / 20
    assert torch.allclose(distiller(x, mask=mask, num_items_in_batch=20).loss, expected)
    assert torch.allclose(distiller(x, mask=mask).loss, (per_token * mask).sum() / 8)


def _token_kl(s: Tensor, t: Tensor) -> Tensor:
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_num_items_in_batch_with_a_wrapped_callable_is_refused(models, x):
    student, teacher = models
    distiller = Distiller(student, teacher, {"ce": Term(nn.CrossEntropyLoss(), teacher=None)})
    with pytest.raises(ValueError, match=r"'ce'.*CrossEntropyLoss.*num_items_in_batch.*"):
        distiller(x, torch.arange(4), num_items_in_batch=8)


def test_plain_functions_get_the_contract_their_term_declares(models, x):
    student, teacher = models
    seen = {}

    def soft(s, t):
        seen["soft"] = True
        return (s - t).pow(2).mean()

    def hard(s, y):
        seen["hard"] = y
        return nn.functional.cross_entropy(s, y)

    def masked(s, t, *, mask):
        seen["mask"] = mask
        return (s - t).pow(2)[mask].mean()

    y, mask = torch.arange(4), torch.tensor([True, True, False, True])
    distiller = Distiller(
        student,
        teacher,
        {
            "soft": Term(soft),
            "hard": Term(hard, teacher=None, target=True),
            "masked": Term(masked, mask=True),
        },
    )
    out = distiller(x, y, mask=mask)
    s, t = student(x), teacher(x)
    assert seen["soft"] and torch.equal(seen["hard"], y) and torch.equal(seen["mask"], mask)
    assert torch.allclose(out.terms["hard"], nn.functional.cross_entropy(s, y))
    assert torch.allclose(out.terms["masked"], (s - t).pow(2)[mask].mean())
    # without mask=True a callable is never handed the mask
    plain = Distiller(student, teacher, {"soft": Term(soft)})
    assert torch.allclose(plain(x, mask=mask).loss, (s - t).pow(2).mean())


def test_mask_true_on_a_loss_that_takes_none_is_refused(models):
    student, teacher = models
    with pytest.raises(ValueError, match=r"term 'recording'.*mask=True.*takes_mask=False"):
        Distiller(student, teacher, [Term(Recording(), mask=True)])


def test_a_loss_that_needs_the_teacher_in_a_term_without_one_is_refused(models):
    student, teacher = models
    with pytest.raises(ValueError, match=r"term 'recording'.*teacher=None.*reads the teacher"):
        Distiller(student, teacher, [Term(Recording(), teacher=None)])


def test_mask_false_opts_a_term_out(models, x):
    student, teacher = models
    loss = Recording(takes_mask=True)
    Distiller(student, teacher, [Term(loss, mask=False)])(x, mask=torch.ones(4, dtype=bool))
    assert loss.calls == [(2, {})]


def test_all_weights_zero_is_refused(models):
    student, teacher = models
    with pytest.raises(ValueError, match=r"every term has weight 0.*\['kd', 'ce'\].*zero loss"):
        Distiller(
            student,
            teacher,
            {
                "kd": Term(KLDivLoss(), weight=0),
                "ce": Term(nn.CrossEntropyLoss(), weight=0.0, teacher=None, target=True),
            },
        )
    Distiller(student, teacher, {"kd": Term(KLDivLoss(), weight=0), "x": Term(KLDivLoss())})


# ---------------------------------------------------------------------- one name per thing
def test_selector_keywords_have_one_name_each_and_the_old_ones_warn(models, x):
    student, teacher = models

    class Pair(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return x.sum(), self.inner(x)

    plain = Distiller(student, teacher, [Term(KLDivLoss(2.0))])
    new = Distiller(Pair(student), Pair(teacher), [Term(KLDivLoss(2.0))], logits_selector=1)
    assert torch.allclose(new(x).loss, plain(x).loss)
    only_teacher = Distiller(
        student, Pair(teacher), [Term(KLDivLoss(2.0))], teacher_logits_selector=1
    )
    assert torch.allclose(only_teacher(x).loss, plain(x).loss)
    with pytest.warns(DeprecationWarning, match=r"logits= is deprecated.*logits_selector="):
        old = Distiller(Pair(student), Pair(teacher), [Term(KLDivLoss(2.0))], logits=1)
    assert old.logits_selector == 1 and torch.allclose(old(x).loss, plain(x).loss)
    with pytest.warns(DeprecationWarning, match=r"teacher_logits= is deprecated"):
        old = Distiller(student, Pair(teacher), [Term(KLDivLoss(2.0))], teacher_logits=1)
    assert old.teacher_logits_selector == 1
    with pytest.raises(TypeError, match=r"both logits= and logits_selector="):
        Distiller(student, teacher, [Term(KLDivLoss())], logits=0, logits_selector=0)


def test_teacher_logits_method_is_renamed_and_the_old_name_warns(models, x):
    student, teacher = models
    other = mlp(8).eval()
    distiller = Distiller(student, [teacher, other], [Term(KLDivLoss())], teacher_weights=[3, 1])
    p = 0.75 * torch.softmax(teacher(x), -1) + 0.25 * torch.softmax(other(x), -1)
    new = distiller.compute_teacher_logits(x)
    assert torch.allclose(torch.softmax(new, -1), p, atol=1e-6)
    with pytest.warns(DeprecationWarning, match=r"teacher_logits\(\) is deprecated"):
        old = distiller.teacher_logits(x)
    assert torch.equal(old, new)


def test_selector_is_defined_once():
    definitions = [
        p.relative_to(SRC)
        for p in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assign)
        and any(
            isinstance(t, ast.Name) and t.id in ("Selector", "ADAPTER_KINDS") for t in node.targets
        )
    ]
    assert sorted(map(str, definitions)) == ["adapters.py", "capture.py"]


# ---------------------------------------------------------------------- the teacher side
def test_a_custom_teacher_source_feeds_the_terms(models, x):
    from kdkit.teachers import TeacherOutputs, TeacherSource

    student, teacher = models
    seen = []

    class Fixed(TeacherSource):
        def outputs(self, inputs, *, index, epoch):
            seen.append((index, epoch))
            return TeacherOutputs([teacher(inputs)], [{}])

    online = Distiller(student, teacher, [Term(KLDivLoss(2.0))])
    custom = Distiller(student, Fixed(), [Term(KLDivLoss(2.0))])
    assert torch.allclose(custom(x, index=torch.arange(4)).loss, online(x).loss)
    custom.on_epoch_end()
    custom(x)
    assert seen[0][1] == 0 and seen[1] == (None, 1)


def test_hooks_api_passes_num_items_in_batch(models, x):
    student, teacher = models
    loss = Recording()
    distiller = Distiller(student, teacher, [Term(loss)])
    distiller.on_train_begin()
    out = student(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.on_after_compute_loss(x, out, out.sum() * 0, num_items_in_batch=7)
    assert loss.calls[-1] == (2, {"num_items_in_batch": 7})
    distiller.close()


@pytest.mark.parametrize("loss", ["kl", None])
def test_a_loss_that_is_not_callable_is_refused_when_the_distiller_is_built(models, loss):
    student, teacher = models
    with pytest.raises(TypeError, match=r"term 'kd' has loss .* not callable.*KLDivLoss"):
        Distiller(student, teacher, {"kd": Term(loss)})
