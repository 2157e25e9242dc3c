"""Distillation on generated sequences: sequence-level KD and on-policy GKD, for causal LMs.

* :class:`SequenceKD` (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the student is
  trained on the *teacher's* generations for the training prompts (the paper decodes with beam
  search; greedy here unless ``num_beams=`` and friends are passed), with the usual losses on
  the generated tokens (cross-entropy; word-level KD on them gives the paper's Seq-Inter mix).
* :class:`OnPolicyGKD` (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes"; the scheme of TRL's ``GKDTrainer``): with probability
  ``lmbda`` a batch is replaced by the *student's* own samples for its prompts (``generate``,
  no grad), and the student is trained on the batch with the generalized JSD ``beta`` against
  the teacher at every generated token (:class:`kdkit.losses.GeneralizedJSDLoss`, or its
  fused-linear form); otherwise on the data set's batch.

Both produce :class:`Generations`: batches in kdkit's causal-LM convention
(:mod:`kdkit.data.text`): ``input_ids [B, L]`` right-padded with ``pad_token_id``, ``labels
[B, L]`` aligned with the positions and shifted once (``labels[:, t] = input_ids[:, t + 1]``),
``-100`` wherever no loss is taken: the predictions of prompt tokens, the padding, the last
position, everything after a row's end-of-sequence token (the EOS itself is learnt). Right
padding leaves a causal model's outputs at the real positions unchanged, so the batch reads the
same with or without its ``attention_mask``.

Both are plain objects (no Lightning), deterministic given ``seed``: each call draws its
generation seed (and, for GKD, its on-/off-policy coin) from one ``random.Random(seed)``, and
generation runs under a forked torch RNG, so the caller's random streams are untouched;
:meth:`state_dict` / :meth:`load_state_dict` carry that state through a checkpoint. A plain loop::

    gkd = OnPolicyGKD(student, teacher, lmbda=0.5, beta=0.5, max_new_tokens=64, pad_token_id=0)
    for input_ids, labels, _ in loader:                   # kdkit.data.text batches
        prompts, prompt_mask, data = split_prompt(input_ids, labels, prompt_length=32)
        batch = gkd(prompts, prompt_mask, batch=data)     # the student's samples with prob. lmbda
        loss = gkd.distiller(batch.inputs, batch.labels).loss
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdkit.distiller import Distiller
from kdkit.losses import FusedLinearJSDLoss, GeneralizedJSDLoss
from kdkit.term import Term

__all__ = ["IGNORE_INDEX", "Generations", "OnPolicyGKD", "SequenceKD", "generate", "split_prompt"]

IGNORE_INDEX = -100


class Generations(NamedTuple):
    """A causal-LM batch (see the module docstring): ``input_ids``, aligned ``labels`` (-100
    where no loss is taken), ``attention_mask`` (1 at the real tokens), and whether the
    continuations were ``generated`` (False: the data set's own batch)."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    generated: bool

    @property
    def inputs(self) -> dict[str, Tensor]:
        """The models' keyword arguments: ``{"input_ids": ..., "attention_mask": ...}``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def split_prompt(
    input_ids: Tensor, labels: Tensor, prompt_length: int
) -> tuple[Tensor, Tensor, Generations]:
    """A batch of :mod:`kdkit.data.text` (right-padded, labels -100 at the padding) as prompts
    and the off-policy batch: ``(prompt_ids [B, P], prompt_mask [B, P], Generations)``, the
    first ``P = prompt_length`` tokens of each row as its prompt, and the batch itself with no
    loss on the predictions of prompt tokens (the first ``P - 1`` positions)."""
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"split_prompt: input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
            "must both be [B, L] (a kdkit.data.text batch)."
        )
    _check_positive("split_prompt", "prompt_length", prompt_length)
    if prompt_length >= input_ids.shape[1]:
        raise ValueError(
            f"split_prompt: prompt_length={prompt_length} leaves nothing to learn in sequences "
            f"of {input_ids.shape[1]} tokens; use prompt_length < {input_ids.shape[1]}."
        )
    mask = (labels != IGNORE_INDEX).long()
    data_labels = labels.clone()
    data_labels[:, : prompt_length - 1] = IGNORE_INDEX
    data = Generations(input_ids, data_labels, mask, generated=False)
    return input_ids[:, :prompt_length], mask[:, :prompt_length], data


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | Iterable[int] | None = None,
    seed: int = 0,
    **generate_kwargs: Any,
) -> Generations:
    """``model.generate`` (a Hugging Face causal LM) continued from each prompt, as a
    :class:`Generations` batch whose labels cover the generated tokens only.

    ``prompt_ids [B, P]`` with ``prompt_mask`` (1 = real token; right or left padding; None:
    all real). The model runs in eval mode (restored after) under a torch RNG forked and seeded
    with ``seed``. A row ends at its first ``eos_token_id`` (None or empty: the model's
    ``generation_config.eos_token_id``, as ``generate`` itself), which is kept; what follows is
    padding.
    """
    _check_positive("generate", "max_new_tokens", max_new_tokens)
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
        raise ValueError(
            f"generate: prompt_ids must be [B, P] with B >= 1, got {tuple(prompt_ids.shape)}"
        )
    mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask.long()
    if mask.shape != prompt_ids.shape or bool((mask.sum(1) == 0).any()):
        raise ValueError(
            f"generate: prompt_mask {tuple(mask.shape)} must match prompt_ids "
            f"{tuple(prompt_ids.shape)} and keep at least one token per row."
        )
    prompts = [row[keep.bool()] for row, keep in zip(prompt_ids, mask, strict=True)]
    left, left_mask = _left_padded(prompts, prompt_ids.shape[1], pad_token_id)
    eos = _token_set(eos_token_id)
    if not eos:  # what model.generate stops at when given none
        eos = _token_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    modes = [(m, m.training) for m in model.modules()]
    devices = [left.device] if left.device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=left,
                attention_mask=left_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=sorted(eos) or None,
                **generate_kwargs,
            )
    except IndexError as e:  # an embedding lookup past the model's positions or vocabulary
        context = getattr(getattr(model, "config", None), "max_position_embeddings", "?")
        raise ValueError(
            f"generate: the model failed to embed a token ({e}); prompts of "
            f"{prompt_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} may exceed its "
            f"{context} positions (shorten the prompts or lower max_new_tokens), or a token id "
            f"(pad_token_id={pad_token_id}?) is past its vocabulary."
        ) from e
    finally:
        for module, training in modes:
            module.training = training
    sequences = out if isinstance(out, Tensor) else out.sequences
    new = sequences[:, left.shape[1] :]
    return _batch(prompts, [_until_eos(row, eos) for row in new], pad_token_id)


class SequenceKD:
    """Sequence-level KD (Kim & Rush 2016): batches of the teacher's generations.

    ``SequenceKD(teacher, max_new_tokens=64, pad_token_id=0)(prompt_ids, prompt_mask)`` returns
    the prompts continued by the teacher (:func:`generate`; greedy by default, the paper's beam
    search with ``num_beams=5``; any other ``generate`` keyword passes through), labels on the
    generated tokens. Train the student on them with cross-entropy
    (``Term(CrossEntropyLoss(), teacher=None, target=True)``), optionally plus a word-level KD
    term on the same batch.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | Iterable[int] | None = None,
        seed: int = 0,
        **generate_kwargs: Any,
    ) -> None:
        _check_positive("SequenceKD", "max_new_tokens", max_new_tokens)
        _check_pad_token_id("SequenceKD", pad_token_id)
        self.teacher = teacher
        self.options = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
            "do_sample": False,
            **generate_kwargs,
        }
        self.seed = seed
        self._rng = random.Random(seed)

    def __call__(self, prompt_ids: Tensor, prompt_mask: Tensor | None = None) -> Generations:
        seed = self._rng.randrange(2**63)
        return generate(self.teacher, prompt_ids, prompt_mask, seed=seed, **self.options)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_rng_state(state["rng"]))


class OnPolicyGKD:
    """On-policy generalized knowledge distillation (GKD, Agarwal et al. 2024), as TRL's
    ``GKDTrainer``: on a fraction ``lmbda`` of the batches the student learns on its own samples.

    ``gkd(prompt_ids, prompt_mask, batch=data)`` returns, with probability ``lmbda``, the
    student's continuations of the prompts (sampled with ``do_sample=True, top_k=0`` at
    ``temperature``, as TRL; ``generate`` keywords override), else the data set's ``batch`` (a
    :class:`Generations`, e.g. from :func:`split_prompt`; needed only when ``lmbda < 1``).
    ``gkd.distiller`` (or :attr:`term` in a Distiller of your own) scores the batch: the
    generalized JSD ``beta`` between the student and the teacher at every token with a label
    (:class:`kdkit.losses.GeneralizedJSDLoss`: TRL's formula times ``T^2``, the mean over the
    labelled tokens; ``beta = 0`` forward KL, ``1`` reverse KL). ``fused=True`` scores it with
    :class:`kdkit.losses.FusedLinearJSDLoss` instead (same values; no ``[B, L, V]`` logits).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        lmbda: float = 0.5,
        beta: float = 0.5,
        temperature: float = 1.0,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | Iterable[int] | None = None,
        seed: int = 0,
        fused: bool = False,
        **generate_kwargs: Any,
    ) -> None:
        if isinstance(lmbda, bool) or not isinstance(lmbda, int | float) or not 0 <= lmbda <= 1:
            raise ValueError(
                f"OnPolicyGKD: lmbda is the fraction of on-policy (student-generated) batches, "
                f"a number in [0, 1]; got {lmbda!r}."
            )
        _check_positive("OnPolicyGKD", "max_new_tokens", max_new_tokens)
        _check_pad_token_id("OnPolicyGKD", pad_token_id)
        loss_type = FusedLinearJSDLoss if fused else GeneralizedJSDLoss
        self.term = Term(loss_type(beta, temperature, IGNORE_INDEX), name="gkd")
        self.distiller = Distiller(student, teacher, [self.term])
        self.student, self.lmbda = student, float(lmbda)
        self.options = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
            "do_sample": True,
            "top_k": 0,
            "temperature": temperature,
            **generate_kwargs,
        }
        self.seed = seed
        self._rng = random.Random(seed)

    def __call__(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None = None,
        *,
        batch: Generations | None = None,
    ) -> Generations:
        on_policy = self._rng.random() < self.lmbda  # lmbda = 1: always; 0: never
        seed = self._rng.randrange(2**63)  # drawn either way: one stream whatever the coin says
        if on_policy:
            return generate(self.student, prompt_ids, prompt_mask, seed=seed, **self.options)
        if batch is None:
            raise ValueError(
                f"OnPolicyGKD (lmbda={self.lmbda}) drew an off-policy batch, which is the data "
                "set's: pass batch=Generations(...) (kdkit.generation.split_prompt makes one "
                "from a kdkit.data.text batch), or use lmbda=1 for on-policy batches only."
            )
        return batch

    def loss(self, batch: Generations) -> Tensor:
        """The GKD loss of ``batch``: ``self.distiller(batch.inputs, batch.labels).loss``."""
        return self.distiller(batch.inputs, batch.labels).loss

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_rng_state(state["rng"]))


def _check_positive(who: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}.")


def _check_pad_token_id(who: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{who}: pad_token_id must be a token id (an int >= 0), got {value!r}; pass "
            "tokenizer.pad_token_id, or tokenizer.eos_token_id for a tokenizer without a pad "
            "token (GPT-2's)."
        )


def _token_set(ids: int | Iterable[int] | None) -> set[int]:
    return {ids} if isinstance(ids, int) else set(ids or ())


def _rng_state(state: Any) -> tuple[Any, ...]:
    """A ``random.Random`` state back from a checkpoint (where its tuples may be lists)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _left_padded(prompts: list[Tensor], width: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    ids = prompts[0].new_full((len(prompts), width), pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _until_eos(tokens: Tensor, eos: set[int]) -> Tensor:
    """``tokens`` up to and including the first of ``eos``."""
    for i, token in enumerate(tokens.tolist()):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _batch(prompts: list[Tensor], continuations: list[Tensor], pad_token_id: int) -> Generations:
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    ids = prompts[0].new_full((len(prompts), width), pad_token_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (prompt, new) in enumerate(zip(prompts, continuations, strict=True)):
        p, n = len(prompt), len(new)
        ids[row, :p], ids[row, p : p + n] = prompt, new
        labels[row, p - 1 : p + n - 1] = new
        mask[row, : p + n] = 1
    return Generations(ids, labels, mask, generated=True)
