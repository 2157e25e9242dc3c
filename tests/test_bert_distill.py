"""Issue 9's friction test: logits KD on [B, C] + masked hidden-state MSE via
``output.hidden_states[...]`` + attention terms via ``...attention.self`` projections and
``output.attentions``, in one Distiller on a Hugging Face BERT, with a mask; every term's value
equals a hand-written reference computed from the models' outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit import Distiller, Term, map_layers
from kdkit.losses import KLDivLoss, MiniLMAttentionLoss, MSEHiddenStatesLoss, TinyBERTAttentionLoss

transformers = pytest.importorskip("transformers")

HEADS, T = 4, 2.0


def _bert(layers: int, *, attn: str = "eager") -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=64,
        vocab_size=50,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def models():
    torch.manual_seed(0)
    return _bert(2), _bert(4)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _scores(model, layer, hidden, heads=HEADS):
    attn = model.bert.encoder.layer[layer].attention.self
    b, length, d = hidden.shape
    q = attn.query(hidden).view(b, length, heads, d // heads).transpose(1, 2)
    k = attn.key(hidden).view(b, length, heads, d // heads).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(d // heads)


def _terms():
    pairs = map_layers("output.hidden_states[{i}]", "output.hidden_states[{i}]", 2, 4)
    s_qk = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "key")]
    t_qk = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (1, 3) for n in ("query", "key")]
    return {
        "kd": Term(KLDivLoss(temperature=T)),
        "hidden": Term(
            MSEHiddenStatesLoss(), student=[s for s, _ in pairs], teacher=[t for _, t in pairs]
        ),
        "scores": Term(TinyBERTAttentionLoss(HEADS), student=s_qk, teacher=t_qk),
        "attention": Term(
            MiniLMAttentionLoss(HEADS),
            student="output.attentions[-1]",
            teacher="output.attentions[-1]",
        ),
    }


def test_map_layers_gives_hugging_face_hidden_state_indices():
    pairs = map_layers("output.hidden_states[{i}]", "output.hidden_states[{i}]", 2, 4)
    # layer i's output is hidden_states[i + 1]: student layers 0, 1 <- teacher layers 1, 3
    assert pairs == [
        ("output.hidden_states[1]", "output.hidden_states[2]"),
        ("output.hidden_states[2]", "output.hidden_states[4]"),
    ]


@pytest.mark.parametrize("mask_given", [True, False])
def test_bert_terms_equal_hand_written_references(models, mask_given):
    student, teacher = models
    distiller = Distiller(student, teacher, _terms())
    batch = _batch()
    keep = batch["attention_mask"].bool()
    out = distiller(batch, mask=keep if mask_given else None)  # no mask: found by name

    with torch.no_grad():
        s = student(**batch, output_hidden_states=True, output_attentions=True)
        t = teacher(**batch, output_hidden_states=True, output_attentions=True)
    p_t = F.softmax(t.logits / T, -1)
    kd = T**2 * (p_t * (p_t.log() - F.log_softmax(s.logits / T, -1))).sum(-1).mean()
    hidden = torch.stack(
        [
            ((s.hidden_states[i] - t.hidden_states[j]) ** 2).mean(-1)[keep].mean()
            for i, j in ((1, 2), (2, 4))
        ]
    ).mean()
    pair = keep[:, None, :, None] & keep[:, None, None, :]  # kept query and key
    scores = []
    for i, j in ((0, 1), (1, 3)):
        d2 = (
            _scores(student, i, s.hidden_states[i]) - _scores(teacher, j, t.hidden_states[j])
        ) ** 2
        per_query = (d2 * pair).sum((1, 3)) / (HEADS * pair.sum((1, 3)))  # heads, kept keys
        scores.append(per_query[keep].mean())
    a_s, a_t = s.attentions[-1], t.attentions[-1]
    kl = a_t * (a_t.clamp_min(1e-30).log() - a_s.clamp_min(1e-30).log())
    kl = (kl * keep[:, None, None, :]).sum(-1).mean(1)  # [B, L]: sum over kept keys, mean heads
    attention = kl[keep].mean()

    expected = {
        "kd": kd,
        "hidden": hidden,
        "scores": torch.stack(scores).mean(),
        "attention": attention,
    }
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert all(v > 0 for v in out.terms.values())
    torch.testing.assert_close(out.loss.detach(), sum(expected.values()), rtol=1e-4, atol=1e-6)


def test_attention_item_of_the_self_attention_module(models):
    student, teacher = models
    term = Term(
        MiniLMAttentionLoss(HEADS),
        student="bert.encoder.layer.1.attention.self[1]",
        teacher="bert.encoder.layer.3.attention.self[1]",
    )
    via_item = Distiller(student, teacher, [term])(_batch()).loss
    via_output = Distiller(
        student,
        teacher,
        [
            Term(
                MiniLMAttentionLoss(HEADS),
                student="output.attentions[1]",
                teacher="output.attentions[3]",
            )
        ],
    )(_batch()).loss
    torch.testing.assert_close(via_item, via_output)


def test_reading_attentions_of_sdpa_model_is_refused_with_the_reason():
    torch.manual_seed(0)
    student, teacher = _bert(2, attn="sdpa"), _bert(4)
    term = Term(
        MiniLMAttentionLoss(HEADS), student="output.attentions[-1]", teacher="output.attentions[-1]"
    )
    with pytest.raises(ValueError, match=r"'sdpa'.*no attention probabilities.*eager"):
        Distiller(student, teacher, [term])
