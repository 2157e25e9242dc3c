"""The Distiller: a student, frozen teacher(s) and weighted loss terms in one ``nn.Module``.

One forward on a batch returns the total loss, every term's value (detached, for logging) and the
student's output. The same object also offers the hooks API of Intel Neural Compressor
(:mod:`kdkit.hooks`) for hand-written loops. Terms live in :mod:`kdkit.term`, the teacher side
in :mod:`kdkit.teachers`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.assembly import assemble, selectors
from kdkit.batch import MASK_KEYS, call_model, find_mask, teacher_kwargs
from kdkit.capture import Selector, select_tensor
from kdkit.finite import FiniteCheck
from kdkit.functional import shared_log_softmax
from kdkit.hooks import DistillationHooks, check_loss_weights
from kdkit.teachers import TeacherAccess, TeacherOutputs, to_channels_last
from kdkit.term import LOGITS, DistillerOutput, StepInputs, Term
from kdkit.vocab import VocabMap

__all__ = ["LOGITS", "MASK_KEYS", "Distiller", "DistillerOutput", "Term"]


class Distiller(DistillationHooks, TeacherAccess, nn.Module):
    """Student + frozen teacher(s) + weighted loss terms.

    ``distiller(inputs, target)`` runs every teacher in eval mode under ``torch.no_grad()`` (or
    takes ``teacher_output`` given with the batch, or reads a cache by sample ``index``), runs
    the student (capturing the features its terms read) and returns a :class:`DistillerOutput`
    with ``loss = Σ weight_i · term_i``. Several teachers: logit terms see the weighted average
    of their softened probabilities at the term's temperature (``Teachers.ensemble``).

    The teacher is not copied (an LLM-sized teacher stays one object): at construction it gets
    ``requires_grad_(False)`` and ``eval()`` (re-asserted every forward), ``channels_last`` when
    asked, and ``distiller.to(...)`` / ``.half()`` move it with the student; its weights are never
    written. It is not a submodule: not in ``parameters()``, ``state_dict()`` or DDP.

    Learned parts (adapters, learnable loss mappings such as
    ``MSEHiddenStatesLoss(need_mapping=True)``) are in ``distiller.parameters()`` besides the
    student's: give the optimizer those, or add ``distiller.extra_parameters()`` as a group.

    Args:
        student: the model to train; ``distiller.student`` stays the plain module (no hooks
            outside a forward, no adapters), ready to ship.
        teacher: an ``nn.Module``, a sequence of them, an object with ``teacher_output(index,
            epoch)`` (a :class:`kdkit.cache.TeacherCache`), a :class:`kdkit.cache.TokenCache`
            (per-token top-k, read by sequence ``index`` for ``SparseKLDivLoss`` terms), a
            :class:`kdkit.teachers.TeacherSource`, or None when teacher outputs always come with
            the batch.
        terms: a sequence of :class:`Term`, or a mapping name -> Term (names from config keys).
        teacher_weights: weights of the teachers' probabilities (normalised to sum to 1).
        logits_selector: how to take the logits out of the models' outputs: None (a tensor; the
            first element of a tuple; the ``"logits"`` key or attribute), an index, a key /
            attribute name, or a callable.
        teacher_logits_selector: the same for the teachers, when it differs.
        example_input: one input batch, used once to probe feature shapes for adapters.
        check_finite, check_finite_every: raise when a term is NaN/Inf, naming it: every step
            on the CPU, every ``check_finite_every`` steps on an accelerator (no host sync).
        autocast_dtype: run the teachers under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); the soft losses upcast logits to float32 before the softmax.
        channels_last: put student and teachers in ``torch.channels_last`` memory format and
            convert 4-D inputs, the faster layout for convolutions on GPU.
        compile: ``torch.compile`` the student's and teachers' forwards (logit terms only:
            per-step feature hooks would force recompiles); ``distiller.student`` stays plain.
        mask_keys: for a dict batch called without ``mask=``, the keys whose value is taken as
            the token mask, the first present (Hugging Face's ``attention_mask``, then BERT's
            original ``input_mask``); ``()`` turns the lookup off.
        teacher_inputs: for a dict batch, teacher keyword arguments taken from other batch
            keys, ``{teacher argument: batch key}``, e.g. ``{"token_type_ids": "segment_ids",
            "attention_mask": "input_mask"}`` for a batch in BERT's original names.
        teacher_drop_keys: keys of a dict batch the teacher is not given (default the labels:
            a Hugging Face teacher given ``labels`` would compute a loss nobody reads). With a
            fused-linear term (:mod:`kdkit.fused`) the student is not given them either.
        loss_weights: ``[student_weight, distill_weight]``, as Intel Neural Compressor's: the
            hooks API's ``on_after_compute_loss`` returns ``student_weight · student_loss +
            distill_weight · Σ weight_i · term_i`` (default ``[1, 1]``).
        vocab_map: a :class:`kdkit.vocab.VocabMap` for language models whose vocabularies differ:
            ``VocabMap.padded(len(tokenizer))`` slices lm_head rows past the tokenizer's size,
            ``VocabMap.from_tokenizers(student_tok, teacher_tok)`` distils over the tokens both
            share. Terms that read the teacher compare the mapped logits; terms of the student
            alone (cross-entropy) keep the full ones.
        logits, teacher_logits: deprecated names of ``logits_selector`` and
            ``teacher_logits_selector`` (they warn; removed in the next release).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | Any | None = None,
        terms: Sequence[Term] | Mapping[str, Term] = (),
        *,
        teacher_weights: Sequence[float] | None = None,
        logits_selector: Selector = None,
        teacher_logits_selector: Selector = None,
        example_input: Any = None,
        check_finite: bool = True,
        check_finite_every: int = 100,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        mask_keys: Sequence[str] = MASK_KEYS,
        teacher_inputs: Mapping[str, str] | None = None,
        teacher_drop_keys: Sequence[str] = ("labels",),
        loss_weights: Sequence[float] | None = None,
        vocab_map: VocabMap | None = None,
        logits: Selector = None,
        teacher_logits: Selector = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}.")
        self.student = student
        self.logits_selector, self.teacher_logits_selector = selectors(
            logits_selector, teacher_logits_selector, logits, teacher_logits
        )
        parts = assemble(
            student,
            teacher,
            terms,
            teacher_weights=teacher_weights,
            teacher_logits_selector=self.teacher_logits_selector,
            example_input=example_input,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
            compile=compile,
            vocab_map=vocab_map,
        )
        self.terms, self._bound, self.teacher_side = parts.terms, parts.bound, parts.teacher_side
        self.losses, self.adapters, self.vocab_map = parts.losses, parts.adapters, parts.vocab_map
        self._student_capture = parts.student_capture
        self._student_feature_paths = parts.student_feature_paths
        self._reads_teacher = parts.reads_teacher
        self.check_finite = check_finite
        self._check_finite = FiniteCheck(check_finite_every)
        self.epoch = 0
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        # Looked up only when a term takes a mask, so other steps pay nothing for it.
        self.mask_keys = tuple(mask_keys) if parts.gets_mask else ()
        self.teacher_inputs = dict(teacher_inputs or {})
        self.teacher_drop_keys = frozenset(teacher_drop_keys)
        self.loss_weights = check_loss_weights(loss_weights)
        if channels_last:
            student.to(memory_format=torch.channels_last)
        # A plain attribute, not a submodule: a second registration would duplicate the
        # student's weights in every state_dict.
        object.__setattr__(self, "_student_fn", torch.compile(student) if compile else student)

    @classmethod
    def from_config(
        cls,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | Any | None,
        config: str | os.PathLike | Mapping[str, Any],
        *,
        context: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Distiller:
        """A Distiller whose terms come from a distill config, as ``kdkit distill`` builds them.

        ``config`` is a shipped method name (``"kd"``, ``"dkd"``, ``"at"``, ...), a YAML file
        or a mapping with a ``terms`` mapping of ``_target_: kdkit.Term`` configs (see
        :mod:`kdkit.config`); ``options`` are the other keyword arguments of ``Distiller``.
        ``context`` holds what the terms interpolate from outside: the feature methods
        (``"fitnets"``, ``"at"``, ...) read ``context={"student": {"feature_layers": [...]},
        "teacher": {"feature_layers": [...]}}`` (addresses, see :class:`Term`; lists of unequal
        length are paired by :func:`kdkit.capture.pair_layers`).
        """
        # Imported here so that `import kdkit` does not import Hydra (kdkit.config: no circle).
        from kdkit.config import load_distill_config, terms_from_config

        terms = terms_from_config(load_distill_config(config, context))
        return cls(student, teacher, terms, **options)

    # ------------------------------------------------------------------------- the step
    def forward(
        self,
        inputs: Any,
        target: Tensor | None = None,
        *,
        teacher_output: Any = None,
        index: Tensor | None = None,
        epoch: int | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> DistillerOutput:
        """Run the teacher(s) and the student on ``inputs`` and compute the weighted loss.

        Args:
            inputs: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).
            target: labels, for terms that read them.
            teacher_output: precomputed teacher output for this batch (logits tensor, a model
                output, or ``{"logits": ..., "features": {path: tensor}}``); skips the teacher.
            index: sample indices, to read a teacher-output cache.
            epoch: which cached view to read (defaults to the epoch counted by on_epoch_end).
            mask: for token logits ``[B, L, C]`` and token states ``[B, L, D]``, which tokens
                count (``[B, L]``, True / 1 = keep, e.g. the attention mask); handed to every
                term whose loss takes a mask and whose student tensor is token-level (see
                :class:`Term`'s ``mask``). None: a dict batch's ``mask_keys`` entry, if any.
            num_items_in_batch: the denominator of the mean for every per-sample term, in place
                of this call's kept count, e.g. the kept tokens of all gradient-accumulation
                steps of a batch, so that the accumulated gradient equals the whole batch's.
        """
        if self.channels_last:
            inputs = to_channels_last(inputs)
        if mask is None:
            mask = self.batch_mask(inputs)
        # Teacher first, as a hand-written loop does (benchmarks/overhead.py compares the two).
        teacher = self.teacher_outputs(
            inputs, teacher_output=teacher_output, index=index, epoch=epoch
        )
        if self._student_capture.elide and isinstance(inputs, Mapping):
            # no logits for a Hugging Face student's own loss on the labels (kdkit.fused)
            inputs = teacher_kwargs(inputs, {}, self.teacher_drop_keys)
        if self._student_feature_paths:
            student_output, features = self._student_capture(self.student, inputs)
        else:
            student_output, features = call_model(self._student_fn, inputs), {}
        return self.compute_loss(
            student_output,
            teacher,
            student_features=features,
            target=target,
            mask=mask,
            num_items_in_batch=num_items_in_batch,
        )

    def teacher_outputs(
        self,
        inputs: Any,
        *,
        teacher_output: Any = None,
        index: Tensor | None = None,
        epoch: int | None = None,
    ) -> TeacherOutputs:
        """What the terms read from the teacher(s) for this batch (nothing when no term does)."""
        if not self._reads_teacher:
            return TeacherOutputs([], [])
        if isinstance(inputs, Mapping) and teacher_output is None:
            inputs = teacher_kwargs(inputs, self.teacher_inputs, self.teacher_drop_keys)
        return self.teacher_side.outputs(
            inputs,
            teacher_output=teacher_output,
            index=index,
            epoch=self.epoch if epoch is None else epoch,
        )

    def compute_loss(
        self,
        student_output: Any,
        teacher: TeacherOutputs,
        *,
        student_features: Mapping[str, Tensor] | None = None,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> DistillerOutput:
        """The weighted terms for a student output (and its captured features) and the teacher
        outputs of :meth:`teacher_outputs`."""
        logits = select_tensor(student_output, self.logits_selector)
        features = student_features or {}
        step = StepInputs.of(
            logits, features, teacher, target, mask, num_items_in_batch, self.vocab_map
        )
        values: dict[str, Tensor] = {}
        total: Tensor | None = None
        ensemble, adapters = self.teacher_side.ensemble, self.adapters
        with shared_log_softmax():
            for bound in self._bound:
                value = bound.value(step, ensemble, adapters)
                values[bound.name] = value.detach()
                w = bound.term.weight
                if total is None:
                    total = value if w == 1 else w * value
                elif type(w) in (int, float):  # one kernel: total + w * value
                    total = torch.add(total, value, alpha=w)
                else:  # a tensor weight (a schedule, a learned weight) has its own gradient
                    total = total + w * value
        if self.check_finite:
            self._check_finite(total, values)
        return DistillerOutput(total, values, student_output, logits, teacher.logits)

    def batch_mask(self, inputs: Any) -> Tensor | None:
        """The token mask of a dict batch: the value of the first of ``mask_keys`` it holds."""
        return find_mask(inputs, self.mask_keys)

    # ----------------------------------------------------------------------------- module API
    def extra_parameters(self) -> list[nn.Parameter]:
        """The Distiller's learned parameters that are not the student's: its adapters and the
        learnable parts of its losses. Train them with the student, e.g.
        ``torch.optim.AdamW([{"params": student.parameters()}, {"params":
        distiller.extra_parameters()}])`` (or simply over ``distiller.parameters()``)."""
        own = {id(p) for p in self.student.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    @property
    def check_finite_every(self) -> int:
        """Steps between reads of the NaN/Inf flags on an accelerator."""
        return self._check_finite.every
