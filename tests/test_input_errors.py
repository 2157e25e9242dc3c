"""Plausible mistakes get an error that names the argument, its value and the fix, instead of a
raw error from deep inside torch (or a silently wrong value)."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp

from kdkit import Distiller, Term
from kdkit import losses as L
from kdkit.cache.tokens import TopKTokens
from kdkit.losses import MSEHiddenStatesLoss


def test_labels_that_are_not_one_per_token_are_named_as_the_labels():
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    shifted_twice = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"KLDivLoss: target \(the labels\) has shape \(2, 5\) but "
    ):
        L.KLDivLoss(ignore_index=-100)(s, t, target=shifted_twice)
    hidden, weight = torch.randn(2, 6, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"FusedLinearJSDLoss: target .* tokens are \(2, 6\)"):
        L.FusedLinearJSDLoss(0.5, ignore_index=-100)(hidden, weight, hidden, weight, shifted_twice)


def test_the_hooks_api_refuses_a_student_loss_that_is_not_a_tensor():
    student, teacher = mlp(16, depth=1), mlp(32)
    distiller = Distiller(student, teacher, [Term(L.KLDivLoss(2.0))])
    distiller.on_train_begin()
    x = torch.randn(4, 64)
    with pytest.raises(
        TypeError, match=r"student_loss must be your loop's loss tensor, got NoneType"
    ):
        distiller.on_after_compute_loss(x, student(x), None)


def test_an_example_input_the_models_cannot_take_is_named_as_such():
    student, teacher = mlp(16, depth=1), mlp(32)
    term = Term(MSEHiddenStatesLoss(), student="1", teacher="1", adapter="auto")
    with pytest.raises(ValueError, match=r"the student failed on example_input .* one batch"):
        Distiller(student, teacher, [term], example_input=torch.randn(4, 7))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_cached_tokens_refuse_a_temperature_that_is_not_positive(temperature):
    values = torch.randn(1, 3, 2).log_softmax(-1) - 1.0
    indices, log_tail = torch.tensor([[[0, 1]] * 3]), torch.full((1, 3), -1.5)
    tokens = TopKTokens(values, indices, log_tail, torch.tensor([3]), 5)
    with pytest.raises(ValueError, match="temperature"):
        tokens.at_temperature(temperature)


def test_generation_past_the_models_positions_or_of_no_prompts_is_named():
    transformers = pytest.importorskip("transformers")
    from kdkit.generation import generate

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16, bos_token_id=1, eos_token_id=2
    )
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(
        ValueError, match=r"prompts of 12 tokens \+ max_new_tokens=8 .* 16 positions"
    ):
        generate(model, torch.randint(3, 20, (2, 12)), max_new_tokens=8, pad_token_id=0)
    with pytest.raises(ValueError, match=r"prompt_ids must be \[B, P\] with B >= 1, got \(0, 4\)"):
        generate(model, torch.zeros(0, 4, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
