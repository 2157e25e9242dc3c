"""Lightning modules for causal language models: next-token training and token distillation.

Batches are ``(input_ids [B, L], labels [B, L])`` or ``(input_ids, labels, index)`` with the
labels **already shifted once** by the dataset (:mod:`kdkit.data.text`): ``labels[:, t]`` is the
token after ``input_ids[:, t]``, so ``logits[:, t]`` is compared with ``labels[:, t]`` as they
are. The model is called as ``model(input_ids)``, never with ``labels=``: a Hugging Face causal
LM given labels shifts them a second time and computes a loss nobody reads. Labels equal to
:data:`~kdkit.data.text.IGNORE_INDEX` (-100, padding) count nowhere.

Mixed precision: ``trainer.precision=bf16-mixed`` runs each step under ``torch.autocast``; the
losses upcast bf16 logits to float32 before the softmax. In a plain loop do the same yourself::

    with torch.autocast("cpu", dtype=torch.bfloat16):   # "cuda" on a GPU
        out = distiller(input_ids, labels)               # teacher and student in bf16
    out.loss.backward()                                  # weights and gradients stay float32
    optimizer.step()

Validation and test log ``<stage>/nll`` (nats per token, averaged over every kept token of the
split, not per batch) and ``<stage>/ppl`` (its exponential); the distillation module also logs
``val/agreement``, the top-1 token agreement with the teacher.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kdkit.batch import unpack_batch
from kdkit.data.text import IGNORE_INDEX
from kdkit.distiller import Distiller
from kdkit.functional import cross_entropy
from kdkit.generation import Generations, OnPolicyGKD, SequenceKD, split_prompt
from kdkit.lightning import OptimizerFactory, SchedulerFactory, _ClassificationModule

__all__ = [
    "CausalLMDistillationModule",
    "CausalLMModule",
    "lm_logits",
    "next_token_loss",
    "warmup_cosine",
]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay from the
    optimizer's lr to ``min_lr_ratio`` times it at ``total_steps`` (nanoGPT's schedule).

    Stepped after every optimizer step. The causal-LM modules pass ``total_steps`` (the stage's
    optimizer steps, ``trainer.estimated_stepping_batches``), so a config names it as
    ``{_target_: kdkit.lightning_lm.warmup_cosine, _partial_: true, warmup_steps: 10}``;
    ``total_steps=None`` holds the peak lr after the warm-up.
    """
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_cosine: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warmup_cosine: min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _takes_total_steps(factory: Any) -> bool:
    return factory is not None and "total_steps" in inspect.signature(factory).parameters


def lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The logits ``[B, L, V]`` of a causal LM (a Hugging Face model's ``.logits``, or a model
    that returns the tensor)."""
    out = model(input_ids)
    return out if isinstance(out, Tensor) else out.logits


def next_token_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """``-log softmax(logits[b, t])[labels[b, t]]`` averaged (or summed) over the kept tokens.

    ``labels`` are the already-shifted next tokens (``labels[:, t]`` follows ``input_ids[:, t]``);
    nothing is shifted here. Tokens labelled ``IGNORE_INDEX`` are skipped.
    """
    return cross_entropy(logits, labels, reduction=reduction)


class _CausalLMBase(L.LightningModule):
    """What both modules share: the optimizer set-up and the token-weighted evaluation."""

    def __init__(self, optimizer: OptimizerFactory | None, scheduler: SchedulerFactory | None):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.nll = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    @property
    def model(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: Tensor) -> Tensor:
        return lm_logits(self.model, input_ids)

    def configure_optimizers(self) -> Any:
        """The classification modules' set-up, except that a scheduler factory that takes
        ``total_steps`` (:func:`warmup_cosine`) gets the stage's optimizer steps and is
        stepped after each of them."""
        if not _takes_total_steps(self.scheduler_factory):
            return _ClassificationModule.configure_optimizers(self)
        params = [p for p in self.parameters() if p.requires_grad]
        factory = self.optimizer_factory or (lambda ps: torch.optim.Adam(ps, lr=1e-3))
        optimizer = factory(params)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)  # type: ignore[misc]
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        input_ids, labels, _ = unpack_batch(batch)
        logits = self(input_ids)
        tokens = int((labels != IGNORE_INDEX).sum())
        if tokens:  # a token-weighted mean over the split, whatever the batch sizes
            self.nll[stage].update(next_token_loss(logits, labels), weight=tokens)
        return logits

    def _eval_epoch_end(self, stage: str) -> None:
        nll = self.nll[stage].compute()
        self.nll[stage].reset()
        self.log(f"{stage}/nll", nll, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", torch.exp(nll))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


class CausalLMModule(_CausalLMBase):
    """Next-token cross-entropy training of a causal LM (teacher, scratch student)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.net = model

    @property
    def model(self) -> nn.Module:
        return self.net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, labels, _ = unpack_batch(batch)
        loss = next_token_loss(self(input_ids), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class CausalLMDistillationModule(_CausalLMBase):
    """Trains ``distiller.student`` through a :class:`~kdkit.Distiller` whose terms read the
    token logits (e.g. a token KL with the teacher and cross-entropy on the labels, each given
    ``target=labels`` so that ``IGNORE_INDEX`` tokens count nowhere). Checkpoints hold the
    student and the Distiller's learned parts, never the teacher.

    With a ``recipe`` (:mod:`kdkit.generation`) the training batches are generated: each
    block's first ``prompt_length`` tokens are the prompts (:func:`~kdkit.generation.
    split_prompt`), and the distiller is trained on what the recipe returns for them, a
    :class:`~kdkit.generation.SequenceKD` batch of the teacher's continuations, or an
    :class:`~kdkit.generation.OnPolicyGKD` one (the student's samples with probability
    ``lmbda``, else the data's block with the prompt's predictions masked; give it
    ``recipe.distiller`` as ``distiller``). ``train/generated`` logs the fraction of generated
    batches per epoch; the recipe's random state is saved in checkpoints and restored on resume.
    """

    def __init__(
        self,
        distiller: Distiller,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        *,
        recipe: SequenceKD | OnPolicyGKD | None = None,
        prompt_length: int | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        if recipe is not None and prompt_length is None:
            raise ValueError(
                f"CausalLMDistillationModule: recipe={type(recipe).__name__} generates from "
                "each block's first prompt_length tokens; pass prompt_length=<int>."
            )
        if isinstance(recipe, OnPolicyGKD) and recipe.distiller is not distiller:
            raise ValueError(
                "CausalLMDistillationModule: an OnPolicyGKD recipe scores its batches with its "
                "own generalized-JSD term; pass distiller=recipe.distiller."
            )
        self.distiller = distiller
        self.recipe, self.prompt_length = recipe, prompt_length
        self.agreement = MeanMetric()

    @property
    def model(self) -> nn.Module:
        return self.distiller.student

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, labels, index = unpack_batch(batch)
        if self.recipe is None:
            out = self.distiller(input_ids, labels, index=index, epoch=self.current_epoch)
        else:  # generated batches: no dataset index (a teacher cache cannot feed them)
            batch = self._recipe_batch(input_ids, labels)
            self.log("train/generated", float(batch.generated), on_step=False, on_epoch=True)
            out = self.distiller(batch.inputs, batch.labels, epoch=self.current_epoch)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.terms.items()})
        return out.loss

    def _recipe_batch(self, input_ids: Tensor, labels: Tensor) -> Generations:
        assert self.recipe is not None and self.prompt_length is not None
        prompts, prompt_mask, data = split_prompt(input_ids, labels, self.prompt_length)
        if isinstance(self.recipe, OnPolicyGKD):
            return self.recipe(prompts, prompt_mask, batch=data)
        return self.recipe(prompts, prompt_mask)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.recipe is not None:
            checkpoint["kdkit_recipe"] = self.recipe.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.recipe is not None and "kdkit_recipe" in checkpoint:
            self.recipe.load_state_dict(checkpoint["kdkit_recipe"])

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = super().validation_step(batch, batch_idx)
        if self.distiller.teachers:
            input_ids, labels, _ = unpack_batch(batch)
            keep = labels != IGNORE_INDEX
            teacher = self.distiller.compute_teacher_logits(input_ids)
            same = (logits.argmax(-1) == teacher.argmax(-1))[keep].float()
            if same.numel():
                self.agreement.update(same.mean(), weight=same.numel())
        return logits

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.distiller.teachers:
            self.log("val/agreement", self.agreement.compute())
            self.agreement.reset()
