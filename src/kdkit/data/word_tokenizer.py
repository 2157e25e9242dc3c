"""A BERT-style word-level tokenizer built once from a text set's training split, and cached.

:func:`train_word_tokenizer` splits texts as BERT does (lower case, accents stripped, words and
punctuation apart), keeps the ``vocab_size - 5`` most frequent words (ties broken by the word,
so the vocabulary is a pure function of the texts: ``tokenizers``' own WordPiece trainer breaks
ties in hash order and gives another vocabulary on each run), maps the rest to ``[UNK]`` and
adds ``[CLS] text [SEP]`` templates. :func:`wrap_tokenizer` makes it a
``transformers.PreTrainedTokenizerFast``, so it pads, truncates and ships with a model through
``save_pretrained``. :func:`cached_word_tokenizer` keeps the ``tokenizer.json`` in the user cache
directory (:func:`kdkit.data.tokenizer.default_cache_dir` ``/tokenizers``), keyed by a sha256 of
the texts, the vocabulary size and the ``tokenizers`` version, written atomically.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdkit.atomic import atomic_write_text
from kdkit.data.tokenizer import default_cache_dir

__all__ = ["SPECIAL_TOKENS", "cached_word_tokenizer", "train_word_tokenizer", "wrap_tokenizer"]

logger = logging.getLogger(__name__)

# [PAD] first: id 0 is BERT's pad_token_id default.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_word_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A word-level ``tokenizers.Tokenizer`` of ``vocab_size`` tokens at most: the 5 special
    tokens, then the most frequent words of ``texts`` (most frequent first, ties by the word)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"train_word_tokenizer: vocab_size must be an int above {len(SPECIAL_TOKENS)} (the "
            f"special tokens {', '.join(SPECIAL_TOKENS)}), got {vocab_size!r}; e.g. 2048"
        )
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    ranked = sorted(counts, key=lambda word: (-counts[word], word))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in ranked[: vocab_size - len(SPECIAL_TOKENS)]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces, as BERT's decoder does
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """``tokenizer`` (a ``tokenizers.Tokenizer`` of :func:`train_word_tokenizer`) as a
    ``transformers.PreTrainedTokenizerFast`` that truncates to ``max_length`` tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def cached_word_tokenizer(
    texts: Sequence[str], vocab_size: int, max_length: int, cache_dir: str | Path | None = None
) -> Any:
    """:func:`train_word_tokenizer` on ``texts``, stored in ``cache_dir`` and reused; an unreadable
    cached file is trained again and replaced. Returns the wrapped tokenizer
    (:func:`wrap_tokenizer`)."""
    import tokenizers
    from tokenizers import Tokenizer

    digest = hashlib.sha256()
    for text in texts:
        digest.update(f"{len(text)}\0{text}".encode())
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    file = folder / (
        f"words-{digest.hexdigest()[:16]}-v{vocab_size}-tokenizers{tokenizers.__version__}.json"
    )
    tokenizer = None
    if file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # a damaged file fails in several ways (JSON, schema)
            logger.warning(
                "cached_word_tokenizer: %s is unreadable (%s); training it again", file, exc
            )
    if tokenizer is None:
        tokenizer = train_word_tokenizer(texts, vocab_size)
        atomic_write_text(file, tokenizer.to_str())
    return wrap_tokenizer(tokenizer, max_length)
