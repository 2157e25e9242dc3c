"""Sequence-level KD and on-policy GKD (issue 10, item 4) with tiny Hugging Face GPT-2s: batch
shapes and masks, EOS and padding, the lmbda coin, determinism, and the GKD loss against TRL's
formula written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from kdkit.generation import (  # noqa: E402
    Generations,
    OnPolicyGKD,
    SequenceKD,
    generate,
    split_prompt,
)
from kdkit.models import create_model  # noqa: E402

V, PAD = 32, 0


def _gpt2(seed: int, n_embd: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(
        vocab_size=V, n_embd=n_embd, n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return create_model("hf:gpt2", V, head="causal_lm", config=config)


def _data(seed: int = 0):
    """A kdkit.data.text batch: right-padded, labels shifted once, -100 at the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 9), generator=g)
    labels = torch.cat([ids[:, 1:], torch.randint(1, V, (3, 1), generator=g)], dim=1)
    ids[2, 6:], labels[2, 6:] = PAD, -100
    return ids, labels


def _greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: the argmax of a full forward, one token at a time."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax()[None]])
    return ids[len(prompt) :]


def test_split_prompt_masks_the_prompt_predictions():
    ids, labels = _data()
    prompts, mask, data = split_prompt(ids, labels, 4)
    assert torch.equal(prompts, ids[:, :4]) and mask.shape == (3, 4) and bool(mask.all())
    assert not data.generated and data.input_ids is ids
    assert bool((data.labels[:, :3] == -100).all())
    assert torch.equal(data.labels[:, 3:], labels[:, 3:])
    assert data.attention_mask[2].tolist() == [1] * 6 + [0] * 3
    with pytest.raises(ValueError, match="prompt_length=9 leaves nothing"):
        split_prompt(ids, labels, 9)


def test_teacher_generations_are_greedy_continuations_with_labels_on_them_only():
    teacher = _gpt2(1)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])  # right-padded prompts
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = SequenceKD(teacher, max_new_tokens=5, pad_token_id=PAD, eos_token_id=None)(
        prompts, mask
    )
    assert isinstance(batch, Generations) and batch.generated
    assert batch.input_ids.shape == batch.labels.shape == (2, 9)
    assert batch.attention_mask.tolist() == [[1] * 9, [1] * 7 + [0] * 2]
    for row, length in enumerate((4, 2)):
        new = _greedy(teacher, prompts[row, :length], 5)
        assert torch.equal(batch.input_ids[row, :length], prompts[row, :length])
        assert torch.equal(batch.input_ids[row, length : length + 5], new)
        expected = torch.full((9,), -100)
        expected[length - 1 : length + 4] = new  # labels[t] is the token at t + 1
        assert torch.equal(batch.labels[row], expected)
    assert batch.input_ids[1, 7:].tolist() == [PAD, PAD]


def test_a_row_ends_at_its_first_eos_and_the_eos_is_learnt():
    teacher = _gpt2(1)
    prompts = torch.tensor([[5, 6, 7, 8], [3, 4, 11, 2]])
    free = generate(teacher, prompts, max_new_tokens=6, pad_token_id=PAD)  # eos 50256 > V
    eos = int(free.input_ids[0, 5])  # the second token row 0 generates
    first = [(row[4:] == eos).nonzero()[:1].flatten().tolist() for row in free.input_ids]
    batch = generate(teacher, prompts, max_new_tokens=6, pad_token_id=PAD, eos_token_id=eos)
    for row, hit in enumerate(first):
        n = hit[0] + 1 if hit else 6  # generated tokens kept, the EOS included
        assert torch.equal(batch.input_ids[row, 4 : 4 + n], free.input_ids[row, 4 : 4 + n])
        assert int(batch.attention_mask[row].sum()) == 4 + n
        assert bool((batch.labels[row, 3 : 3 + n] != -100).all())
        assert bool((batch.labels[row, 3 + n :] == -100).all())
        assert bool((batch.input_ids[row, 4 + n :] == PAD).all())
    assert first[0] == [0] or first[0] == [1]
    assert batch.labels[0, 3 + first[0][0]] == eos
    teacher.generation_config.eos_token_id = eos  # where generate stops when given no EOS
    default = generate(teacher, prompts, max_new_tokens=6, pad_token_id=PAD, eos_token_id=[])
    assert torch.equal(default.labels, batch.labels)


def test_lmbda_zero_keeps_the_data_and_lmbda_one_always_generates():
    student, teacher = _gpt2(0), _gpt2(1, 24)
    ids, labels = _data()
    prompts, mask, data = split_prompt(ids, labels, 4)
    off = OnPolicyGKD(student, teacher, lmbda=0.0, max_new_tokens=3, pad_token_id=PAD)
    assert all(off(prompts, mask, batch=data) is data for _ in range(5))
    on = OnPolicyGKD(student, teacher, lmbda=1.0, max_new_tokens=3, pad_token_id=PAD)
    student.train()
    for _ in range(5):
        batch = on(prompts, mask, batch=data)
        assert batch.generated and batch.input_ids.shape == (3, 7)
        assert bool((batch.labels[:, :3] == -100).all())
        assert bool((batch.labels[:, 3:6] != -100).all())
    assert student.training  # eval only while generating
    with pytest.raises(ValueError, match="drew an off-policy batch"):
        off(prompts, mask, batch=None)
    with pytest.raises(ValueError, match=r"a number in \[0, 1\]; got 1.5"):
        OnPolicyGKD(student, teacher, lmbda=1.5, max_new_tokens=3, pad_token_id=PAD)


def test_deterministic_given_a_seed_and_resumable_from_its_state():
    student, teacher = _gpt2(0), _gpt2(1, 24)
    ids, labels = _data()
    prompts, mask, data = split_prompt(ids, labels, 4)

    def run(gkd, n):
        return [gkd(prompts, mask, batch=data) for _ in range(n)]

    def make(seed):
        return OnPolicyGKD(
            student, teacher, lmbda=0.5, max_new_tokens=4, pad_token_id=PAD, seed=seed
        )

    a, b = run(make(3), 12), run(make(3), 12)
    assert [x.generated for x in a] == [x.generated for x in b]
    assert {x.generated for x in a} == {True, False}
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
    generated = [x.input_ids for x in a if x.generated]
    assert any(not torch.equal(generated[0], g) for g in generated[1:])  # fresh samples
    other = [x for x in run(make(4), 12) if x.generated]
    assert any(not torch.equal(x.input_ids, y) for x, y in zip(other, generated, strict=False))
    first = make(3)
    run(first, 5)
    resumed = make(99)
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(run(resumed, 7), a[5:], strict=True):
        assert x.generated == y.generated and torch.equal(x.input_ids, y.input_ids)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean"), written out."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gkd_loss_equals_trl_formula_times_t_squared(beta, fused):
    student, teacher = _gpt2(0), _gpt2(1, 24)
    gkd = OnPolicyGKD(
        student,
        teacher,
        lmbda=1.0,
        beta=beta,
        temperature=2.0,
        max_new_tokens=3,
        pad_token_id=PAD,
        fused=fused,
    )
    ids, labels = _data()
    prompts, mask, _ = split_prompt(ids, labels, 4)
    batch = gkd(prompts, mask, batch=None)
    got = gkd.loss(batch)
    with torch.no_grad():
        s = student(**batch.inputs).logits
        t = teacher(**batch.inputs).logits
    expected = 4.0 * _trl_generalized_jsd(s, t, batch.labels, beta, 2.0)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert student.lm_head.weight.grad is not None
