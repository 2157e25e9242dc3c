"""Student and teacher vocabularies: detect a mismatch, slice a padded head, share the tokens of
two tokenizers.

Logit distillation compares the two models' distributions entry by entry, so entry ``i`` must be
the same token in both. Three cases:

* **Same tokenizer, same head size**: nothing to do.
* **Same tokenizer, padded head**: models often round the lm_head up to a multiple of 64 or 128
  (96 real tokens in a 128-row head). The rows past the tokenizer's size are no tokens; slice
  them off: :meth:`VocabMap.padded` (or :func:`align_logits` with ``vocab_size=``). Only the
  real rows reach the softmax, and the padded rows get zero gradient.
* **Different tokenizers**: :meth:`VocabMap.from_tokenizers` keeps the tokens whose strings are
  identical in both vocabularies (after :func:`normalize_token`) and gathers both models' logits
  onto that shared set. Its limits: the softmax is taken over the shared tokens only, so both
  distributions are renormalised over the intersection (the teacher's mass on tokens the
  student lacks is dropped; :meth:`VocabMap.shared_mass` measures how much). And a loss
  compares position ``l`` of the student with position ``l`` of the teacher, which is only
  right when both tokenizers split the text into the same tokens; two different tokenizers in
  general do not, so the intersection is exact position-wise only for text they split alike.
  Losses that align sequences across tokenizers (ULD, Boizard et al. 2024; DSKD; MinED) are not
  in kdkit yet.

:func:`check_vocab` raises :class:`VocabMismatchError` naming what differs (logit sizes, and with
tokenizers: their sizes, the tokens at different ids, the first few of them) and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# GPT-2-style byte-level BPE writes a leading space as "Ġ" (U+0120), SentencePiece as "▁" (U+2581).
SPACE_MARKERS = ("\u0120", "\u2581")
_SHOWN = 5  # differing tokens quoted in an error


class VocabMismatchError(ValueError):
    """Student and teacher logits (or tokenizers) do not index the same vocabulary."""


def normalize_token(token: str) -> str:
    """``token`` with the space markers of byte-level BPE (``'Ġ'``) and SentencePiece (``'▁'``)
    written as a plain space, so ``'Ġthe'`` and ``'▁the'`` both read ``' the'``.

    Nothing else is normalised: byte-level BPE's other byte characters (``'Ċ'`` for a newline,
    ``'Ã©'`` for ``'é'``), SentencePiece byte-fallback tokens (``'<0x0A>'``) and WordPiece's
    ``'##'`` continuation prefix keep their spelling and match only themselves.
    """
    for marker in SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """The token -> id map of ``tokenizer``: a Hugging Face tokenizer (``transformers``
    ``PreTrainedTokenizerBase`` or ``tokenizers.Tokenizer``; added tokens included) or a mapping
    token -> id."""
    if isinstance(tokenizer, Mapping):
        vocab = dict(tokenizer)
    elif callable(getattr(tokenizer, "get_vocab", None)):
        vocab = dict(tokenizer.get_vocab())
    else:
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (with get_vocab()) or a dict token -> "
            f"id, got {type(tokenizer).__name__}; pass the tokenizer each model was trained with."
        )
    bad = [(tok, i) for tok, i in vocab.items() if isinstance(i, bool) or not isinstance(i, int)]
    bad += [(tok, i) for tok, i in vocab.items() if isinstance(i, int) and i < 0]
    if bad or not vocab:
        shown = ", ".join(f"{tok!r}: {i!r}" for tok, i in bad[:_SHOWN]) or "an empty vocabulary"
        raise ValueError(
            f"a vocabulary maps token strings to ids >= 0; got {shown}; pass the tokenizer "
            "itself or its get_vocab()."
        )
    return vocab


def _size(vocab: Mapping[str, int]) -> int:
    """The number of logit rows the vocabulary needs: its largest id + 1."""
    return max(vocab.values()) + 1


@dataclass(frozen=True)
class VocabDiff:
    """How two vocabularies (token -> id) differ, compared by exact token string."""

    student_size: int
    teacher_size: int
    shared: int
    moved: tuple[tuple[str, int, int], ...]  # (token, student id, teacher id), by student id
    student_only: tuple[str, ...]  # by id
    teacher_only: tuple[str, ...]

    @classmethod
    def of(cls, student_tokenizer: Any, teacher_tokenizer: Any) -> VocabDiff:
        s, t = vocabulary(student_tokenizer), vocabulary(teacher_tokenizer)
        moved = sorted((s[tok], t[tok], tok) for tok in s.keys() & t.keys() if s[tok] != t[tok])
        return cls(
            student_size=_size(s),
            teacher_size=_size(t),
            shared=len(s.keys() & t.keys()),
            moved=tuple((tok, i, j) for i, j, tok in moved),
            student_only=tuple(sorted(s.keys() - t.keys(), key=s.__getitem__)),
            teacher_only=tuple(sorted(t.keys() - s.keys(), key=t.__getitem__)),
        )

    @property
    def same(self) -> bool:
        return not (self.moved or self.student_only or self.teacher_only)

    def describe(self) -> str:
        """What differs, in a sentence: sizes, the tokens at different ids, the tokens in one
        vocabulary only, each with its first few examples."""
        parts = [
            f"the student's tokenizer has {self.student_size} tokens, the teacher's "
            f"{self.teacher_size}; {self.shared} token strings are in both"
        ]
        if self.moved:
            shown = _first([f"{tok!r} (student {i}, teacher {j})" for tok, i, j in self.moved])
            parts.append(f"{len(self.moved)} of them at different ids, e.g. {shown}")
        for side, only in (("student", self.student_only), ("teacher", self.teacher_only)):
            if only:
                shown = _first([repr(tok) for tok in only])
                parts.append(f"{len(only)} only in the {side}'s, e.g. {shown}")
        return "; ".join(parts)


def _first(items: Sequence[str]) -> str:
    """The first few of ``items``, comma-separated."""
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


class VocabMap:
    """Which logit rows of the student and the teacher hold the same tokens, and how to bring
    both logits onto them: ``s, t = vocab_map(student_logits, teacher_logits)`` gives
    ``[..., size]`` logits whose entry ``k`` is one token in both (row ``student_index[k]`` of
    the student, ``teacher_index[k]`` of the teacher). Rows left out get zero gradient.

    Build one with :meth:`padded` (one tokenizer, heads padded past its size) or
    :meth:`from_tokenizers` (two tokenizers: their shared tokens; see the module docstring for
    what that intersection can and cannot do).
    """

    def __init__(
        self,
        student_index: Tensor,
        teacher_index: Tensor,
        *,
        student_vocab_size: int,
        teacher_vocab_size: int,
        tokens: tuple[str, ...] | None = None,
    ) -> None:
        self.student_index = torch.as_tensor(student_index, dtype=torch.long).flatten()
        self.teacher_index = torch.as_tensor(teacher_index, dtype=torch.long).flatten()
        if self.student_index.numel() != self.teacher_index.numel():
            raise ValueError(
                f"student_index has {self.student_index.numel()} entries but teacher_index "
                f"{self.teacher_index.numel()}; entry k of both must name the same token."
            )
        for side, index, vocab_size in (
            ("student", self.student_index, student_vocab_size),
            ("teacher", self.teacher_index, teacher_vocab_size),
        ):
            if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < vocab_size:
                raise ValueError(
                    f"{side}_index holds ids {int(index.min())}..{int(index.max())}, but the "
                    f"{side} vocabulary has {vocab_size} tokens (ids 0..{vocab_size - 1}); "
                    f"pass {side}_vocab_size=len({side} tokenizer) (or the lm_head's rows) and "
                    "ids of that vocabulary."
                )
        self.student_vocab_size = student_vocab_size
        self.teacher_vocab_size = teacher_vocab_size
        self.tokens = tokens
        prefix = torch.arange(self.size)
        # a map of the first `size` rows of both is a slice: a view, no copy
        self._prefix = bool(self.student_index.equal(prefix) and self.teacher_index.equal(prefix))
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def size(self) -> int:
        """The number of shared tokens: the last dimension of the aligned logits."""
        return self.student_index.numel()

    @classmethod
    def padded(cls, vocab_size: int) -> VocabMap:
        """Keep the first ``vocab_size`` rows of both logits (the tokenizer's ``len``), dropping
        the rows a padded lm_head has past it. Either or both heads may be padded."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(
                f"vocab_size must be an int >= 1 (the tokenizer's size, len(tokenizer)), got "
                f"{vocab_size!r}."
            )
        index = torch.arange(vocab_size)
        return cls(index, index, student_vocab_size=vocab_size, teacher_vocab_size=vocab_size)

    @classmethod
    def from_tokenizers(
        cls,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        normalize: Callable[[str], str] | None = normalize_token,
    ) -> VocabMap:
        """The tokens both vocabularies spell the same after ``normalize`` (default
        :func:`normalize_token`: ``'Ġ'`` and ``'▁'`` read as a space; None compares the strings
        as they are), ordered by student id. Identical vocabularies give :meth:`padded`.

        Tokenizers are Hugging Face tokenizers or dicts token -> id. Where several tokens of one
        vocabulary normalise to the same string, the one with the lowest id is kept.
        """
        s_vocab, t_vocab = vocabulary(student_tokenizer), vocabulary(teacher_tokenizer)
        s_size, t_size = _size(s_vocab), _size(t_vocab)
        if s_vocab == t_vocab:
            return cls.padded(s_size)
        s_ids, t_ids = _by_string(s_vocab, normalize), _by_string(t_vocab, normalize)
        shared = sorted(s_ids.keys() & t_ids.keys(), key=s_ids.__getitem__)
        if not shared:
            raise VocabMismatchError(
                f"the student's and the teacher's tokenizers share no token ({s_size} and "
                f"{t_size} tokens, e.g. {_first([repr(t) for t in s_vocab])} against "
                f"{_first([repr(t) for t in t_vocab])}); logit distillation needs a common "
                "vocabulary: check that these are the models' tokenizers, or distil features."
            )
        return cls(
            torch.tensor([s_ids[tok] for tok in shared]),
            torch.tensor([t_ids[tok] for tok in shared]),
            student_vocab_size=s_size,
            teacher_vocab_size=t_size,
            tokens=tuple(shared),
        )

    def check(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Raise :class:`VocabMismatchError` unless each model's logits have at least the rows
        of its vocabulary (rows past it are padding)."""
        for side, logits, need in (
            ("student", student_logits, self.student_vocab_size),
            ("teacher", teacher_logits, self.teacher_vocab_size),
        ):
            if logits.dim() < 1 or logits.shape[-1] < need:
                raise VocabMismatchError(
                    f"the {side} logits have {logits.shape[-1] if logits.dim() else 0} vocabulary "
                    f"rows (shape {tuple(logits.shape)}) but this VocabMap needs {need} (the "
                    f"{side} vocabulary's size); build it from the tokenizer the {side} model "
                    "was trained with, or pass that model's logits."
                )

    @property
    def is_prefix(self) -> bool:
        """Whether both sides keep the same leading rows (a padded head): label ids stay valid."""
        return self._prefix

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits on the shared vocabulary: ``[..., V_s]``, ``[..., V_t]`` ->
        ``[..., size]`` each."""
        self.check(student_logits, teacher_logits)
        return self._take(student_logits, 0), self._take(teacher_logits, 1)

    def shared_mass(self, logits: Tensor, *, side: str = "teacher") -> Tensor:
        """The probability ``softmax(logits)`` puts on the shared tokens, per row (``[...]``):
        1 for a padded head whose padding gets no mass; what the intersection keeps of a
        distribution before it is renormalised."""
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}.")
        kept = self._take(logits, 0 if side == "student" else 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision upcast
        return (kept.to(dtype).logsumexp(-1) - logits.to(dtype).logsumexp(-1)).exp()

    def _take(self, logits: Tensor, side: int) -> Tensor:
        if self._prefix:
            return logits[..., : self.size]
        device = logits.device
        if device not in self._on:
            self._on[device] = (self.student_index.to(device), self.teacher_index.to(device))
        return logits.index_select(-1, self._on[device][side])

    def __repr__(self) -> str:
        if self._prefix:
            return f"VocabMap.padded({self.size})"
        return (
            f"VocabMap(size={self.size}, student_vocab_size={self.student_vocab_size}, "
            f"teacher_vocab_size={self.teacher_vocab_size})"
        )


def _by_string(vocab: Mapping[str, int], normalize: Callable[[str], str] | None) -> dict[str, int]:
    """Normalised token string -> the lowest id spelling it."""
    ids: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda item: item[1]):
        ids.setdefault(normalize(tok) if normalize else tok, i)
    return ids


def check_vocab(
    student_logits: Tensor,
    teacher_logits: Tensor,
    vocab_map: VocabMap | None = None,
    *,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> None:
    """Raise :class:`VocabMismatchError` unless the logits can be compared entry by entry.

    With ``vocab_map``, its rows must fit the logits (:meth:`VocabMap.check`). Without: when
    both tokenizers are given they must map every token to the same id (a silent mismatch when
    the head sizes happen to agree), and the logits must have the same last dimension. The
    error says what differs and names the fix: ``VocabMap.padded(vocab_size)`` for one tokenizer
    with a padded head, ``VocabMap.from_tokenizers(student_tok, teacher_tok)`` for two.
    """
    if vocab_map is not None:
        vocab_map.check(student_logits, teacher_logits)
        return
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    sizes = (
        f"the student's logits have {v_s} vocabulary rows (shape {tuple(student_logits.shape)}), "
        f"the teacher's {v_t} (shape {tuple(teacher_logits.shape)})"
    )
    if (student_tokenizer is None) != (teacher_tokenizer is None):
        raise ValueError(
            "check_vocab compares tokenizers only when both are given; pass student_tokenizer= "
            "and teacher_tokenizer=, or neither."
        )
    if student_tokenizer is not None:
        diff = VocabDiff.of(student_tokenizer, teacher_tokenizer)
        if not diff.same:
            raise VocabMismatchError(
                f"the models use different vocabularies: {diff.describe()} ({sizes}). Entry i "
                "of the two logits is not the same token, so logit distillation would compare "
                "unrelated tokens. Distil over the shared tokens with vocab_map="
                "VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer) (softmax over "
                "the intersection only; exact only where both tokenizers split the text alike), "
                "or give both models one tokenizer."
            )
        VocabMap.padded(diff.student_size).check(student_logits, teacher_logits)
        if v_s != v_t:
            raise VocabMismatchError(
                f"{sizes}, but both use one tokenizer of {diff.student_size} tokens: a head is "
                f"padded past the tokenizer's size. Slice the padding off with vocab_map="
                f"VocabMap.padded({diff.student_size}) (or align_logits(..., "
                f"vocab_size={diff.student_size}))."
            )
        return
    if v_s != v_t:
        raise VocabMismatchError(
            f"{sizes}. If both models use one tokenizer and a head is padded past its size "
            f"(commonly to a multiple of 64 or 128), slice it with vocab_map=VocabMap.padded("
            f"vocab_size=len(tokenizer)) (at most {min(v_s, v_t)}), or align_logits(..., "
            "vocab_size=...); if the tokenizers differ, use "
            "VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)."
        )


def align_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
) -> tuple[Tensor, Tensor]:
    """Both logits cut to the tokenizer's ``vocab_size`` rows (given, or the size of
    ``tokenizer``, the one both models share): the rows of a padded lm_head past it are dropped,
    from either model or both. With neither, the logits pass through unchanged when their sizes
    agree and a mismatch raises :class:`VocabMismatchError` (see :func:`check_vocab`). A model
    with fewer rows than ``vocab_size`` raises too: its vocabulary is not this tokenizer's."""
    if vocab_size is not None and tokenizer is not None:
        raise ValueError(
            "align_logits takes vocab_size= or tokenizer=, not both; pass one (vocab_size = "
            "len(tokenizer))."
        )
    if tokenizer is not None:
        vocab_size = _size(vocabulary(tokenizer))
    if vocab_size is None:
        check_vocab(student_logits, teacher_logits)
        return student_logits, teacher_logits
    return VocabMap.padded(vocab_size)(student_logits, teacher_logits)
