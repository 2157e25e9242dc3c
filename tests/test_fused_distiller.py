"""FusedLinearJSDLoss through the Distiller with Hugging Face causal LMs (issue 10, item 1): the
term reads both models' lm_head input and weight, the models compute no logits, and value and
gradients equal the logit losses on the full logits (masks, ignored labels, padded vocab)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kdkit import Distiller, Term  # noqa: E402
from kdkit import losses as L  # noqa: E402
from kdkit.models import create_model  # noqa: E402
from kdkit.vocab import VocabMap  # noqa: E402

V, B, LEN = 40, 3, 7
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _gpt2(seed: int, n_embd: int, n_layer: int, vocab: int = V) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=2, **NO_DROPOUT)
    return create_model("hf:gpt2", vocab, head="causal_lm", config=config)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, LEN), generator=g)
    mask = torch.ones(B, LEN, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # shifted once
    labels[mask == 0] = -100
    labels[2, :2] = -100  # e.g. a prompt
    return {"input_ids": ids, "attention_mask": mask}, labels


def _step(distiller: Distiller, inputs, labels, **kwargs):
    student = distiller.student
    student.zero_grad(set_to_none=True)
    out = distiller(inputs, labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


def _reference_loss(beta: float, temperature: float) -> L.DistillationLoss:
    if beta == 0:
        return L.KLDivLoss(temperature, -100)
    if beta == 1:
        return L.ReverseKLDivLoss(temperature, -100)
    return L.GeneralizedJSDLoss(beta, temperature, -100)


def _assert_same(got, expected):
    (out_f, grads_f), (out_r, grads_r) = got, expected
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() and len(grads_f) >= 2
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_term_equals_the_logit_loss_on_full_logits(beta):
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 2)  # hidden sizes differ
    inputs, labels = _batch()
    fused = Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(beta, 2.0, -100, 4))])
    plain = Distiller(student, teacher, [Term(_reference_loss(beta, 2.0))])
    _assert_same(_step(fused, inputs, labels), _step(plain, inputs, labels))


def test_models_compute_no_logits_in_a_fused_step():
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 1)
    seen = []
    for model in (student, teacher):
        model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    distiller = Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(0.5))])
    inputs, labels = _batch()
    out = distiller(inputs, labels)
    assert seen == [(B, 0, V), (B, 0, V)]  # teacher, then student: no [B, L, V] tensor
    assert out.student_output.logits.shape == (B, 0, V)
    assert out.teacher_logits[0].shape == (B, 0, V)
    assert out.loss > 0
    seen.clear()
    assert student(**inputs).logits.shape == (B, LEN, V)  # no hook left on the models
    assert seen == [(B, LEN, V)]
    with torch.no_grad():  # the teacher's predictions (e.g. for top-1 agreement) stay whole
        torch.testing.assert_close(
            distiller.compute_teacher_logits(inputs), teacher(**inputs).logits
        )


@pytest.mark.parametrize("inside", [False, True])
def test_cross_entropy_beside_keeps_the_student_head_and_inside_elides_it(inside):
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 1)
    seen = {}
    for side, model in (("student", student), ("teacher", teacher)):
        model.lm_head.register_forward_hook(
            lambda m, i, o, side=side: seen.__setitem__(side, tuple(o.shape))
        )
    ce = Term(L.CrossEntropyLoss(), 0.5, teacher=None, target=True)
    inputs, labels = _batch()
    if inside:  # ce_weight: the student's cross-entropy from the fused term's chunks
        terms = [Term(L.FusedLinearJSDLoss(0.5, 2.0, -100, 4, ce_weight=0.5))]
    else:
        terms = [Term(L.FusedLinearJSDLoss(0.5, 2.0, -100, 4)), ce]
    got = _step(Distiller(student, teacher, terms), inputs, labels)
    student_logits = (B, 0, V) if inside else (B, LEN, V)
    assert seen == {"student": student_logits, "teacher": (B, 0, V)}
    plain = Distiller(student, teacher, [Term(L.GeneralizedJSDLoss(0.5, 2.0, -100)), ce])
    _assert_same(got, _step(plain, inputs, labels))


def test_labels_in_the_dict_batch_are_not_given_to_the_student():
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 1)
    distiller = Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(0.5, ignore_index=-100))])
    inputs, labels = _batch()
    with_labels = distiller({**inputs, "labels": labels}, labels).loss
    torch.testing.assert_close(with_labels, distiller(inputs, labels).loss)


def test_ignore_index_without_labels_is_refused_and_num_items_in_batch_scales():
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 1)
    distiller = Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(0.0, 1.0, -100))])
    inputs, labels = _batch()
    with pytest.raises(ValueError, match="ignore_index=-100"):
        distiller(inputs)
    kept = int(((labels != -100) & (inputs["attention_mask"] == 1)).sum())
    mean = distiller(inputs, labels).loss
    scaled = distiller(inputs, labels, num_items_in_batch=4 * kept).loss
    torch.testing.assert_close(scaled, mean / 4)


def test_padded_student_head_with_a_vocab_map():
    student, teacher = _gpt2(0, 16, 1, vocab=48), _gpt2(1, 24, 1)
    inputs, labels = _batch()
    vocab_map = VocabMap.padded(V)
    fused = Distiller(
        student, teacher, [Term(L.FusedLinearJSDLoss(0.5, 1.0, -100, 5))], vocab_map=vocab_map
    )
    plain = Distiller(
        student, teacher, [Term(L.GeneralizedJSDLoss(0.5, 1.0, -100))], vocab_map=vocab_map
    )
    _assert_same(_step(fused, inputs, labels), _step(plain, inputs, labels))


def test_other_head_path_and_tensor_inputs():
    """A model that is not a Hugging Face one: its head called ``proj``, a tensor batch."""

    class TinyLM(torch.nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(V, hidden)
            self.proj = torch.nn.Linear(hidden, V, bias=False)

        def forward(self, ids):
            return self.proj(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    student, teacher = TinyLM(8), TinyLM(12)
    ids, labels = _batch()[0]["input_ids"], _batch()[1]
    term = Term(L.FusedLinearJSDLoss(0.5, 1.0, -100), student="proj:input", teacher="proj:input")
    fused = Distiller(student, teacher, [term])
    plain = Distiller(student, teacher, [Term(L.GeneralizedJSDLoss(0.5, 1.0, -100))])
    _assert_same(_step(fused, ids, labels), _step(plain, ids, labels))


def test_teacher_under_autocast_hands_its_head_bfloat16_hidden_states():
    class HalfHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(V, 12)
            self.lm_head = torch.nn.Linear(12, V, bias=False)

        def forward(self, input_ids, attention_mask=None):
            return self.lm_head(torch.tanh(self.embed(input_ids)).to(torch.bfloat16))

    torch.manual_seed(0)
    student, teacher = _gpt2(0, 16, 1), HalfHidden()
    inputs, labels = _batch()
    options = dict(autocast_dtype=torch.bfloat16)
    fused = Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(0.5, 1.0, -100))], **options)
    plain = Distiller(student, teacher, [Term(L.GeneralizedJSDLoss(0.5, 1.0, -100))], **options)
    torch.testing.assert_close(
        fused(inputs, labels).loss, plain(inputs, labels).loss, rtol=2e-2, atol=1e-4
    )


def test_what_a_fused_term_cannot_work_with_is_refused_at_construction():
    student, teacher = _gpt2(0, 16, 1), _gpt2(1, 24, 1)
    fused = Term(L.FusedLinearJSDLoss(0.5))
    with pytest.raises(ValueError, match="'kl_div' reads the teacher's logits"):
        Distiller(student, teacher, [fused, Term(L.KLDivLoss())])
    with pytest.raises(ValueError, match="needs? the teacher module"):
        Distiller(student, None, [fused])
    with pytest.raises(ValueError, match="module.path:input"):
        Distiller(
            student,
            teacher,
            [Term(L.FusedLinearJSDLoss(), student="lm_head", teacher="lm_head")],
        )
    with pytest.raises(ValueError, match="no 2-D weight"):
        head = "transformer:input"
        Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(), student=head, teacher=head)])
    with pytest.raises(ValueError, match="takes no adapter"):
        Distiller(student, teacher, [Term(L.FusedLinearJSDLoss(), adapter="linear")])
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        Distiller(student, teacher, [fused])
    teacher.config.final_logit_softcapping = None
    student.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    with pytest.raises(ValueError, match="has a bias"):
        Distiller(student, teacher, [fused])
