"""Text classification data: tokenized texts batched as Hugging Face dicts.

A :class:`TokenizedTexts` item is ``(input_ids [L], label)``; the registry wraps it in
:class:`~kdkit.data.IndexedDataset` (``(input_ids, label, index)``) and :func:`collate_tokens`
right-pads a batch into ``{"input_ids": [B, L], "attention_mask": [B, L], "labels": [B],
"index": [B]}``, the batch every kdkit layer takes (:func:`kdkit.batch.unpack_batch`: the model
gets ``input_ids`` and ``attention_mask`` as keyword arguments).

Registered data set ``stdlib_docstrings`` (:mod:`kdkit.data.docstrings`): the standard
library's docstrings labelled by package, tokenized with a word-level tokenizer built from its
training split (:mod:`kdkit.data.word_tokenizer`); ``DataSplits.tokenizer`` is that tokenizer,
to ship with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.data.docstrings import PACKAGES, load_docstrings
from kdkit.data.registry import DatasetMeta, DataSplits, register_dataset
from kdkit.data.word_tokenizer import cached_word_tokenizer

__all__ = ["TokenizedTexts", "collate_tokens", "stdlib_docstrings"]


class TokenizedTexts(Dataset):
    """``texts`` tokenized once (truncated to the tokenizer's ``model_max_length``); item ``i``
    is ``(input_ids [L_i] int64, labels[i])``."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any) -> None:
        if len(texts) != len(labels):
            raise ValueError(
                f"TokenizedTexts: {len(texts)} texts but {len(labels)} labels; give one label "
                "per text"
            )
        encoded = tokenizer(list(texts), truncation=True)["input_ids"] if texts else []
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.input_ids[index], self.labels[index]


def collate_tokens(batch: Sequence[tuple[Tensor, Any, int]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad ``(input_ids, label, index)`` items into one dict batch: ``input_ids`` padded
    with ``pad_id``, ``attention_mask`` 1 on real tokens, ``labels`` and ``index`` stacked."""
    length = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, _, _) in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.as_tensor([y for _, y, _ in batch], dtype=torch.long),
        "index": torch.as_tensor([int(i) for _, _, i in batch], dtype=torch.long),
    }


def _spread(items: Sequence[Any], limit: int | None) -> Sequence[Any]:
    """``limit`` items evenly spaced over ``items`` (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(items):
        return items
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"a sample limit must be a positive int or null, got {limit!r}")
    return [items[i * len(items) // limit] for i in range(limit)]


def _docstrings_meta(max_length: int = 64, **_options: Any) -> DatasetMeta:
    return DatasetMeta(len(PACKAGES), (int(max_length),))


@register_dataset("stdlib_docstrings", meta=_docstrings_meta)
def stdlib_docstrings(
    vocab_size: int = 4096,
    max_length: int = 64,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    stdlib_dir: str | None = None,
    cache_dir: str | None = None,
) -> DataSplits:
    """The standard library's docstrings labelled by package (:mod:`kdkit.data.docstrings`).

    ``vocab_size``: the tokenizer's vocabulary (the most frequent words of the full training
    split, cached);
    ``max_length``: tokens per text, ``[CLS]`` and ``[SEP]`` included (longer ones are cut);
    ``train_samples`` / ``eval_samples``: keep that many evenly spaced samples of the training /
    each evaluation split (smoke runs); ``stdlib_dir``: another CPython ``Lib/`` directory;
    ``cache_dir``: where the tokenizer is cached.
    """
    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(
            f"data.max_length must be an int >= 3 ([CLS], a token, [SEP]), got {max_length!r}"
        )
    docs = load_docstrings(Path(stdlib_dir) if stdlib_dir else None)
    tokenizer = cached_word_tokenizer(
        [d.text for d in docs.train], vocab_size, max_length, cache_dir=cache_dir
    )

    def dataset(samples: Sequence[Any]) -> TokenizedTexts:
        return TokenizedTexts([d.text for d in samples], [d.label for d in samples], tokenizer)

    return DataSplits(
        train=dataset(_spread(docs.train, train_samples)),
        val=dataset(_spread(docs.val, eval_samples)),
        test=dataset(_spread(docs.test, eval_samples)),
        num_classes=len(docs.packages),
        input_shape=(max_length,),
        class_names=list(docs.packages),
        collate_fn=partial(collate_tokens, pad_id=tokenizer.pad_token_id),
        tokenizer=tokenizer,
    )
