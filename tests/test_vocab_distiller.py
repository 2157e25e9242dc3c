"""The Distiller with vocabularies that differ: a padded lm_head, two tokenizers (kdkit.vocab)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit import Distiller, Term
from kdkit.losses import CrossEntropyLoss, HintonLoss, KLDivLoss
from kdkit.vocab import VocabMap


class TokenLM(nn.Module):
    """[B, L] token ids -> [B, L, V] logits."""

    def __init__(self, vocab_rows: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(96, 8)
        self.head = nn.Linear(8, vocab_rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    return ids, ids.roll(-1, dims=1)


def test_padded_student_head_fails_without_a_map_and_names_the_fix():
    ids, _ = _batch()
    distiller = Distiller(TokenLM(128, 0), TokenLM(96, 1), [Term(KLDivLoss(2.0))])
    with pytest.raises(ValueError, match=r"VocabMap\.padded\(len\(tokenizer\)\)"):
        distiller(ids)


def test_padded_head_is_sliced_for_teacher_terms_and_kept_whole_for_student_terms():
    ids, labels = _batch()
    student, teacher = TokenLM(128, 0), TokenLM(96, 1)
    distiller = Distiller(
        student,
        teacher,
        {
            "kd": Term(KLDivLoss(2.0)),
            "ce": Term(CrossEntropyLoss(), teacher=None, target=True),
        },
        vocab_map=VocabMap.padded(96),
    )
    out = distiller(ids, labels)
    s, t = student(ids), teacher(ids).detach()
    assert torch.allclose(out.terms["kd"], KLDivLoss(2.0, chunk_size=None)(s[..., :96], t))
    full_ce = nn.functional.cross_entropy(s.reshape(-1, 128), labels.reshape(-1))
    assert torch.allclose(out.terms["ce"], full_ce)
    assert out.logits.shape[-1] == 128  # the output keeps the student's own logits
    distiller.zero_grad()
    distiller(ids, labels).loss.backward()
    assert student.head.weight.grad[96:].abs().sum() > 0  # the CE term trains the whole head


def test_label_reading_teacher_term_refused_with_a_tokenizer_intersection():
    student_vocab = {f"t{i}": i for i in range(96)}
    teacher_vocab = {f"t{i}": 95 - i for i in range(96)}
    vocab_map = VocabMap.from_tokenizers(student_vocab, teacher_vocab)
    with pytest.raises(ValueError, match="labels index the student's vocabulary"):
        Distiller(TokenLM(96, 0), TokenLM(96, 1), [Term(HintonLoss())], vocab_map=vocab_map)
    kd = Distiller(TokenLM(96, 0), TokenLM(96, 1), [Term(KLDivLoss())], vocab_map=vocab_map)
    ids, _ = _batch()
    s, t = kd.student(ids), kd.teacher(ids).detach()
    expected = KLDivLoss(chunk_size=None)(s, t.flip(-1))  # teacher id 95 - i is student id i
    assert torch.allclose(kd(ids).terms["kl_div"], expected, atol=1e-6)
