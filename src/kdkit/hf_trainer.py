"""Distillation with the Hugging Face ``Trainer``: the same :class:`kdkit.Term` objects, trained
by what transformers users already train with (``pip install 'kdkit[hf]'``).

>>> trainer = DistillationTrainer(distiller, args=TrainingArguments(...), train_dataset=ds)
>>> trainer.train()
>>> trainer.save_model("student")          # the student alone, as a Hugging Face model

The Trainer's model is the :class:`kdkit.Distiller`, so its optimizer holds the student and the
Distiller's learned parts (adapters, loss mappings); the teacher is not a registered submodule,
so it is in no optimizer, checkpoint or saved model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.atomic import atomic_files, atomic_write
from kdkit.distiller import Distiller

try:
    from transformers import PreTrainedModel, Trainer
    from transformers.trainer import TRAINING_ARGS_NAME
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "kdkit.hf_trainer needs transformers; install the extra: pip install 'kdkit[hf]'."
    ) from err

__all__ = ["EXTRAS_NAME", "DistillationTrainer"]

EXTRAS_NAME = "kdkit_distiller.pt"
"""The file of a checkpoint holding the Distiller's learned parts besides the student."""


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is a :class:`kdkit.Distiller`'s.

    ``compute_loss`` takes the labels out of the batch (``label_key``) and runs
    ``distiller(batch, labels, num_items_in_batch=...)``: the teacher(s), the student and every
    term, the batch's ``attention_mask`` as token mask (see ``Distiller``'s ``mask_keys``).
    ``num_items_in_batch`` (the Trainer's count of label tokens over all gradient-accumulation
    steps) is passed through, so per-sample terms average over the whole accumulated batch.
    Each term's mean since the last log is logged as ``terms/<name>`` with the loss.

    Checkpoints and :meth:`save_model` hold the student only, saved as a Hugging Face model
    (``save_pretrained``: ``config.json`` + weights, loadable with ``from_pretrained``); a
    checkpoint adds the Distiller's learned parts in ``kdkit_distiller.pt``, so that
    ``train(resume_from_checkpoint=...)`` restores them too. The teacher is never saved.

    Args:
        distiller: the Distiller to train (its ``student`` is what is saved).
        *args, **kwargs: ``transformers.Trainer``'s arguments, without ``model``.
        label_key: the key of the labels in a batch (None: the batch has none).
    """

    def __init__(
        self, distiller: Distiller, *args: Any, label_key: str | None = "labels", **kwargs: Any
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise TypeError(
                f"DistillationTrainer trains a kdkit.Distiller, got {type(distiller).__name__}; "
                "build one: Distiller(student, teacher, terms), then "
                "DistillationTrainer(distiller, args=...)."
            )
        if "model" in kwargs:
            raise TypeError(
                "DistillationTrainer takes the Distiller in place of model=; pass "
                "DistillationTrainer(distiller, args=...), the student is distiller.student."
            )
        self.distiller = distiller
        self.label_key = label_key
        self._term_sums: dict[str, Tensor] = {}
        self._term_steps = 0
        super().__init__(distiller, *args, **kwargs)
        # The Distiller normalises by num_items_in_batch itself: the Trainer must not divide
        # the loss by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        if not self.label_names and label_key is not None:
            self.label_names = [label_key]

    # ------------------------------------------------------------------------------- the step
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        batch = dict(inputs)
        target = batch.pop(self.label_key, None) if self.label_key is not None else None
        out = model(batch, target, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name, value in out.terms.items():
                total = self._term_sums.get(name)
                self._term_sums[name] = value if total is None else total + value
            self._term_steps += 1
        return (out.loss, out.student_output) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with each term's mean since the last training log."""
        if "loss" in logs and self._term_steps:
            for name, total in self._term_sums.items():
                logs[f"terms/{name}"] = round(total.item() / self._term_steps, 6)
            self._term_sums, self._term_steps = {}, 0
        super().log(logs, start_time)

    def _set_signature_columns_if_needed(self) -> None:
        # The columns a batch keeps are what the student's forward takes, plus the labels.
        if self._signature_columns is None:
            import inspect

            params = inspect.signature(self.distiller.student.forward).parameters
            self._signature_columns = list(dict.fromkeys([*params, *self.label_names]))

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student alone, as a Hugging Face model (a plain module: its state dict)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        student = self.distiller.student
        # Written beside output_dir, then each file renamed in: none is ever half-written.
        with atomic_files(output_dir) as tmp:
            if isinstance(student, PreTrainedModel):
                student.save_pretrained(tmp)
            else:
                torch.save(student.state_dict(), tmp / "pytorch_model.bin")
            if self.processing_class is not None:
                self.processing_class.save_pretrained(tmp)
            torch.save(self.args, tmp / TRAINING_ARGS_NAME)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (see the class docstring); a checkpoint also saves the Distiller's
        learned parts."""
        super().save_model(output_dir, _internal_call)
        extras = self._extras()
        if _internal_call and extras and self.args.should_save:
            path = os.path.join(output_dir or self.args.output_dir, EXTRAS_NAME)
            atomic_write(path, lambda f: torch.save(extras, f))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, self.distiller.student)
        path = os.path.join(resume_from_checkpoint, EXTRAS_NAME)
        expected = self._extras()
        if not expected:
            return
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {resume_from_checkpoint} has no {EXTRAS_NAME}, but this Distiller "
                f"has learned parts ({sorted(expected)[:4]}...) to restore; resume from a "
                "checkpoint written by DistillationTrainer with the same terms."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(
                f"{path} lacks {missing} of this Distiller's learned parts; resume with the "
                "terms the checkpoint was trained with."
            )
        self.distiller.load_state_dict(state, strict=False)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _extras(self) -> dict[str, Tensor]:
        """The Distiller's state besides the student's (adapters, loss mappings, buffers)."""
        return {
            k: v for k, v in self.distiller.state_dict().items() if not k.startswith("student.")
        }
