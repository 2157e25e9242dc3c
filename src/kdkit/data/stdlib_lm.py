"""``StdlibLMDataModule``: the Python standard library's source as a language-modelling task.

The corpus is :func:`kdkit.data.stdlib_text.load_stdlib_corpus` (a fixed list of files present in
every Python 3.10-3.14, a fixed split by file name); its sha256 and the Python version are in
:meth:`StdlibLMDataModule.describe`, to be recorded with every result. Each split's documents are
tokenized and concatenated into one stream, cut into blocks of ``block_size`` tokens
(:class:`kdkit.data.text.TokenBlocks`): batches are ``(input_ids [B, L], labels [B, L], index
[B])`` with the labels shifted once, here (``labels[:, t]`` is the token after
``input_ids[:, t]``); no model or loss shifts them again.

Tokenizers: ``"char"`` (the default: one id per character of the train split, so bits per
character is bits per token and no tokenizer is trained or cached) or ``"bpe"`` (a byte-level BPE
of ``vocab_size`` tokens trained on the train split with Hugging Face ``tokenizers``, cached by
:func:`kdkit.data.tokenizer.stdlib_bpe`).

The training shuffle is :class:`~kdkit.data.sampler.EpochShuffleSampler` (a function of ``seed``
and the epoch): the scratch and the distilled student see the same batches, and a resumed run
the batches the uninterrupted one saw. ``eval_blocks`` caps the validation and test sets at
their first blocks (evaluation time), ``None`` keeps the whole split.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from kdkit.data.sampler import EpochShuffleSampler
from kdkit.data.stdlib_text import StdlibCorpus, load_stdlib_corpus
from kdkit.data.text import IGNORE_INDEX, TokenBlocks
from kdkit.data.tokenizer import BPETokenizer, CharVocab, encode_documents, stdlib_bpe

__all__ = ["TOKENIZERS", "StdlibLMDataModule"]

TOKENIZERS = ("char", "bpe")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or null (the whole split)" if allow_none else "a positive int"
        raise ValueError(f"data.{name} must be {allowed}, got {value!r}")


class StdlibLMDataModule(L.LightningDataModule):
    """Blocks of tokens of the standard library corpus, for causal language models.

    ``num_classes`` is the vocabulary size and ``input_shape`` is ``(1, 1, block_size)`` (a
    sequence of ``block_size`` ids in the model-spec format that kdkit's model files store);
    both are known after construction, which reads the corpus (a few MB, well under a second)
    and, for ``tokenizer="bpe"``, trains or loads the cached tokenizer.
    """

    def __init__(
        self,
        name: str = "stdlib_lm",
        tokenizer: str = "char",
        vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        eval_blocks: int | None = 512,
        num_workers: int = 0,
        seed: int = 0,
        stdlib_dir: str | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise ValueError(
                f"data.tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}; pick char "
                "(one id per character) or bpe (a byte-level BPE of data.vocab_size tokens)."
            )
        for key, value in (("block_size", block_size), ("batch_size", batch_size)):
            _positive(key, value)
        _positive("eval_batch_size", eval_batch_size, allow_none=True)
        _positive("eval_blocks", eval_blocks, allow_none=True)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"data.seed must be an int >= 0 (it seeds the shuffle), got {seed!r}")
        self.name = name
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_blocks = eval_blocks
        self.num_workers = num_workers
        self.seed = seed
        self.corpus: StdlibCorpus = load_stdlib_corpus(stdlib_dir)
        self.tokenizer: CharVocab | BPETokenizer = (
            CharVocab.from_texts(doc.text for doc in self.corpus.train)
            if tokenizer == "char"
            else stdlib_bpe(self.corpus, vocab_size)
        )
        self.tokenizer_kind = tokenizer
        self.num_classes: int = self.tokenizer.vocab_size
        self.input_shape: tuple[int, int, int] = (1, 1, block_size)
        self._splits: dict[str, Any] | None = None

    def prepare(self) -> dict[str, Any]:
        """Tokenize the splits once (idempotent): ``{"train", "val", "test"}`` datasets."""
        if self._splits is None:
            splits: dict[str, Any] = {}
            for split in ("train", "val", "test"):
                texts = [doc.text for doc in self.corpus.split(split)]
                blocks = TokenBlocks(
                    torch.cat(encode_documents(texts, self.tokenizer)), self.block_size
                )
                if split != "train" and self.eval_blocks is not None:
                    blocks = Subset(blocks, range(min(self.eval_blocks, len(blocks))))
                splits[split] = blocks
            self._splits = splits
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def characters(self, labels: Tensor) -> int:
        """How many characters the kept labels of a batch stand for (the bits-per-character
        denominator): one per token for ``char``; the length of each row's decoded text for
        ``bpe`` (a character cut by a block boundary counts in both blocks)."""
        keep = labels != IGNORE_INDEX
        if isinstance(self.tokenizer, CharVocab):
            return int(keep.sum())
        rows = zip(labels, keep, strict=True)
        return sum(len(self.tokenizer.decode(row[k].tolist())) for row, k in rows)

    def describe(self) -> dict[str, Any]:
        """What identifies the data of a result: the corpus (sha256, Python version, files and
        characters per split), the tokenizer and the blocks."""
        splits = self.prepare()
        return {
            **self.corpus.describe(),
            "tokenizer": self.tokenizer_kind,
            "vocab_size": self.num_classes,
            "tokenizer_sha256": self.tokenizer.identity,
            "block_size": self.block_size,
            "blocks": {split: len(data) for split, data in splits.items()},
        }

    def _loader(self, split: str) -> DataLoader:
        dataset = self.prepare()[split]
        train = split == "train"
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
