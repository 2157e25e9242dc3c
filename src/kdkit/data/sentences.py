"""Batches of raw sentences, tokenized when collated: dict batches for Hugging Face encoders.

``SentenceDataModule(sentences, tokenizer, max_length, batch_size, seed)`` serves the training
sentences in batches of similar length (:class:`LengthGroupedBatches`: padding to the longest
sentence of a random batch would triple the tokens a CPU step computes on docstrings), in an
order that is a pure function of ``(seed, epoch)``, so a resumed run sees the batches the
uninterrupted one saw. Each batch is the tokenizer's output for its sentences, padded to the
longest one and truncated at ``max_length`` tokens: ``{"input_ids", "attention_mask"[,
"token_type_ids"]}``, which a Hugging Face encoder takes as keyword arguments and whose
``attention_mask`` the Distiller reads as the token mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from kdkit.data.sampler import EpochShuffleSampler

__all__ = ["LengthGroupedBatches", "SentenceDataModule", "TokenizeBatch"]


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices whose ``lengths`` are close, reshuffled every epoch.

    Each epoch's shuffle (:class:`~kdkit.data.sampler.EpochShuffleSampler`: a function of
    ``(seed, epoch)``) is cut into groups of ``group`` batches; each group is sorted by length,
    longest first, and cut into batches (Hugging Face Trainer's ``group_by_length``). Batches
    stay random draws of the data; within one, little is padding.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = 50
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = group
        self.order = EpochShuffleSampler(self.lengths, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose batches ``__iter__`` yields (Lightning calls it before each epoch)."""
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.order)
        span = self.batch_size * self.group
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            for first in range(0, len(chunk), self.batch_size):
                yield chunk[first : first + self.batch_size]

    def __len__(self) -> int:
        span = self.batch_size * self.group
        full, rest = divmod(len(self.lengths), span)
        return full * self.group + -(-rest // self.batch_size)


class TokenizeBatch:
    """A DataLoader ``collate_fn``: a list of sentences -> the tokenizer's padded tensors."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (tokens, [CLS] and [SEP] included), got "
                f"{max_length!r}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, sentences: Sequence[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(sentences),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(batch)


class SentenceDataModule(L.LightningDataModule):
    """The training sentences as tokenized dict batches (see the module docstring)."""

    def __init__(
        self,
        sentences: Sequence[str],
        tokenizer: Any,
        max_length: int = 128,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not sentences:
            raise ValueError("SentenceDataModule: no training sentences; give at least one")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SentenceDataModule: batch_size must be >= 1, got {batch_size!r}")
        self.sentences = list(sentences)
        self.collate = TokenizeBatch(tokenizer, max_length)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.num_workers = int(num_workers)

    def train_dataloader(self) -> DataLoader:
        lengths = [len(s) for s in self.sentences]  # characters: close enough to tokens
        return DataLoader(
            self.sentences,  # type: ignore[arg-type]  (a list is a map-style data set)
            batch_sampler=LengthGroupedBatches(lengths, self.batch_size, self.seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )
