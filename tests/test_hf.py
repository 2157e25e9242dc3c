"""kdkit.hf: student configs from a teacher's config, students initialised from the teacher.

Small random-init BERT, GPT-2 and Llama models built from configs (nothing is downloaded).
"""

from __future__ import annotations

import sys

import pytest
import torch

from kdkit.hf import InitSummary, init_student_from_teacher, student_config

transformers = pytest.importorskip("transformers")


def _bert_config(**kwargs):
    options = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=40,
        type_vocab_size=3,
        num_labels=3,
    )
    return transformers.BertConfig(**{**options, **kwargs})


def _gpt2_config():
    return transformers.GPT2Config(
        n_embd=32, n_layer=4, n_head=2, vocab_size=100, n_positions=40, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


def _llama_config(**kwargs):
    options = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
    )
    return transformers.LlamaConfig(**{**options, **kwargs})


def _build(cls, config, seed):
    torch.manual_seed(seed)
    return cls(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# student_config
# ---------------------------------------------------------------------------------------------


def test_student_config_is_shallower_and_keeps_everything_else():
    teacher = _bert_config(hidden_act="gelu_new", hidden_dropout_prob=0.2)
    config = student_config(teacher, 2)
    assert type(config) is type(teacher)
    assert config.num_hidden_layers == 2 and teacher.num_hidden_layers == 4
    changed = {k for k, v in config.to_dict().items() if teacher.to_dict().get(k) != v}
    assert changed == {"num_hidden_layers"}, changed
    assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size) == (
        100,
        40,
        3,
    )


def test_student_config_thinner_with_heads_and_feed_forward():
    teacher = _bert_config()
    config = student_config(teacher, 2, hidden_size=32, num_heads=2)
    assert (config.hidden_size, config.num_attention_heads) == (32, 2)
    assert config.intermediate_size == 64  # the teacher's 2x ratio
    config = student_config(teacher, 3, hidden_size=32, intermediate_size=48)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 48)
    config = student_config(teacher, 1, num_labels=5)
    assert config.num_labels == 5 and teacher.num_labels == 3


def test_student_config_for_gpt2_uses_the_standard_names():
    teacher = _gpt2_config()
    config = student_config(teacher, 2, hidden_size=16, num_heads=4)
    assert (config.n_layer, config.n_embd, config.n_head) == (2, 16, 4)
    assert config.n_inner is None  # GPT-2's 4 * hidden
    assert (config.n_positions, config.vocab_size) == (40, 100)
    with pytest.raises(ValueError, match="exceeds the teacher's 4 layers"):
        student_config(teacher, 5)


def test_student_config_for_llama_follows_heads_and_grouped_query_attention():
    teacher = _llama_config()
    config = student_config(teacher, 2, hidden_size=32, num_heads=2)
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (32, 2, 16)
    assert config.num_key_value_heads == 2
    mha = student_config(_llama_config(num_key_value_heads=4), 2, num_heads=8)
    assert (mha.num_key_value_heads, mha.head_dim) == (8, 8)
    with pytest.raises(ValueError, match=r"num_heads=3 is not a multiple of the teacher's"):
        student_config(teacher, 2, hidden_size=48, num_heads=3)
    model = _build(transformers.LlamaForCausalLM, config, 0)
    assert model(_ids()).logits.shape == (2, 9, 100)


def test_student_config_shortens_per_layer_attention_kinds():
    teacher = transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, use_sliding_window=True, max_window_layers=1,
    )  # fmt: skip
    assert len(teacher.layer_types) == 4 and len(set(teacher.layer_types)) == 2
    config = student_config(teacher, 2)
    assert config.layer_types == teacher.layer_types[:2]
    assert _build(transformers.Qwen2ForCausalLM, config, 0)(_ids()).logits.shape == (2, 9, 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 0}, r"num_layers must be a positive int, got 0"),
        ({"num_layers": 6}, r"num_layers=6 exceeds the teacher's 4 layers"),
        ({"num_layers": 2, "hidden_size": 50}, r"hidden_size=50 is not divisible by num_heads=4"),
        ({"num_layers": 2, "num_heads": 3}, r"Heads that divide 64: \[1, 2, 4, 8, 16, 32, 64\]"),
        ({"num_layers": 2, "hidden_size": -8}, r"hidden_size must be a positive int, got -8"),
    ],
)
def test_student_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        student_config(_bert_config(), **kwargs)


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises
    with pytest.raises(ImportError, match=r"pip install 'kdkit\[hf\]'"):
        student_config(_bert_config(), 2)


def test_student_config_needs_a_config():
    with pytest.raises(TypeError, match=r"needs the teacher's Hugging Face config"):
        student_config({"num_hidden_layers": 4}, 2)


# ---------------------------------------------------------------------------------------------
# init_student_from_teacher
# ---------------------------------------------------------------------------------------------


def _layer(model, i):
    return model.bert.encoder.layer[i] if hasattr(model, "bert") else model.encoder.layer[i]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "layer_map, expected",
    [("every_other", [0, 2]), ("uniform", [1, 3]), ([3, 0], [3, 0])],
)
def test_bert_student_takes_the_mapped_layers_embeddings_and_head(layer_map, expected):
    teacher = _build(transformers.BertForSequenceClassification, _bert_config(), 0)
    student = _build(
        transformers.BertForSequenceClassification, student_config(teacher.config, 2), 1
    )
    summary = init_student_from_teacher(student, teacher, layer_map)
    assert isinstance(summary, InitSummary)
    assert summary.layers == {"bert.encoder.layer": expected}
    assert summary.skipped == []
    for i, t in enumerate(expected):
        assert _same(_layer(student, i), _layer(teacher, t))
    assert _same(student.bert.embeddings, teacher.bert.embeddings)
    assert _same(student.bert.pooler, teacher.bert.pooler)
    assert _same(student.classifier, teacher.classifier)
    assert f"bert.encoder.layer: teacher layers {expected}" in str(summary)


def test_a_student_with_all_layers_computes_what_the_teacher_computes():
    teacher = _build(transformers.BertForSequenceClassification, _bert_config(), 0)
    student = _build(
        transformers.BertForSequenceClassification, student_config(teacher.config, 4), 1
    )
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    assert not torch.allclose(student(ids, attention_mask=mask).logits, teacher(ids).logits)
    init_student_from_teacher(student, teacher)
    torch.testing.assert_close(
        student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits
    )


def test_a_bare_model_student_takes_the_body_of_a_task_teacher():
    teacher = _build(transformers.BertForSequenceClassification, _bert_config(), 0)
    student = _build(transformers.BertModel, student_config(teacher.config, 4), 1)
    summary = init_student_from_teacher(student, teacher)
    assert summary.layers == {"encoder.layer": [0, 1, 2, 3]}
    ids = _ids(1)
    torch.testing.assert_close(student(ids).last_hidden_state, teacher.bert(ids).last_hidden_state)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_students(family):
    cls, config = {
        "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config()),
        "llama": (transformers.LlamaForCausalLM, _llama_config()),
    }[family]
    teacher = _build(cls, config, 0)
    full = _build(cls, student_config(config, 4), 1)
    init_student_from_teacher(full, teacher)
    torch.testing.assert_close(full(_ids()).logits, teacher(_ids()).logits)

    half = _build(cls, student_config(config, 2), 2)
    summary = init_student_from_teacher(half, teacher, "every_other")
    stack = "transformer.h" if family == "gpt2" else "model.layers"
    assert summary.layers == {stack: [0, 2]}
    layers_s, layers_t = half.get_submodule(stack), teacher.get_submodule(stack)
    assert _same(layers_s[0], layers_t[0]) and _same(layers_s[1], layers_t[2])
    assert not _same(layers_s[1], layers_t[1])
    head = "lm_head" if family == "llama" else "transformer.wte"
    assert _same(half.get_submodule(head), teacher.get_submodule(head))


def test_shapes_that_differ_are_skipped_and_reported():
    teacher = _build(transformers.BertForSequenceClassification, _bert_config(), 0)
    config = student_config(teacher.config, 2, intermediate_size=96, num_labels=2)
    student = _build(transformers.BertForSequenceClassification, config, 1)
    before = student.classifier.weight.clone()
    summary = init_student_from_teacher(student, teacher, "every_other")
    skipped = dict(summary.skipped)
    assert skipped["classifier.weight"] == "shape (2, 64), the teacher's (3, 64)"
    assert "bert.encoder.layer.1.intermediate.dense.weight" in skipped
    assert torch.equal(student.classifier.weight, before)
    assert torch.equal(
        student.bert.encoder.layer[1].attention.self.query.weight,
        teacher.bert.encoder.layer[2].attention.self.query.weight,
    )
    assert "bert.embeddings.word_embeddings.weight" in summary.copied


def test_errors():
    teacher = _build(transformers.BertModel, _bert_config(), 0)
    thin = _build(transformers.BertModel, student_config(teacher.config, 2, hidden_size=32), 1)
    with pytest.raises(ValueError, match=r"copied nothing.*student_config\(teacher.config"):
        init_student_from_teacher(thin, teacher)
    three = _build(transformers.BertModel, student_config(teacher.config, 3), 1)
    with pytest.raises(ValueError, match=r"'every_other'.*at least 5 teacher layers"):
        init_student_from_teacher(three, teacher, "every_other")
    with pytest.raises(ValueError, match=r"one teacher layer in 0..3 for each of the student's 3"):
        init_student_from_teacher(three, teacher, [0, 1, 4])
    with pytest.raises(ValueError, match=r"layer_map must be one of \('uniform', 'every_other'\)"):
        init_student_from_teacher(three, teacher, "skip")
    with pytest.raises(ValueError, match=r"has 4 layers, more than the teacher's 3"):
        init_student_from_teacher(teacher, three)
    with pytest.raises(TypeError, match=r"teacher must be an nn.Module"):
        init_student_from_teacher(three, teacher.state_dict())
