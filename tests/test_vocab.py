"""kdkit.vocab: mismatched vocabularies are refused with what differs, a padded head is sliced,
two tokenizers share their common tokens.

The references are written independently of the library (numpy, explicit token lists)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE, WordLevel
from transformers import PreTrainedTokenizerFast

from kdkit import functional as KF
from kdkit.losses import KLDivLoss
from kdkit.vocab import (
    VocabDiff,
    VocabMap,
    VocabMismatchError,
    align_logits,
    check_vocab,
    normalize_token,
    vocabulary,
)

# Student: a word-level tokenizer with GPT-2's space marker; teacher: a BPE tokenizer with
# SentencePiece's. Shared after normalisation: "the", " cat" (Ġcat / ▁cat), "a", "sat".
STUDENT_VOCAB = {"[UNK]": 0, "the": 1, "Ġcat": 2, "dog": 3, "sat": 4, "a": 5}
TEACHER_VOCAB = {"<unk>": 0, "a": 1, "▁cat": 2, "t": 3, "h": 4, "e": 5, "th": 6, "the": 7}
TEACHER_VOCAB |= {"s": 8, "sat": 9, "at": 10}
SHARED = [("the", 1, 7), (" cat", 2, 2), ("sat", 4, 9), ("a", 5, 1)]  # by student id


@pytest.fixture
def student_tok() -> Tokenizer:
    return Tokenizer(WordLevel(vocab=STUDENT_VOCAB, unk_token="[UNK]"))


@pytest.fixture
def teacher_tok() -> PreTrainedTokenizerFast:
    merges = [("t", "h"), ("th", "e"), ("a", "t"), ("s", "at")]
    bpe = Tokenizer(BPE(vocab=TEACHER_VOCAB, merges=merges, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl_mean(student: np.ndarray, teacher: np.ndarray) -> float:
    """mean over rows of KL(softmax(t) || softmax(s)), rows on the last axis."""
    s = np_log_softmax(student.reshape(-1, student.shape[-1]).astype(np.float64))
    t = np_log_softmax(teacher.reshape(-1, teacher.shape[-1]).astype(np.float64))
    return float((np.exp(t) * (t - s)).sum(axis=-1).mean())


def logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


# -------------------------------------------------------------------------------------------
# padded heads: 96 real tokens, 128 rows
# -------------------------------------------------------------------------------------------


def test_padded_head_is_refused_without_a_map_and_the_error_names_the_fixes() -> None:
    student, teacher = logits(2, 5, 96), logits(2, 5, 128, seed=1)
    with pytest.raises(ValueError, match="96"):
        KLDivLoss()(student, teacher)  # the loss alone has no way through
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(student, teacher)
    text = str(err.value)
    assert "96 vocabulary rows" in text and "the teacher's 128" in text
    assert "VocabMap.padded(vocab_size=len(tokenizer))" in text and "at most 96" in text
    assert "VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)" in text
    with pytest.raises(VocabMismatchError):
        align_logits(student, teacher)


@pytest.mark.parametrize("student_rows", [96, 128])
def test_padded_map_gives_the_kl_of_the_unpadded_logits_and_no_grad_to_padding(
    student_rows: int,
) -> None:
    real_s, real_t = logits(2, 5, 96), logits(2, 5, 96, seed=1)
    # padding rows with large logits: if they reached the softmax the KL would change a lot
    student = torch.cat([real_s, torch.full((2, 5, student_rows - 96), 9.0)], -1)
    teacher = torch.cat([real_t, torch.full((2, 5, 32), 7.0)], -1)
    student.requires_grad_(True)
    vmap = VocabMap.padded(96)
    s, t = vmap(student, teacher)
    assert s.shape == t.shape == (2, 5, 96)
    loss = KLDivLoss()(s, t)
    assert loss.item() == pytest.approx(np_kl_mean(real_s.numpy(), real_t.numpy()), rel=1e-5)
    loss.backward()
    assert torch.all(student.grad[..., 96:] == 0)
    ref = real_s.clone().requires_grad_(True)
    KLDivLoss()(ref, real_t).backward()
    torch.testing.assert_close(student.grad[..., :96], ref.grad)
    s2, t2 = align_logits(student, teacher, vocab_size=96)
    assert torch.equal(s2, s) and torch.equal(t2, t)


def test_align_logits_takes_the_size_from_the_tokenizer(student_tok: Tokenizer) -> None:
    student, teacher = logits(3, 6), logits(3, 64, seed=1)
    s, t = align_logits(student, teacher, tokenizer=student_tok)
    assert torch.equal(s, student) and torch.equal(t, teacher[:, :6])
    same = logits(3, 6, seed=2)
    assert align_logits(student, same)[1] is same  # equal sizes, nothing to do
    with pytest.raises(ValueError, match="not both"):
        align_logits(student, teacher, vocab_size=6, tokenizer=student_tok)


def test_a_head_smaller_than_the_vocabulary_is_a_real_mismatch() -> None:
    with pytest.raises(VocabMismatchError) as err:
        align_logits(logits(2, 90), logits(2, 128), vocab_size=96)
    assert "student logits have 90 vocabulary rows" in str(err.value)
    assert "needs 96" in str(err.value)
    for bad in (0, -3, 9.5, True):
        with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
            VocabMap.padded(bad)


def test_one_tokenizer_with_a_padded_head_names_its_size(student_tok: Tokenizer) -> None:
    with pytest.raises(
        VocabMismatchError, match=r"one tokenizer of 6 tokens.*VocabMap\.padded\(6\)"
    ):
        check_vocab(
            logits(2, 6),
            logits(2, 64),
            student_tokenizer=student_tok,
            teacher_tokenizer=student_tok,
        )
    with pytest.raises(VocabMismatchError, match="student logits have 5 vocabulary rows"):
        check_vocab(
            logits(2, 5),
            logits(2, 64),
            student_tokenizer=student_tok,
            teacher_tokenizer=student_tok,
        )
    check_vocab(logits(2, 64), logits(2, 64), VocabMap.padded(6))


# -------------------------------------------------------------------------------------------
# two tokenizers
# -------------------------------------------------------------------------------------------


def test_intersection_of_two_real_tokenizers(
    student_tok: Tokenizer, teacher_tok: PreTrainedTokenizerFast
) -> None:
    vmap = VocabMap.from_tokenizers(student_tok, teacher_tok)
    assert vmap.size == len(SHARED)
    assert vmap.tokens == tuple(tok for tok, _, _ in SHARED)
    assert vmap.student_index.tolist() == [i for _, i, _ in SHARED]
    assert vmap.teacher_index.tolist() == [j for _, _, j in SHARED]
    assert (vmap.student_vocab_size, vmap.teacher_vocab_size) == (6, 11)
    # without normalisation "Ġcat" and "▁cat" differ
    exact = VocabMap.from_tokenizers(student_tok, teacher_tok, normalize=None)
    assert exact.tokens == ("the", "sat", "a")


def test_kl_on_the_shared_tokens_matches_a_hand_written_reference(
    student_tok: Tokenizer, teacher_tok: PreTrainedTokenizerFast
) -> None:
    vmap = VocabMap.from_tokenizers(student_tok, teacher_tok)
    student = logits(2, 3, 8).requires_grad_(True)  # 6 tokens, head padded to 8
    teacher = logits(2, 3, 16, seed=1)  # 11 tokens, head padded to 16
    s, t = vmap(student, teacher)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    loss = KF.kl_div(s, t, temperature=2.0, mask=mask)
    cols_s = [i for _, i, _ in SHARED]
    cols_t = [j for _, _, j in SHARED]
    kept = mask.numpy()
    ref = 4.0 * np_kl_mean(
        student.detach().numpy()[kept][:, cols_s] / 2.0, teacher.numpy()[kept][:, cols_t] / 2.0
    )
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    unshared = [c for c in range(8) if c not in cols_s]
    assert torch.all(student.grad[..., unshared] == 0)
    assert torch.any(student.grad[..., cols_s] != 0)


def test_shared_mass_is_what_the_intersection_keeps(
    student_tok: Tokenizer, teacher_tok: PreTrainedTokenizerFast
) -> None:
    vmap = VocabMap.from_tokenizers(student_tok, teacher_tok)
    teacher = logits(4, 11, seed=3)
    p = torch.softmax(teacher.double(), -1)
    expected = p[:, [j for _, _, j in SHARED]].sum(-1)
    torch.testing.assert_close(vmap.shared_mass(teacher).double(), expected, rtol=1e-5, atol=0)
    padded = torch.cat([teacher, torch.full((4, 5), float("-inf"))], -1)
    torch.testing.assert_close(VocabMap.padded(11).shared_mass(padded), torch.ones(4))


def test_different_tokenizers_are_refused_with_what_differs(
    student_tok: Tokenizer, teacher_tok: PreTrainedTokenizerFast
) -> None:
    # the same head size would let a plain size check pass: the tokenizers tell the truth
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(
            logits(2, 16),
            logits(2, 16),
            student_tokenizer=student_tok,
            teacher_tokenizer=teacher_tok,
        )
    text = str(err.value)
    assert "the student's tokenizer has 6 tokens, the teacher's 11" in text
    assert "3 token strings are in both" in text
    moved = "'the' (student 1, teacher 7), 'sat' (student 4, teacher 9), 'a' (student 5, teacher 1)"
    assert f"3 of them at different ids, e.g. {moved};" in text
    assert "3 only in the student's, e.g. '[UNK]', 'Ġcat', 'dog'" in text
    assert "8 only in the teacher's, e.g. '<unk>', '▁cat', 't', 'h', 'e', ..." in text
    assert "VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)" in text
    check_vocab(
        logits(2, 16),
        logits(2, 16),
        VocabMap.from_tokenizers(student_tok, teacher_tok),
        student_tokenizer=student_tok,
        teacher_tokenizer=teacher_tok,
    )


def test_a_map_refuses_logits_smaller_than_its_vocabulary(
    student_tok: Tokenizer, teacher_tok: PreTrainedTokenizerFast
) -> None:
    vmap = VocabMap.from_tokenizers(student_tok, teacher_tok)
    with pytest.raises(VocabMismatchError, match=r"teacher logits have 10 .* needs 11"):
        vmap(logits(2, 6), logits(2, 10))


def test_identical_vocabularies_map_to_a_slice(student_tok: Tokenizer) -> None:
    vmap = VocabMap.from_tokenizers(student_tok, dict(STUDENT_VOCAB))
    assert repr(vmap) == "VocabMap.padded(6)" and vmap.tokens is None
    assert VocabDiff.of(student_tok, STUDENT_VOCAB).same
    student = logits(2, 8)
    assert vmap(student, logits(2, 6))[0]._base is student  # a view, not a copy


def test_vocabulary_reading_and_normalisation() -> None:
    assert normalize_token("Ġthe") == normalize_token("▁the") == " the"
    assert normalize_token("Ċ") == "Ċ"  # only the space markers
    # two spellings of one string in one vocabulary: the lowest id is kept
    vmap = VocabMap.from_tokenizers({"x": 0, " a": 4, "Ġa": 2}, {"y": 0, "▁a": 1})
    assert vmap.student_index.tolist() == [2] and vmap.teacher_index.tolist() == [1]
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        vocabulary(42)
    with pytest.raises(ValueError, match="'b': -1"):
        vocabulary({"a": 0, "b": -1})
    with pytest.raises(VocabMismatchError, match="share no token"):
        VocabMap.from_tokenizers({"a": 0}, {"b": 0})
    with pytest.raises(ValueError, match="both are given"):
        check_vocab(logits(1, 2), logits(1, 2), student_tokenizer={"a": 0})


def test_a_map_with_ids_outside_its_vocabulary_is_refused_when_built() -> None:
    with pytest.raises(
        ValueError, match=r"teacher_index holds ids 0..12, but the teacher vocabulary has 10"
    ):
        VocabMap(
            torch.arange(3), torch.tensor([0, 5, 12]), student_vocab_size=8, teacher_vocab_size=10
        )
    with pytest.raises(ValueError, match=r"student_index holds ids -1..1"):
        VocabMap(
            torch.tensor([-1, 0, 1]), torch.arange(3), student_vocab_size=8, teacher_vocab_size=10
        )
