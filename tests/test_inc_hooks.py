"""INC 2.x parity of the hooks API (issue 9, item 6) and learned parts that never idle silently
(item 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, Term
from kdkit.losses import KLDivLoss, MSEHiddenStatesLoss


class Keywords(nn.Module):
    """A model called with Hugging Face's names only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h = self.body(self.embed(input_ids) + token_type_ids[..., None])
        return self.head((h * attention_mask[..., None]).mean(1))


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (4, 5), generator=g)
    return {
        "input_ids": ids,
        "segment_ids": torch.zeros_like(ids),
        "input_mask": torch.ones_like(ids),
    }


def _hf(batch):
    return {
        "input_ids": batch["input_ids"],
        "token_type_ids": batch["segment_ids"],
        "attention_mask": batch["input_mask"],
    }


def test_all_inc_callbacks_and_loss_weights():
    torch.manual_seed(0)
    student, teacher = Keywords(), Keywords()
    distiller = Distiller(
        student,
        teacher,
        [Term(KLDivLoss(temperature=2.0))],
        teacher_inputs={"token_type_ids": "segment_ids", "attention_mask": "input_mask"},
        loss_weights=[0.25, 2.0],
    )
    batch = _batch()
    distiller.on_train_begin()
    distiller.on_epoch_begin(3)
    assert distiller.epoch == 3
    distiller.on_step_begin(0)
    output = student(**_hf(batch))
    student_loss = torch.tensor(1.5)
    loss = distiller.on_after_compute_loss(batch, output, student_loss)  # teacher gets HF names
    p_t = F.softmax(teacher(**_hf(batch)) / 2, -1)
    kd = 4 * (p_t * (p_t.log() - F.log_softmax(output / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, 0.25 * 1.5 + 2.0 * kd)
    distiller.on_before_optimizer_step()
    distiller.on_after_optimizer_step()
    distiller.on_step_end()
    distiller.on_epoch_end()
    assert distiller.epoch == 4
    distiller.on_train_end()
    assert distiller._persistent_capture is None


def test_teacher_inputs_naming_a_missing_key_is_refused():
    distiller = Distiller(Keywords(), Keywords(), [Term(KLDivLoss())], teacher_inputs={"x": "nope"})
    with pytest.raises(
        ValueError, match=r"teacher_inputs maps the teacher's 'x' to batch key 'nope'"
    ):
        distiller.teacher_outputs(_batch())


@pytest.mark.parametrize("loss_weights", [[1.0], [1.0, -1.0], [float("nan"), 1.0]])
def test_bad_loss_weights_are_refused(loss_weights):
    with pytest.raises(ValueError, match=r"loss_weights=.*\[student_weight, distill_weight\]"):
        Distiller(Keywords(), Keywords(), [Term(KLDivLoss())], loss_weights=loss_weights)


def _mapped_distiller():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    teacher = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    hidden = MSEHiddenStatesLoss(
        need_mapping=True, student_hidden_state_dim=3, teacher_hidden_state_dim=5
    )
    return student, Distiller(
        student, teacher, {"kd": Term(KLDivLoss()), "h": Term(hidden, student="0", teacher="0")}
    )


def _train(distiller, student, params, steps=2):
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 4)
    distiller.on_train_begin()
    for _ in range(steps):
        out = student(x)
        loss = distiller.on_after_compute_loss(x, out, out.pow(2).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        distiller.on_step_end()
    distiller.on_train_end()


def test_extra_parameters_are_the_loss_mapping():
    student, distiller = _mapped_distiller()
    extra = distiller.extra_parameters()
    assert [id(p) for p in extra] == [id(p) for p in distiller.losses.parameters()]
    assert len(extra) == 2  # the mapping's weight and bias
    assert not {id(p) for p in extra} & {id(p) for p in student.parameters()}


def test_idle_learned_parts_warn_once():
    student, distiller = _mapped_distiller()
    with pytest.warns(UserWarning, match=r"losses.*extra_parameters\(\)") as record:
        _train(distiller, student, student.parameters(), steps=3)
    assert sum("extra_parameters" in str(w.message) for w in record) == 1


def test_trained_learned_parts_do_not_warn():
    student, distiller = _mapped_distiller()
    before = [p.detach().clone() for p in distiller.extra_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(distiller, student, distiller.parameters())
    assert not all(
        torch.equal(a, b) for a, b in zip(before, distiller.extra_parameters(), strict=True)
    )
