"""The hooks API of Intel Neural Compressor's distillation, for a hand-written training loop.

A thin layer over the Distiller's public step (:meth:`Distiller.teacher_outputs` and
:meth:`Distiller.compute_loss`): your loop runs the student and its own loss, and
``on_after_compute_loss`` adds the distillation terms. The methods live on every
:class:`kdkit.Distiller`::

    distiller.on_train_begin()
    for epoch in range(epochs):
        for x, y in loader:
            out = student(x)
            loss = distiller.on_after_compute_loss(x, out, F.cross_entropy(out, y))
            ...
        distiller.on_epoch_end()
    distiller.close()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdkit.capture import Address, FeatureCapture, StepCapture

if TYPE_CHECKING:
    from torch import nn


class DistillationHooks:
    """Intel Neural Compressor 2.x's training callbacks, mixed into :class:`kdkit.Distiller`:
    ``on_train_begin``, ``on_epoch_begin``, ``on_step_begin``, ``on_after_compute_loss``,
    ``on_before_optimizer_step``, ``on_after_optimizer_step``, ``on_step_end``,
    ``on_epoch_end``, ``on_train_end`` (and ``close``). Only ``on_train_begin`` and
    ``on_after_compute_loss`` are required; the others may be called or left out."""

    # What the Distiller provides, besides its step: teacher_outputs(), compute_loss(),
    # batch_mask(), extra_parameters() and loss_weights.
    student: nn.Module
    teachers: list[nn.Module]
    epoch: int
    loss_weights: tuple[float, float]
    _student_feature_paths: list[str]
    _persistent_capture: FeatureCapture | None = None
    _output_fields: Sequence[Address] = ()
    _idle_check: tuple[list[Tensor], list[Tensor]] | None = None

    def on_train_begin(self, dataloader: Any = None) -> None:
        """Call before the first batch of a hand-written loop: attaches the student's hooks
        (``dataloader`` is accepted for INC's signature and not read)."""
        self.close()
        for t in self.teachers:
            t.eval()
        capture = StepCapture(self.student, self._student_feature_paths)
        # Your loop calls the student, so output fields are read from the output you pass
        # (call it with output_hidden_states=True / output_attentions=True).
        self._output_fields = capture.fields
        if any(reads_input for *_, reads_input in capture.modules):
            raise ValueError(
                "the hooks API captures module outputs only; read the previous module's "
                "output instead of an ':input' address, or use distiller(inputs, target)."
            )
        if self._student_feature_paths:
            self._persistent_capture = FeatureCapture(
                self.student,
                [text for text, *_ in capture.modules],
                selector={text: pick for text, _, pick, _ in capture.modules},
            )
        extra = [p for p in self.extra_parameters() if p.requires_grad]  # type: ignore[attr-defined]
        student = [p for p in self.student.parameters() if p.requires_grad][:1]
        self._idle_check = (
            ([p.detach().clone() for p in extra], [p.detach().clone() for p in student])
            if extra and student
            else None
        )

    def on_epoch_begin(self, epoch: int | None = None) -> None:
        """Optional, at the start of an epoch: with ``epoch``, the epoch used to read cached
        views (else the count ``on_epoch_end`` keeps)."""
        if epoch is not None:
            self.epoch = epoch

    def on_step_begin(self, batch_id: int | None = None) -> None:
        """Optional, before a batch (INC's signature); nothing to do."""

    def on_before_optimizer_step(self) -> None:
        """Optional, before ``optimizer.step()``; nothing to do."""

    def on_after_optimizer_step(self) -> None:
        """Optional, after ``optimizer.step()``: checks the learned parts are trained."""
        self._check_idle()

    def on_step_end(self) -> None:
        """Optional, after a batch's optimizer step: checks the learned parts are trained."""
        self._check_idle()

    def on_train_end(self) -> None:
        """Optional, after the last batch: removes the student's hooks (as :meth:`close`)."""
        self.close()

    def _check_idle(self) -> None:
        """Once the student has changed (an optimizer step ran), warn once if the Distiller's
        own learned parameters did not: the optimizer does not hold them."""
        if self._idle_check is None:
            return
        extra_before, student_before = self._idle_check
        with torch.no_grad():
            student_now = [p for p in self.student.parameters() if p.requires_grad][:1]
            if all(torch.equal(a, b) for a, b in zip(student_before, student_now, strict=True)):
                return  # no optimizer step yet (e.g. gradient accumulation)
            extra = [p for p in self.extra_parameters() if p.requires_grad]  # type: ignore[attr-defined]
            idle = all(torch.equal(a, b) for a, b in zip(extra_before, extra, strict=True))
        self._idle_check = None
        if idle:
            names = sorted(
                {
                    n.split(".", 1)[0]
                    for n, p in self.named_parameters()  # type: ignore[attr-defined]
                    if not n.startswith("student.")
                }
            )
            warnings.warn(
                f"the Distiller's learned parameters ({', '.join(names)}: adapters or loss "
                "mappings) did not change in the first optimizer step while the student did, "
                "so the optimizer does not train them; build it over distiller.parameters(), or "
                "add a group: {'params': distiller.extra_parameters()}.",
                UserWarning,
                stacklevel=3,
            )

    def on_after_compute_loss(
        self,
        inputs: Any,
        student_output: Any,
        student_loss: Tensor,
        teacher_output: Any = None,
        *,
        target: Tensor | None = None,
        index: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Call after your own loss: returns ``student_loss + Σ weight_i · term_i`` (with
        ``loss_weights=[a, b]``: ``a · student_loss + b · Σ weight_i · term_i``).

        Runs the teacher on ``inputs`` unless ``teacher_output`` is given (or a cache is set and
        ``index`` is given); a dict batch reaches the teacher as the Distiller's
        ``teacher_inputs`` / ``teacher_drop_keys`` say. ``target``, ``mask`` and
        ``num_items_in_batch`` are handed to the terms as in :meth:`Distiller.forward` (no
        ``mask``: the dict batch's ``attention_mask`` / ``input_mask``). The last terms are kept
        in ``self.last_terms`` for logging. Warns once if, after the first optimizer step, the
        Distiller's learned parameters (:meth:`Distiller.extra_parameters`) did not change.
        """
        if self._student_feature_paths and self._persistent_capture is None:
            raise RuntimeError(
                "this Distiller reads student features, which are captured by hooks that "
                "on_train_begin() attaches; call distiller.on_train_begin() before the loop."
            )
        self._check_idle()
        if not isinstance(student_loss, Tensor):
            raise TypeError(
                f"on_after_compute_loss: student_loss must be your loop's loss tensor, got "
                f"{type(student_loss).__name__}; pass e.g. F.cross_entropy(out, y), or "
                "torch.zeros(()) when the distillation terms are the whole loss."
            )
        features = self._persistent_capture.features if self._persistent_capture else {}
        for address in self._output_fields:
            features[address.text] = address.read_output(student_output)
        if mask is None:
            mask = self.batch_mask(inputs)  # type: ignore[attr-defined]
        teacher = self.teacher_outputs(inputs, teacher_output=teacher_output, index=index)
        out = self.compute_loss(
            student_output,
            teacher,
            student_features=features,
            target=target,
            mask=mask,
            num_items_in_batch=num_items_in_batch,
        )
        self.last_terms = out.terms
        student_w, distill_w = self.loss_weights
        if (student_w, distill_w) == (1.0, 1.0):
            return student_loss + out.loss
        return student_w * student_loss + distill_w * out.loss

    def on_epoch_end(self) -> None:
        """Call at the end of every epoch (advances the epoch used to read cached views)."""
        self.epoch += 1

    def close(self) -> None:
        """Remove any hooks this Distiller holds on the student (idempotent)."""
        if self._persistent_capture is not None:
            self._persistent_capture.close()
            self._persistent_capture = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle does not take the capture along (its hooks would arrive inert); call
        # on_train_begin() on the copy to train with it.
        state = super().__getstate__()  # type: ignore[misc]
        return {**state, "_persistent_capture": None}


def check_loss_weights(weights: Sequence[float] | None) -> tuple[float, float]:
    """INC's ``loss_weights``: ``[student_weight, distill_weight]``, default ``(1, 1)``."""
    if weights is None:
        return (1.0, 1.0)
    w = tuple(weights)
    if len(w) != 2 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in w
    ):
        raise ValueError(
            f"loss_weights={weights!r}; give [student_weight, distill_weight], two finite "
            "numbers >= 0 (Intel Neural Compressor's loss_weights, e.g. [0.5, 0.5])."
        )
    return (float(w[0]), float(w[1]))
