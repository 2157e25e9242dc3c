"""Sentences every machine has: the Python standard library's docstrings, paragraph by paragraph.

The documents are those of :mod:`kdkit.data.stdlib_text` (a fixed list of files, split by file
name). Each module, class and function docstring (read with :mod:`ast`, cleaned like
``inspect.cleandoc``) is cut at blank lines into paragraphs; whitespace runs become one space,
and paragraphs of fewer than ``min_words`` words or starting with a doctest prompt (``>>>``)
are left out. Duplicates are kept once.

* **train**: paragraphs of the ``train`` files;
* **held-out**: paragraphs of the ``val`` and ``test`` files (modules never trained on), with
  any paragraph that also occurs in a training file removed.

Where fewer sentences are asked for than there are, the ones kept are the first by the sha256 of
their text: a fixed choice that does not depend on the file order or on a seed.

    sentences = load_docstring_sentences(train_size=4000, heldout_size=1000)
    sentences.train[:3], len(sentences.heldout), sentences.describe()["sha256"]
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.data.docstrings import documented_nodes
from kdkit.data.stdlib_text import STDLIB_FILES, StdlibCorpus, load_stdlib_corpus

__all__ = ["DocstringSentences", "docstring_paragraphs", "load_docstring_sentences"]

_BLANK_LINE = re.compile(r"\n\s*\n")


def docstring_paragraphs(source: str, min_words: int = 4) -> Iterator[str]:
    """The paragraphs of every docstring in the Python ``source``, in the order of the file."""
    for node in documented_nodes(ast.parse(source)):
        docstring = ast.get_docstring(node, clean=True)
        for paragraph in _BLANK_LINE.split(docstring or ""):
            text = " ".join(paragraph.split())
            if len(text.split()) >= min_words and not text.startswith(">>>"):
                yield text


@dataclass(frozen=True)
class DocstringSentences:
    """Training and held-out sentences, and the corpus they come from (:meth:`describe`)."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    corpus: StdlibCorpus
    min_words: int

    def describe(self) -> dict[str, Any]:
        """What to record with a result: the corpus's sha256 and Python version, the counts."""
        return {
            "sentences": "python-stdlib-docstring-paragraphs",
            "sha256": self.corpus.sha256,
            "python_version": self.corpus.python_version,
            "min_words": self.min_words,
            "train": len(self.train),
            "heldout": len(self.heldout),
            "note": "docstrings differ between Python versions; compare results only at the "
            "same sha256",
        }


def _size(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"load_docstring_sentences: {name} must be a positive int or None (all sentences), "
            f"got {value!r}"
        )
    return value


def _first_by_hash(sentences: Iterable[str], size: int | None) -> tuple[str, ...]:
    ordered = sorted(sentences, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return tuple(ordered[:size] if size is not None else ordered)


@functools.lru_cache(maxsize=4)
def _all_sentences(
    stdlib_dir: str | None, files: tuple[str, ...], min_words: int
) -> tuple[StdlibCorpus, tuple[str, ...], tuple[str, ...]]:
    """The corpus and all its train / held-out sentences: parsed once per process (parsing
    the standard library takes seconds)."""
    corpus = load_stdlib_corpus(stdlib_dir, files)

    def paragraphs(*splits: str) -> dict[str, None]:
        found: dict[str, None] = {}
        for split in splits:
            for document in corpus.split(split):
                found.update(dict.fromkeys(docstring_paragraphs(document.text, min_words)))
        return found

    train = paragraphs("train")
    return corpus, tuple(train), tuple(s for s in paragraphs("val", "test") if s not in train)


def load_docstring_sentences(
    train_size: int | None = None,
    heldout_size: int | None = None,
    min_words: int = 4,
    stdlib_dir: str | Path | None = None,
    files: tuple[str, ...] = STDLIB_FILES,
) -> DocstringSentences:
    """``train_size`` training and ``heldout_size`` held-out sentences (None: all of them).

    Raises ValueError when a split has fewer sentences than asked for, naming how many it has.
    """
    train_size, heldout_size = _size("train_size", train_size), _size("heldout_size", heldout_size)
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise ValueError(f"load_docstring_sentences: min_words must be >= 1, got {min_words!r}")
    corpus, train_all, heldout_all = _all_sentences(
        str(stdlib_dir) if stdlib_dir is not None else None, files, min_words
    )
    for name, size, have in (
        ("train_size", train_size, len(train_all)),
        ("heldout_size", heldout_size, len(heldout_all)),
    ):
        if size is not None and size > have:
            raise ValueError(
                f"load_docstring_sentences: {name}={size} but this Python's standard library "
                f"(Python {corpus.python_version}) has {have} such sentences with min_words="
                f"{min_words}; ask for at most {have} (or None for all of them)"
            )
    return DocstringSentences(
        train=_first_by_hash(train_all, train_size),
        heldout=_first_by_hash(heldout_all, heldout_size),
        corpus=corpus,
        min_words=min_words,
    )
