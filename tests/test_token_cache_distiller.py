"""A TokenCache as the Distiller's teacher (issue 10, item 2): its per-token top-k signal feeds
SparseKLDivLoss terms by sequence index, with the value of the loss called by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit import Distiller, Term
from kdkit.cache import TokenCache
from kdkit.data.text import TokenSequences, collate_sequences
from kdkit.losses import CrossEntropyLoss, KLDivLoss, SparseKLDivLoss
from kdkit.vocab import VocabMap

V = 30


class TinyLM(nn.Module):
    """A causal LM: position t sees tokens <= t (a running mean of embeddings)."""

    def __init__(self, vocab: int = V, rows: int | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, rows or vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).cumsum(1)
        return 3 * self.head(h / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> TokenCache:
    path = tmp_path_factory.mktemp("tokens") / "cache"
    return TokenCache.build(TinyLM(seed=1), _data(), path, top_k=5, progress=False)


def _data() -> TokenSequences:
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (6, 13, 9, 20, 4)]
    return TokenSequences(docs, max_length=8)


def _batches():
    return DataLoader(_data(), batch_size=3, collate_fn=collate_sequences)


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_value_and_gradient_equal_the_sparse_loss_on_the_cached_tokens(cache, ignore_index):
    student = TinyLM(seed=2)
    loss = SparseKLDivLoss(2.0, ignore_index)
    distiller = Distiller(student, cache, [Term(SparseKLDivLoss(2.0, ignore_index))])
    seen, padded = 0, 0
    for ids, labels, index in _batches():
        got = distiller(ids, labels, index=index).loss
        (grad,) = torch.autograd.grad(got, student.head.weight)
        cached = cache.teacher_output(index)
        padded += not bool(cached.mask.all())  # the cache's mask matters there
        kwargs = {"target": labels} if ignore_index is not None else {}
        expected = loss(student(ids), cached, mask=cached.mask, **kwargs)
        (expected_grad,) = torch.autograd.grad(expected, student.head.weight)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(grad, expected_grad)
        seen += 1
    assert (seen, padded) == (3, 1)


def test_padded_student_head_and_a_student_term_beside(cache):
    student = TinyLM(rows=32, seed=2)
    terms = [Term(SparseKLDivLoss()), Term(CrossEntropyLoss(), teacher=None, target=True)]
    distiller = Distiller(student, cache, terms, vocab_map=VocabMap.padded(V))
    ids, labels, index = next(iter(_batches()))
    out = distiller(ids, labels, index=index)
    cached = cache.teacher_output(index)
    logits = student(ids)
    expected = SparseKLDivLoss()(logits[..., :V], cached, mask=cached.mask)
    torch.testing.assert_close(out.terms["sparse_kl_div"], expected)
    torch.testing.assert_close(out.terms["cross_entropy"], CrossEntropyLoss()(logits, labels))


def test_what_a_token_cache_cannot_serve_is_refused(cache):
    student = TinyLM(seed=2)
    with pytest.raises(ValueError, match="KLDivLoss.*use kdkit.losses.SparseKLDivLoss"):
        Distiller(student, cache, [Term(KLDivLoss())])
    distiller = Distiller(student, cache, [Term(SparseKLDivLoss())])
    ids, labels, index = next(iter(_batches()))
    with pytest.raises(ValueError, match="sample indices"):
        distiller(ids, labels)
    with pytest.raises(ValueError, match="collate_sequences"):
        distiller(torch.cat([ids, ids[:, :1]], dim=1), labels, index=index)
    with pytest.raises(ValueError, match="teacher 0 predicts 30 classes"):
        Distiller(TinyLM(rows=32), cache, [Term(SparseKLDivLoss())])(ids, labels, index=index)
