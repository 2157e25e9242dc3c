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

from typing import TYPE_CHECKING, Any

from torch import Tensor

from kdkit.capture import FeatureCapture

if TYPE_CHECKING:
    from torch import nn


class DistillationHooks:
    """``on_train_begin`` / ``on_after_compute_loss`` / ``on_epoch_end`` / ``close``, mixed into
    :class:`kdkit.Distiller`."""

    # What the Distiller provides, besides its step: teacher_outputs() and compute_loss().
    student: nn.Module
    teachers: list[nn.Module]
    epoch: int
    _student_feature_paths: list[str]
    _persistent_capture: FeatureCapture | None = None

    def on_train_begin(self) -> None:
        """Call before the first batch of a hand-written loop: attaches the student's hooks."""
        self.close()
        for t in self.teachers:
            t.eval()
        if self._student_feature_paths:
            self._persistent_capture = FeatureCapture(self.student, self._student_feature_paths)

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
        """Call after your own loss: returns ``student_loss + Σ weight_i · term_i``.

        Runs the teacher on ``inputs`` unless ``teacher_output`` is given (or a cache is set and
        ``index`` is given). ``target``, ``mask`` and ``num_items_in_batch`` are handed to the
        terms as in :meth:`Distiller.forward`. The last terms are kept in ``self.last_terms``
        for logging.
        """
        if self._student_feature_paths and self._persistent_capture is None:
            raise RuntimeError(
                "this Distiller reads student features, which are captured by hooks that "
                "on_train_begin() attaches; call distiller.on_train_begin() before the loop."
            )
        features = self._persistent_capture.features if self._persistent_capture else {}
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
        return student_loss + out.loss

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
