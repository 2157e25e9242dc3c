"""Causal LMs of the LM preset: the vocabulary from the data, gradient checkpointing, bf16."""

from __future__ import annotations

import pytest
import torch

from kdkit.models import create_model

TINY_GPT2 = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def test_causal_lm_vocabulary_is_num_classes() -> None:
    # Failed before the fix: the config's default vocabulary (GPT-2's 50257) was kept.
    model = create_model("hf:gpt2", 37, head="causal_lm", config=TINY_GPT2)
    assert model.config.vocab_size == 37
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 37)


def test_causal_lm_vocabulary_that_contradicts_num_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size=50 .* 37"):
        create_model("hf:gpt2", 37, head="causal_lm", config={**TINY_GPT2, "vocab_size": 50})
