"""The ``hf:`` model namespace: Hugging Face models from a config or a local directory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kdkit.models import create_model  # noqa: E402

BERT = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)


def test_config_builds_a_classifier_with_num_classes_labels() -> None:
    model = create_model("hf:bert", 3, config=BERT, image_size=(1, 1))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "eager"
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3)


def test_local_directory_loads_the_saved_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("hf:bert", 3, config=BERT)
    model.save_pretrained(tmp_path)
    loaded = create_model(f"hf:{tmp_path}", 3)
    ids = torch.tensor([[4, 5, 6]])
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_causal_lm_head_and_base_head() -> None:
    lm = create_model(
        "hf:gpt2", 50, head="causal_lm", config=dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    )
    assert lm(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 50)
    base = create_model("hf:bert", 1, head="base", config=BERT)
    assert base(input_ids=torch.tensor([[1, 2]])).last_hidden_state.shape == (1, 2, 16)


def test_bad_names_say_what_is_allowed(tmp_path) -> None:
    with pytest.raises(ValueError, match="Did you mean 'bert'"):
        create_model("hf:bertt", 2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_model(f"hf:{tmp_path}", 2)
    with pytest.raises(ValueError, match="head='seq' is not one of"):
        create_model("hf:bert", 2, head="seq", config=BERT)
