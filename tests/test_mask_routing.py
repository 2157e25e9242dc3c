"""The token mask reaches the terms it belongs to (issue 9, item 2), labels reach losses with
ignore_index set, and misuses are refused with the fix in the message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, Term
from kdkit.losses import AttentionLoss, KLDivLoss, MSEHiddenStatesLoss


class Tagger(nn.Module):
    """Token states ``[B, L, D]`` at ``layer``; ``[B, C]`` logits from their mean (or ``[B, L,
    C]`` token logits with ``tokens=True``)."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.layer = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)
        self.tokens = tokens

    def forward(self, input_ids, input_mask=None, labels=None):
        if labels is not None:
            raise AssertionError("labels reached the model")
        h = self.layer(self.embed(input_ids))
        return self.head(h if self.tokens else h.mean(1))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    return ids, mask


def _models():
    torch.manual_seed(0)
    return Tagger(), Tagger()


def _mse_terms(**hidden):
    return {
        "kd": Term(KLDivLoss(temperature=2.0)),
        "hidden": Term(MSEHiddenStatesLoss(), student="layer", teacher="layer", **hidden),
    }


def _references(student, teacher, ids, keep):
    s_h, t_h = student.layer(student.embed(ids)), teacher.layer(teacher.embed(ids))
    p_t = F.softmax(teacher(ids) / 2, -1)
    kd = 4 * (p_t * (p_t.log() - F.log_softmax(student(ids) / 2, -1))).sum(-1).mean()
    per_token = ((s_h - t_h) ** 2).mean(-1)
    return kd, per_token[keep].mean(), per_token.mean()


def test_sequence_logits_get_no_mask_token_states_do():
    student, teacher = _models()
    ids, mask = _batch()
    out = Distiller(student, teacher, _mse_terms())(ids, mask=mask.bool())  # raised before
    kd, masked, _ = _references(student, teacher, ids, mask.bool())
    torch.testing.assert_close(out.terms["kd"], kd.detach())
    torch.testing.assert_close(out.terms["hidden"], masked.detach())


def test_term_mask_false_opts_out():
    student, teacher = _models()
    ids, mask = _batch()
    out = Distiller(student, teacher, _mse_terms(mask=False))(ids, mask=mask.bool())
    _, masked, unmasked = _references(student, teacher, ids, mask.bool())
    torch.testing.assert_close(out.terms["hidden"], unmasked.detach())
    assert not torch.isclose(unmasked, masked)


@pytest.mark.parametrize("key", ["attention_mask", "input_mask"])
def test_dict_batch_mask_found_by_name(key):
    student, teacher = _models()
    ids, mask = _batch()

    class Named(Tagger):
        def forward(self, input_ids, **masks):
            return super().forward(input_ids)

    student.__class__ = teacher.__class__ = Named
    out = Distiller(student, teacher, _mse_terms())({"input_ids": ids, key: mask})
    _, masked, unmasked = _references(student, teacher, ids, mask.bool())
    torch.testing.assert_close(out.terms["hidden"], masked.detach())
    # overridable: no lookup
    off = Distiller(student, teacher, _mse_terms(), mask_keys=())({"input_ids": ids, key: mask})
    torch.testing.assert_close(off.terms["hidden"], unmasked.detach())


def test_ignore_index_gets_the_labels_without_term_target():
    torch.manual_seed(0)
    student, teacher = Tagger(tokens=True), Tagger(tokens=True)
    ids, mask = _batch()
    labels = torch.where(mask.bool(), ids % 5, torch.full_like(ids, -100))
    distiller = Distiller(student, teacher, [Term(KLDivLoss(ignore_index=-100))])
    value = distiller(ids, labels).loss
    s, t = student(ids), teacher(ids)
    p_t = F.softmax(t, -1)
    per_token = (p_t * (p_t.log() - F.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(value, per_token[mask.bool()].mean())
    with pytest.raises(ValueError, match=r"ignore_index=-100.*target is None"):
        distiller(ids)


def test_dict_batch_labels_do_not_reach_the_teacher():
    student, teacher = _models()
    ids, _ = _batch()
    teacher_only = Distiller(student, teacher, [Term(KLDivLoss())])
    # the student is run by the caller (hooks API); the teacher gets the batch without labels
    out = teacher_only.on_after_compute_loss(
        {"input_ids": ids, "labels": ids[:, 0]}, student(ids), torch.tensor(0.0)
    )
    assert out > 0


def test_spatial_attention_loss_on_attention_probabilities_is_refused():
    student, teacher = _models()
    for address in ("output.attentions[-1]", "encoder.layer.0.attention.self[1]"):
        with pytest.raises(ValueError, match=r"AttentionLoss.*MiniLMAttentionLoss"):
            Distiller(student, teacher, [Term(AttentionLoss(), student=address, teacher=address)])


def test_from_config_without_context_names_the_context():
    student, teacher = _models()
    with pytest.raises(ValueError, match=r"student\.feature_layers.*context=\{'student'"):
        Distiller.from_config(student, teacher, "mse_hidden")
    distiller = Distiller.from_config(
        student,
        teacher,
        "mse_hidden",
        context={
            "student": {"feature_layers": ["layer"]},
            "teacher": {"feature_layers": ["layer"]},
        },
        example_input=_batch()[0],
    )
    assert distiller.terms["hidden"].student == ["layer"]


@pytest.mark.parametrize("tokens", [False, True], ids=["states", "token_logits"])
def test_a_mask_that_fits_no_token_tensor_is_refused_not_dropped(tokens):
    torch.manual_seed(0)
    student, teacher = Tagger(tokens), Tagger(tokens)
    ids, mask = _batch()
    terms = {"kd": Term(KLDivLoss(2.0))} if tokens else _mse_terms()
    distiller = Distiller(student, teacher, terms)
    for wrong in (mask[:, :5], mask.T):
        with pytest.raises(ValueError, match=r"mask has shape .* Term\(\.\.\., mask=False\)"):
            distiller(ids, mask=wrong)
    opted_out = {name: Term(t.loss, t.weight, student=t.student, teacher=t.teacher, mask=False)
                 for name, t in terms.items()}  # fmt: skip
    plain = Distiller(student, teacher, opted_out)
    torch.testing.assert_close(plain(ids, mask=mask[:, :5]).loss, plain(ids).loss)
