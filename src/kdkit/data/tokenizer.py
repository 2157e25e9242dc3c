"""Tokenizers for the text corpora: a character vocabulary and a byte-level BPE.

Both give ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``
(the id appended after each document, or None) and ``identity`` (a sha256 of the tokenizer's
definition, for cache fingerprints such as :class:`kdkit.cache.TokenCache`'s ``tokenizer_id``).

The BPE is trained with Hugging Face ``tokenizers`` on the train split only. Training is
deterministic for a given input, vocabulary size and ``tokenizers`` version (the tests train it
twice and compare the vocabularies); :func:`stdlib_bpe` stores the trained ``tokenizer.json``
atomically in the user cache directory, keyed by the corpus sha256, the vocabulary size and the
``tokenizers`` version, and reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from kdkit.atomic import atomic_write_text

__all__ = [
    "BPETokenizer",
    "CharVocab",
    "default_cache_dir",
    "encode_documents",
    "stdlib_bpe",
    "train_bpe",
]

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def default_cache_dir() -> Path:
    """``$KDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdkit``, else ``~/.cache/kdkit``."""
    if os.environ.get("KDKIT_CACHE_DIR"):
        return Path(os.environ["KDKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdkit"


class CharVocab:
    """One id per character seen in the training texts (sorted by code point); id 0 is ``<unk>``
    for characters never seen. No end-of-document token (``eos_id`` is None)."""

    eos_id: int | None = None

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharVocab: chars must be distinct characters")
        self.chars = chars
        self._ids = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def identity(self) -> str:
        return hashlib.sha256(f"char:{self.chars}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)

    def __repr__(self) -> str:
        return f"CharVocab(vocab_size={self.vocab_size})"


class BPETokenizer:
    """A trained ``tokenizers.Tokenizer`` (byte-level BPE) with the interface of
    :class:`CharVocab`; ``<|endoftext|>`` (id 0) ends each document."""

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"BPETokenizer: the tokenizer has no {EOS!r} token")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def identity(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(texts: Sequence[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (256 bytes + merges + ``<|endoftext|>``)
    trained on ``texts``, in order; the same texts give the same vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if not isinstance(vocab_size, int) or vocab_size <= minimum:
        raise ValueError(
            f"train_bpe: vocab_size must be an int above {minimum} (256 bytes and "
            f"{EOS!r}), got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return BPETokenizer(tokenizer)


def stdlib_bpe(corpus, vocab_size: int = 4096, cache_dir: str | Path | None = None) -> BPETokenizer:
    """The BPE of ``vocab_size`` tokens trained on ``corpus.train`` (a
    :class:`kdkit.data.stdlib_text.StdlibCorpus`), cached in ``cache_dir``
    (default :func:`default_cache_dir` ``/tokenizers``) by corpus sha256, vocabulary size and
    ``tokenizers`` version; an unreadable cached file is trained again and replaced."""
    import tokenizers
    from tokenizers import Tokenizer

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    file = folder / (
        f"stdlib-bpe-{corpus.sha256[:16]}-v{vocab_size}-tokenizers{tokenizers.__version__}.json"
    )
    if file.is_file():
        try:
            return BPETokenizer(Tokenizer.from_file(str(file)))
        except Exception as exc:  # a damaged file fails in several ways (JSON, schema)
            logger.warning("stdlib_bpe: %s is unreadable (%s); training it again", file, exc)
    bpe = train_bpe([doc.text for doc in corpus.train], vocab_size)
    atomic_write_text(file, bpe.tokenizer.to_str())
    return bpe


def encode_documents(documents: Iterable[str], tokenizer: CharVocab | BPETokenizer) -> list[Tensor]:
    """Each document's ids (int64), with ``tokenizer.eos_id`` appended when it has one."""
    out = []
    for text in documents:
        ids = tokenizer.encode(text)
        if tokenizer.eos_id is not None:
            ids = [*ids, tokenizer.eos_id]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out
