"""Token datasets for causal language models: fixed-length blocks and variable-length sequences.

Every item is ``(input_ids [L], labels [L], index)`` with the labels already shifted once:
``labels[t]`` is the token that follows ``input_ids[t]``, so they line up with the logits of
position ``t`` (``logits[:, t]`` predicts ``labels[:, t]``) and no loss shifts them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IGNORE_INDEX", "TokenBlocks", "TokenSequences", "collate_sequences"]

IGNORE_INDEX = -100
"""The label of a padded position (the ``ignore_index`` of kdkit's and torch's losses)."""


def _check_length(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TokenBlocks(Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens of one token stream.

    Block ``i`` reads ``ids[i * L : i * L + L + 1]``: inputs are its first ``L`` tokens, labels
    its last ``L``. The stream's tail shorter than a block is left out.
    """

    def __init__(self, ids: Tensor, block_size: int) -> None:
        self.block_size = _check_length("TokenBlocks block_size", block_size)
        if not isinstance(ids, Tensor) or ids.dim() != 1:
            raise ValueError(
                "TokenBlocks: ids must be a 1-D tensor of token ids, got "
                f"{type(ids).__name__} of shape {tuple(getattr(ids, 'shape', ()))}; "
                "concatenate the documents first (torch.cat(encode_documents(...)))"
            )
        self.ids = ids.long()
        self.num_blocks = (len(ids) - 1) // block_size

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"TokenBlocks index {index} out of range [0, {self.num_blocks})")
        start = index * self.block_size
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:], index


class TokenSequences(Dataset):
    """Each document cut into pieces of at most ``max_length`` inputs: variable-length items.

    A document of ``n`` tokens gives ``ceil((n - 1) / max_length)`` pieces (its last one
    shorter); documents of fewer than 2 tokens give none. ``lengths[i]`` is item ``i``'s length.
    Batch them with :func:`collate_sequences`.
    """

    def __init__(self, documents: Sequence[Tensor], max_length: int) -> None:
        self.max_length = _check_length("TokenSequences max_length", max_length)
        self.documents = [d.long() for d in documents]
        self.pieces: list[tuple[int, int, int]] = []  # (document, start, length)
        for d, doc in enumerate(self.documents):
            for start in range(0, len(doc) - 1, max_length):
                self.pieces.append((d, start, min(max_length, len(doc) - 1 - start)))
        self.lengths = [length for _, _, length in self.pieces]

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        d, start, length = self.pieces[index]
        chunk = self.documents[d][start : start + length + 1]
        return chunk[:-1], chunk[1:], index


def collate_sequences(
    batch: Sequence[tuple[Tensor, Tensor, int]], pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad a batch of ``(input_ids, labels, index)``: inputs with ``pad_id``, labels with
    :data:`IGNORE_INDEX`; returns ``(input_ids [B, L], labels [B, L], index [B])``.

    Right padding leaves a causal model's outputs at the real positions unchanged, so no
    attention mask is needed; the losses skip the padded positions through the labels.
    """
    length = max(len(x) for x, _, _ in batch)
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y, _) in enumerate(batch):
        inputs[row, : len(x)] = x
        labels[row, : len(y)] = y
    return inputs, labels, torch.tensor([int(i) for _, _, i in batch])
