"""Causal LMs of the LM preset: the vocabulary from the data, gradient checkpointing, bf16."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from kdkit import Distiller, Term
from kdkit.data.text import IGNORE_INDEX, TokenBlocks
from kdkit.lightning_lm import CausalLMDistillationModule, CausalLMModule, warmup_cosine
from kdkit.losses import CrossEntropyLoss, KLDivLoss
from kdkit.models import create_model
from kdkit.pipeline.lm import enable_gradient_checkpointing

TINY_GPT2 = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def test_causal_lm_vocabulary_is_num_classes() -> None:
    # Failed before the fix: the config's default vocabulary (GPT-2's 50257) was kept.
    model = create_model("hf:gpt2", 37, head="causal_lm", config=TINY_GPT2)
    assert model.config.vocab_size == 37
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 37)


def test_causal_lm_vocabulary_that_contradicts_num_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size=50 .* 37"):
        create_model("hf:gpt2", 37, head="causal_lm", config={**TINY_GPT2, "vocab_size": 50})


def _gpt2(layers: int, width: int, seed: int, vocab: int = 37) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = {**TINY_GPT2, "n_layer": layers, "n_embd": width, "use_cache": False}
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config.update(bos_token_id=None, eos_token_id=None)
    return create_model("hf:gpt2", vocab, head="causal_lm", config=config).train()


def _batch(vocab: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[2, 10:] = IGNORE_INDEX  # padding
    return ids[:, :-1], labels


def _distiller(student: torch.nn.Module, teacher: torch.nn.Module) -> Distiller:
    terms = {
        "kd": Term(KLDivLoss(temperature=2.0, ignore_index=IGNORE_INDEX), 0.5),
        "ce": Term(CrossEntropyLoss(), 0.5, teacher=None, target=True),
    }
    return Distiller(student, teacher, terms)


def _step(distiller: Distiller, ids: torch.Tensor, labels: torch.Tensor):
    distiller.student.zero_grad(set_to_none=True)
    out = distiller(ids, labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in distiller.student.named_parameters()}
    return out, grads


def test_student_trains_in_bf16_autocast_in_a_plain_loop() -> None:
    ids, labels = _batch()
    distiller = _distiller(_gpt2(1, 16, 0), _gpt2(2, 32, 1))
    full, full_grads = _step(distiller, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(ids, labels)
    assert out.logits.dtype == torch.bfloat16  # the student really ran in bf16
    assert out.loss.dtype == torch.float32  # ... and the losses upcast before the softmax
    distiller.student.zero_grad(set_to_none=True)
    out.loss.backward()
    for name, term in out.terms.items():
        assert torch.isfinite(term), name
        assert term.item() == pytest.approx(full.terms[name].item(), rel=2e-2, abs=1e-3), name
    for name, p in distiller.student.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        error = (p.grad - full_grads[name]).norm() / full_grads[name].norm().clamp_min(1e-12)
        assert error < 0.05, name  # bf16 keeps 8 bits of mantissa
    # a few optimizer steps stay finite and learn
    optimizer = torch.optim.AdamW(distiller.student.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = distiller(ids, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    ids, labels = _batch()
    teacher = _gpt2(2, 32, 1)
    plain, plain_grads = _step(_distiller(_gpt2(2, 16, 0), teacher), ids, labels)
    student = _gpt2(2, 16, 0)
    enable_gradient_checkpointing(student, "student")
    assert any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
    out, grads = _step(_distiller(student, teacher), ids, labels)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)


def test_labels_are_shifted_once_by_the_dataset() -> None:
    # stream a b c: the one block is input [a, b] with labels [b, c]; logits[t] predicts
    # labels[t], nothing shifts again (a second shift would compare logits[0] with c).
    a, b, c = 3, 1, 4
    ((inputs, labels, _),) = [TokenBlocks(torch.tensor([a, b, c]), block_size=2)[0]]
    assert inputs.tolist() == [a, b] and labels.tolist() == [b, c]
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.3, -2.0, 3.0]])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            assert input_ids.tolist() == [[a, b]]
            return logits.unsqueeze(0)

    expected = -(logits[0].log_softmax(-1)[b] + logits[1].log_softmax(-1)[c]) / 2
    module = CausalLMModule(Fixed())
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    loss = module.training_step((inputs[None], labels[None]), 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bf16_mixed_lightning_fit_of_the_distillation_module() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    ids, labels = _batch()
    data = [(ids[i], labels[i], i) for i in range(3)]
    module = CausalLMDistillationModule(
        _distiller(_gpt2(1, 16, 0), _gpt2(2, 32, 1)),
        scheduler=functools.partial(warmup_cosine, warmup_steps=1),
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=3), DataLoader(data, batch_size=3))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"].item()) and metrics["val/ppl"].item() > 1
    assert 0 <= metrics["val/agreement"].item() <= 1
    after = dict(module.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(opt, total_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[12:] == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        warmup_cosine(opt, 10, min_lr_ratio=2.0)


def test_gradient_checkpointing_of_a_model_without_it_is_refused() -> None:
    with pytest.raises(ValueError, match="student.gradient_checkpointing=true but Linear"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "student")
