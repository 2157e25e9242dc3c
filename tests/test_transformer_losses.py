"""Transformer losses (TinyBERT, MiniLM, MiniLMv2, Patient-KD) and kdkit.attention.

* each loss against a loop reference in float64 written from the paper's formula, value and
  gradient, with a [B, L] attention mask (padded keys leave the distributions, padded queries
  the mean), and one hand-computed value;
* kdkit.attention's distribution from captured query/key projections equals a Hugging Face
  BertModel's own eager attention probabilities, and is the same under sdpa attention;
* errors: head counts, sdpa's missing probabilities, wrong shapes, bad hyper-parameters.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdkit.functional as KF
from kdkit import Distiller, FeatureCapture, Term
from kdkit import losses as L
from kdkit.attention import attention_probs, attention_scores, relation_log_probs, split_heads

transformers = pytest.importorskip("transformers")

B, LEN = 3, 5
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _projections(width: int, count: int, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(B, LEN, width, generator=g, dtype=torch.float64) for _ in range(count)]


def _grad(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_(True) for t in tensors]


def _head(x: torch.Tensor, heads: int, h: int) -> torch.Tensor:
    d = x.shape[-1] // heads
    return x[..., h * d : (h + 1) * d]


def _kept(keep: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The mask of projections ``x`` [B, L, W]: all kept when None."""
    return torch.ones(x.shape[:2], dtype=torch.bool) if keep is None else keep


# ---------------------------------------------------------------------------------------------
# loop references (float64), straight from the papers
# ---------------------------------------------------------------------------------------------


def ref_score_rows(q, k, heads, b, i, keep):
    """Per head, the scores of query i over the kept keys: q_i . k_j / sqrt(d_h)."""
    rows = []
    for h in range(heads):
        qh, kh = _head(q, heads, h), _head(k, heads, h)
        d = qh.shape[-1]
        keys = [j for j in range(keep.shape[1]) if keep[b, j]]
        rows.append(torch.stack([torch.dot(qh[b, i], kh[b, j]) / math.sqrt(d) for j in keys]))
    return rows


def ref_tinybert(student, teacher, heads, keep=None):
    keep = _kept(keep, student[0])
    layers = []
    for (qs, ks), (qt, kt) in zip(
        zip(student[::2], student[1::2], strict=True),
        zip(teacher[::2], teacher[1::2], strict=True),
        strict=True,
    ):
        per_query = []
        for b, i in keep.nonzero().tolist():
            s = ref_score_rows(qs, ks, heads, b, i, keep)
            t = ref_score_rows(qt, kt, heads, b, i, keep)
            squared = [((sh - th) ** 2).mean() for sh, th in zip(s, t, strict=True)]
            per_query.append(torch.stack(squared).mean())
        layers.append(torch.stack(per_query).mean())
    return torch.stack(layers).mean()


def _kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum()


def ref_kl_layer(s_pairs, t_pairs, heads_s, heads_t, keep):
    """Mean over kept queries of the mean over heads of KL(teacher row || student row)."""
    per_query = []
    for b, i in keep.nonzero().tolist():
        s = ref_score_rows(*s_pairs, heads_s, b, i, keep)
        t = ref_score_rows(*t_pairs, heads_t, b, i, keep)
        kls = [
            _kl(torch.log_softmax(th, 0), torch.log_softmax(sh, 0))
            for sh, th in zip(s, t, strict=True)
        ]
        per_query.append(torch.stack(kls).mean())
    return torch.stack(per_query).mean()


def ref_minilm_attention(student, teacher, heads, keep=None):
    keep = _kept(keep, student[0])
    layers = [
        ref_kl_layer((qs, ks), (qt, kt), heads, heads, keep)
        for qs, ks, qt, kt in zip(
            student[::2], student[1::2], teacher[::2], teacher[1::2], strict=True
        )
    ]
    return torch.stack(layers).mean()


def ref_value_relation(student, teacher, heads, keep=None):
    keep = _kept(keep, student[0])
    layers = [
        ref_kl_layer((v, v), (w, w), heads, heads, keep)
        for v, w in zip(student, teacher, strict=True)
    ]
    return torch.stack(layers).mean()


def ref_minilmv2(student, teacher, relation_heads, count, keep=None):
    keep = _kept(keep, student[0])
    total = 0.0
    for r in range(count):  # the paper sums the relation losses
        layers = [
            ref_kl_layer((x, x), (y, y), relation_heads, relation_heads, keep)
            for x, y in zip(student[r::count], teacher[r::count], strict=True)
        ]
        total = total + torch.stack(layers).mean()
    return total


def ref_patient_kd(student, teacher, cls_index=0):
    layers = []
    for s, t in zip(student, teacher, strict=True):
        rows = []
        for b in range(s.shape[0]):
            hs, ht = s[b, cls_index], t[b, cls_index]
            rows.append(((hs / hs.norm() - ht / ht.norm()) ** 2).sum())
        layers.append(torch.stack(rows).mean())
    return torch.stack(layers).mean()


def _check_value_and_grad(loss_fn, ref_fn, student, teacher):
    ours_in, ref_in = _grad(student), _grad(student)
    ours, ref = loss_fn(ours_in, teacher), ref_fn(ref_in, teacher)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, b in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# known answers: loop references and hand-computed values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, MASK], ids=["no_mask", "mask"])
def test_tinybert_attention_matches_the_loop_reference(mask):
    student, teacher = _projections(6, 4, 1), _projections(8, 4, 2)  # 2 layers, 2 heads
    _check_value_and_grad(
        lambda s, t: L.TinyBERTAttentionLoss(2)(s, t, mask=mask),
        lambda s, t: ref_tinybert(s, t, 2, mask),
        student,
        teacher,
    )


@pytest.mark.parametrize("mask", [None, MASK], ids=["no_mask", "mask"])
def test_minilm_attention_matches_the_loop_reference(mask):
    student, teacher = _projections(6, 4, 3), _projections(8, 4, 4)
    _check_value_and_grad(
        lambda s, t: L.MiniLMAttentionLoss(2, 2)(s, t, mask=mask),
        lambda s, t: ref_minilm_attention(s, t, 2, mask),
        student,
        teacher,
    )


@pytest.mark.parametrize("mask", [None, MASK], ids=["no_mask", "mask"])
def test_minilm_value_relation_matches_the_loop_reference(mask):
    student, teacher = _projections(6, 2, 5), _projections(8, 2, 6)
    _check_value_and_grad(
        lambda s, t: L.MiniLMValueRelationLoss(2)(s, t, mask=mask),
        lambda s, t: ref_value_relation(s, t, 2, mask),
        student,
        teacher,
    )


@pytest.mark.parametrize("mask", [None, MASK], ids=["no_mask", "mask"])
def test_minilmv2_relations_match_the_loop_reference_across_widths(mask):
    # student width 6, teacher width 12 (e.g. 2 vs 4 attention heads of 3): 3 relation heads
    student, teacher = _projections(6, 6, 7), _projections(12, 6, 8)  # 2 layers of q, k, v
    _check_value_and_grad(
        lambda s, t: L.MiniLMv2RelationLoss(3)(s, t, mask=mask),
        lambda s, t: ref_minilmv2(s, t, 3, 3, mask),
        student,
        teacher,
    )


def test_minilmv2_relations_read_the_named_projections_in_order():
    student, teacher = _projections(6, 2, 9), _projections(12, 2, 10)  # 1 layer of q, v
    loss = L.MiniLMv2RelationLoss(3, relations=("query", "value"))
    torch.testing.assert_close(
        loss(student, teacher, mask=MASK), ref_minilmv2(student, teacher, 3, 2, MASK)
    )
    single = L.MiniLMv2RelationLoss(3, relations=["value"])(student[1:], teacher[1:], mask=MASK)
    torch.testing.assert_close(single, ref_minilmv2(student[1:], teacher[1:], 3, 1, MASK))


@pytest.mark.parametrize("cls_index", [0, 2, -1])
def test_patient_kd_matches_the_loop_reference(cls_index):
    student, teacher = _projections(6, 2, 11), _projections(6, 2, 12)
    _check_value_and_grad(
        lambda s, t: L.PatientKDLoss(cls_index)(s, t),
        lambda s, t: ref_patient_kd(s, t, cls_index),
        student,
        teacher,
    )


def test_hand_computed_values():
    # TinyBERT, 1 head of size 1: S_ij = q_i k_j.
    qs, ks = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[1.0], [0.0]]])  # S_s = [[1,0],[2,0]]
    qt, kt = torch.tensor([[[0.0], [1.0]]]), torch.tensor([[[1.0], [1.0]]])  # S_t = [[0,0],[1,1]]
    tiny = L.TinyBERTAttentionLoss(1)
    assert tiny([qs, ks], [qt, kt]).item() == pytest.approx(3 / 4)
    only_first = torch.tensor([[True, False]])  # the one kept pair (0, 0): (1 - 0)^2
    assert tiny([qs, ks], [qt, kt], mask=only_first).item() == pytest.approx(1.0)
    # MiniLM: a uniform student row vs the teacher's softmax([0, 1]):
    # KL(p || u) = log 2 + sum p log p.
    p = torch.tensor([1.0, math.e]) / (1 + math.e)
    expected = math.log(2) + float((p * p.log()).sum())
    q0 = torch.zeros(1, 2, 1)
    teacher_q, teacher_k = torch.ones(1, 2, 1), torch.tensor([[[0.0], [1.0]]])
    got = L.MiniLMAttentionLoss(1)([q0, q0], [teacher_q, teacher_k])
    assert got.item() == pytest.approx(expected)
    # Patient-KD: [3, 4] / 5 - [1, 0] = [-0.4, 0.8] -> 0.16 + 0.64.
    cls_s, cls_t = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert L.PatientKDLoss()(cls_s, cls_t).item() == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------
# the mask
# ---------------------------------------------------------------------------------------------


def _attention_cases():
    return [
        (L.TinyBERTAttentionLoss(2), 2),
        (L.MiniLMAttentionLoss(2), 2),
        (L.MiniLMValueRelationLoss(2), 1),
        (L.MiniLMv2RelationLoss(2), 3),
    ]


@pytest.mark.parametrize("loss, per_layer", _attention_cases(), ids=lambda x: type(x).__name__)
def test_padding_neither_changes_the_value_nor_poisons_the_gradient(loss, per_layer):
    student, teacher = _projections(6, per_layer, 13), _projections(8, per_layer, 14)
    clean = loss(student, teacher, mask=MASK)
    poisoned = _grad([x.masked_fill(~MASK[..., None], float("nan")) for x in student])
    teacher_nan = [x.masked_fill(~MASK[..., None], float("inf")) for x in teacher]
    value = loss(poisoned, teacher_nan, mask=MASK)
    torch.testing.assert_close(value, clean)
    value.backward()
    for x in poisoned:
        assert torch.isfinite(x.grad).all()
        assert (x.grad[~MASK] == 0).all()


@pytest.mark.parametrize("loss, per_layer", _attention_cases(), ids=lambda x: type(x).__name__)
def test_reduction_none_is_per_query_and_zero_at_padding(loss, per_layer):
    student, teacher = _projections(6, per_layer, 15), _projections(8, per_layer, 16)
    loss.reduction = "none"
    per_query = loss(student, teacher, mask=MASK)
    per_sample = loss(student, teacher)
    loss.reduction = "mean"
    assert per_query.shape == (B, LEN) and per_sample.shape == (B,)
    assert (per_query[~MASK] == 0).all() and (per_query[MASK] > 0).all()
    torch.testing.assert_close(loss(student, teacher, mask=MASK), per_query[MASK].mean())
    torch.testing.assert_close(loss(student, teacher), per_sample.mean())


def test_identical_models_give_zero():
    x = _projections(8, 3, 17)
    for loss, n in _attention_cases():
        assert loss(x[:n], x[:n], mask=MASK).abs().item() < 1e-12, type(loss).__name__


# ---------------------------------------------------------------------------------------------
# kdkit.attention on a real Hugging Face BERT
# ---------------------------------------------------------------------------------------------


def _bert(attn: str, hidden: int = 64, heads: int = 2, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        vocab_size=100,
        attn_implementation=attn,
    )
    return transformers.BertModel(config).eval()


def _classifier(hidden: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=100,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def _qkv_paths(layers: int, names=("query", "key", "value"), prefix: str = "") -> list[str]:
    return [f"{prefix}encoder.layer.{i}.attention.self.{n}" for i in range(layers) for n in names]


def _batch(seed: int = 1):
    input_ids = torch.randint(0, 100, (3, 7), generator=_gen(seed))
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[0, 4:] = 0
    attention_mask[2, 6:] = 0
    return input_ids, attention_mask


def test_attention_from_projections_equals_the_models_eager_attention():
    eager = _bert("eager")
    sdpa = _bert("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    input_ids, attention_mask = _batch()
    paths = _qkv_paths(2, ("query", "key"))
    with FeatureCapture(eager, paths) as cap:
        out = eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        eager_qk = cap.features
    with FeatureCapture(sdpa, paths) as cap:
        sdpa(input_ids=input_ids, attention_mask=attention_mask)
        sdpa_qk = cap.features
    assert len(out.attentions) == 2
    for i in range(2):
        q, k = (eager_qk[f"encoder.layer.{i}.attention.self.{n}"] for n in ("query", "key"))
        ours = attention_probs(q, k, 2, attention_mask)
        torch.testing.assert_close(ours, out.attentions[i], rtol=0, atol=1e-5)
        q, k = (sdpa_qk[f"encoder.layer.{i}.attention.self.{n}"] for n in ("query", "key"))
        torch.testing.assert_close(
            attention_probs(q, k, 2, attention_mask), ours, rtol=0, atol=1e-5
        )


def test_minilm_reads_projections_or_ready_probabilities_alike():
    teacher, student = _bert("eager", seed=0), _bert("eager", hidden=32, seed=1)
    input_ids, attention_mask = _batch(2)
    paths = _qkv_paths(2, ("query", "key"))
    with FeatureCapture(teacher, paths) as cap:
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        t_qk = [cap.features[p] for p in paths]
    with FeatureCapture(student, paths) as cap:
        student(input_ids=input_ids, attention_mask=attention_mask)
        s_qk = [cap.features[p] for p in paths]
    loss = L.MiniLMAttentionLoss(2)
    from_projections = loss(s_qk, t_qk, mask=attention_mask)
    from_probabilities = loss(s_qk, list(t_out.attentions), mask=attention_mask)
    assert from_projections.item() > 0
    torch.testing.assert_close(from_probabilities, from_projections, rtol=1e-5, atol=1e-7)
    mixed = loss(s_qk, [t_out.attentions[0], *t_qk[2:]], mask=attention_mask)
    torch.testing.assert_close(mixed, from_projections, rtol=1e-5, atol=1e-7)


def test_sdpa_attentions_are_refused_with_the_reason():
    model = _bert("sdpa")
    input_ids, attention_mask = _batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    assert len(out.attentions) == 0
    q = torch.randn(3, 7, 64)
    for attentions in (out.attentions, None, [None, None]):
        with pytest.raises(ValueError, match=r"sdpa.*output\.attentions is then empty.*query/key"):
            L.MiniLMAttentionLoss(2)([q, q], attentions, mask=attention_mask)


def test_a_distiller_runs_the_transformer_terms_on_bert():
    """Sequence-level KD on [B, C] logits (mask=False) + TinyBERT + MiniLM + MiniLMv2 +
    Patient-KD terms on a BERT student and teacher of different widths, in one step."""
    teacher = _classifier(hidden=64, seed=0)
    student = _classifier(hidden=32, seed=1)
    input_ids, attention_mask = _batch(3)
    mask = attention_mask.bool()
    qk = _qkv_paths(2, ("query", "key"), prefix="bert.")
    qkv = _qkv_paths(2, prefix="bert.")
    values = qkv[2::3]
    pkd = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    terms = {
        "kd": Term(L.KLDivLoss(2.0), mask=False),
        "tinybert": Term(L.TinyBERTAttentionLoss(2), student=qk, teacher=qk),
        "minilm": Term(L.MiniLMAttentionLoss(2), student=qk, teacher=qk),
        "value": Term(L.MiniLMValueRelationLoss(2), student=values, teacher=values),
        "v2": Term(L.MiniLMv2RelationLoss(4), student=qkv, teacher=qkv),
        "pkd": Term(L.PatientKDLoss(), student=pkd, teacher=pkd, adapter="linear"),
    }
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    distiller = Distiller(student, teacher, terms, example_input=inputs)
    out = distiller(inputs, mask=mask)
    assert set(out.terms) == set(terms)

    with FeatureCapture(student, qkv + pkd) as s_cap, FeatureCapture(teacher, qkv + pkd) as t_cap:
        s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
        s, t = s_cap.features, t_cap.features
    adapters = [distiller.adapters[key] for key in sorted(distiller.adapters)]
    assert len(adapters) == 2
    expected = {
        "kd": L.KLDivLoss(2.0)(s_logits, t_logits),
        "tinybert": ref_tinybert([s[p] for p in qk], [t[p] for p in qk], 2, mask),
        "minilm": ref_minilm_attention([s[p] for p in qk], [t[p] for p in qk], 2, mask),
        "value": ref_value_relation([s[p] for p in values], [t[p] for p in values], 2, mask),
        "v2": ref_minilmv2([s[p] for p in qkv], [t[p] for p in qkv], 4, 3, mask),
        "pkd": ref_patient_kd(
            [adapter(s[p]) for adapter, p in zip(adapters, pkd, strict=True)], [t[p] for p in pkd]
        ),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# kdkit.attention pieces and errors
# ---------------------------------------------------------------------------------------------


def test_split_heads_scores_and_relations():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    heads = split_heads(x, 2)
    assert heads.shape == (2, 2, 3, 2)
    assert torch.equal(heads[1, 1, 2], x[1, 2, 2:])
    scores = attention_scores(x, x, 2)
    torch.testing.assert_close(scores[0, 1, 0, 2], torch.dot(x[0, 0, 2:], x[0, 2, 2:]) / 2**0.5)
    relation = relation_log_probs(x, 4, MASK[:2, :3])
    torch.testing.assert_close(relation.exp().sum(-1), torch.ones(2, 4, 3, dtype=torch.float64))


def test_errors_name_the_problem_and_the_fix():
    q = torch.randn(B, LEN, 6)
    with pytest.raises(ValueError, match=r"same number of heads.*student_heads=2.*teacher_heads=3"):
        L.TinyBERTAttentionLoss(2, 3)
    with pytest.raises(ValueError, match=r"MiniLMv2RelationLoss"):
        L.MiniLMAttentionLoss(2, 4)
    with pytest.raises(ValueError, match=r"student_heads must be a positive int, got 0"):
        L.MiniLMValueRelationLoss(0)
    with pytest.raises(ValueError, match=r"relations must be distinct names among"):
        L.MiniLMv2RelationLoss(2, relations=("query", "query"))
    with pytest.raises(ValueError, match=r"relations must be distinct names among"):
        L.MiniLMv2RelationLoss(2, relations=("qq",))
    with pytest.raises(TypeError, match=r"cls_index must be an int"):
        L.PatientKDLoss(cls_index="0")
    with pytest.raises(ValueError, match=r"which 4 heads do not divide"):
        L.MiniLMv2RelationLoss(4)([q, q, q], [q, q, q])
    with pytest.raises(ValueError, match=r"pre-softmax scores.*query and key projections"):
        L.TinyBERTAttentionLoss(2)([q, q], [torch.rand(B, 2, LEN, LEN)])
    with pytest.raises(ValueError, match=r"not a multiple of 2; pass query, key"):
        L.TinyBERTAttentionLoss(2)([q, q, q], [q, q, q])
    with pytest.raises(ValueError, match=r"2 student layers but 1 teacher layers"):
        L.MiniLMValueRelationLoss(2)([q, q], [q])
    with pytest.raises(ValueError, match=r"student maps \(3, 2, 5, 5\) but teacher maps"):
        L.MiniLMValueRelationLoss(2)([q], [torch.randn(B, LEN + 1, 6)])
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) does not match"):
        L.MiniLMAttentionLoss(2)([q, q], [q, q], mask=MASK[:, :4])
    with pytest.raises(ValueError, match=r"cls_index=5 is outside the 5 positions"):
        L.PatientKDLoss(5)(q, q)
    with pytest.raises(ValueError, match=r"takes no token mask"):
        L.PatientKDLoss()(q, q, mask=MASK)
    with pytest.raises(ValueError, match=r"patient_kd: hidden state 0 has student shape"):
        L.PatientKDLoss()(q, torch.randn(B, LEN, 8))


def test_functional_api_checks_its_own_arguments():
    q = torch.randn(B, LEN, 6)
    with pytest.raises(ValueError, match=r"tinybert_attention.*same number of heads"):
        KF.tinybert_attention([q, q], [q, q], 2, 3)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        KF.minilm_value_relation([q], [q], 2, reduction="batchmean")
    with pytest.raises(ValueError, match=r"relation_heads must be a positive int"):
        KF.minilmv2_relations([q], [q], 0, relations=("value",))
    torch.testing.assert_close(
        KF.minilm_attention([q, q], [q, q], 2, mask=MASK), torch.zeros(()), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("loss, per_layer", _attention_cases(), ids=lambda x: type(x).__name__)
def test_bf16_projections_match_float64_on_the_same_values(loss, per_layer):
    student = [x.to(torch.bfloat16) for x in _projections(6, per_layer, 21)]
    teacher = [x.to(torch.bfloat16) for x in _projections(8, per_layer, 22)]
    low, high = _grad(student), _grad([x.double() for x in student])
    value_low = loss(low, teacher, mask=MASK)
    value_high = loss(high, [x.double() for x in teacher], mask=MASK)
    assert value_low.dtype == torch.float32  # upcast before the softmax, as the logit losses
    torch.testing.assert_close(value_low.double(), value_high, rtol=2e-2, atol=1e-3)
    value_low.backward()
    value_high.backward()
    for a, b in zip(low, high, strict=True):
        assert torch.isfinite(a.grad).all() and (a.grad[~MASK] == 0).all()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=5e-2, atol=5e-3)


def test_patient_kd_in_bf16_matches_float64_on_the_same_values():
    torch.manual_seed(23)
    student = [torch.randn(4, 5, 8).to(torch.bfloat16) for _ in range(2)]
    teacher = [torch.randn(4, 5, 8).to(torch.bfloat16) for _ in range(2)]
    low = [x.clone().requires_grad_(True) for x in student]
    high = [x.double().requires_grad_(True) for x in student]
    value_low = L.PatientKDLoss()(low, teacher)
    value_high = L.PatientKDLoss()(high, [x.double() for x in teacher])
    assert value_low.dtype == torch.float32  # normalised in float32, not in bf16
    torch.testing.assert_close(value_low.double(), value_high, rtol=1e-2, atol=1e-3)
    value_low.backward()
    value_high.backward()
    for a, b in zip(low, high, strict=True):
        assert (a.grad[:, 1:] == 0).all()  # only the [CLS] position is read
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=5e-2, atol=5e-3)
