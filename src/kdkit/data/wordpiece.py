"""A BERT-style WordPiece tokenizer trained once on a text set's training split, and cached.

:func:`train_wordpiece` trains Hugging Face ``tokenizers``' WordPiece (BERT's normaliser:
lower case, accents stripped; BERT's pre-tokenizer; ``[CLS] text [SEP]`` templates) and wraps it
as a ``transformers.PreTrainedTokenizerFast``, so it pads, truncates and ships with a model
through ``save_pretrained``. Training is deterministic for given texts, vocabulary size and
``tokenizers`` version. :func:`cached_wordpiece` keeps the trained ``tokenizer.json`` in the user
cache directory (:func:`kdkit.data.tokenizer.default_cache_dir` ``/tokenizers``), keyed by a
sha256 of the texts, the vocabulary size and the ``tokenizers`` version, written atomically.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdkit.atomic import atomic_write_text
from kdkit.data.tokenizer import default_cache_dir

__all__ = ["SPECIAL_TOKENS", "cached_wordpiece", "train_wordpiece", "wrap_tokenizer"]

logger = logging.getLogger(__name__)

# [PAD] first: id 0 is BERT's pad_token_id default.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: Sequence[str], vocab_size: int) -> Any:
    """A WordPiece ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens (the 5 special
    tokens included) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"train_wordpiece: vocab_size must be an int above {len(SPECIAL_TOKENS)} (the special "
            f"tokens {', '.join(SPECIAL_TOKENS)}), got {vocab_size!r}; e.g. 4096"
        )
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """``tokenizer`` (a ``tokenizers.Tokenizer`` of :func:`train_wordpiece`) as a
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


def cached_wordpiece(
    texts: Sequence[str], vocab_size: int, max_length: int, cache_dir: str | Path | None = None
) -> Any:
    """:func:`train_wordpiece` on ``texts``, stored in ``cache_dir`` and reused; an unreadable
    cached file is trained again and replaced. Returns the wrapped tokenizer
    (:func:`wrap_tokenizer`)."""
    import tokenizers
    from tokenizers import Tokenizer

    digest = hashlib.sha256()
    for text in texts:
        digest.update(f"{len(text)}\0{text}".encode())
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    file = folder / (
        f"wordpiece-{digest.hexdigest()[:16]}-v{vocab_size}-tokenizers{tokenizers.__version__}.json"
    )
    tokenizer = None
    if file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # a damaged file fails in several ways (JSON, schema)
            logger.warning("cached_wordpiece: %s is unreadable (%s); training it again", file, exc)
    if tokenizer is None:
        tokenizer = train_wordpiece(texts, vocab_size)
        atomic_write_text(file, tokenizer.to_str())
    return wrap_tokenizer(tokenizer, max_length)
