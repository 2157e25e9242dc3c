"""The Distiller's NaN/Inf guard: which term went non-finite, without stalling an accelerator."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FiniteCheck:
    """Raise ``FloatingPointError`` naming the first term whose value is NaN/Inf.

    On the CPU every call checks. On an accelerator, reading a flag waits for the device, so
    the flags stay there (and-ed over calls) and are read once every ``every`` calls: a step is
    not held up by a host sync, and the error says the failure was in one of the last ``every``.
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"check_finite_every must be an int >= 1, got {every!r}.")
        self.every = every
        self._flags: Tensor | None = None
        self._pending = 0

    def __call__(self, total: Tensor, values: dict[str, Tensor]) -> None:
        if total.is_cpu:
            if not math.isfinite(total.item()):  # one read, no isfinite kernel
                self._raise(values, [bool(torch.isfinite(v).all()) for v in values.values()])
            return
        flags = torch.stack([torch.isfinite(v).all() for v in values.values()])
        self._flags = flags if self._flags is None else self._flags & flags
        self._pending += 1
        if self._pending >= self.every:
            ok, self._flags, self._pending = self._flags.tolist(), None, 0
            if not all(ok):
                self._raise(values, ok, steps=self.every)

    @staticmethod
    def _raise(values: dict[str, Tensor], ok: list[bool], steps: int = 1) -> None:
        name = next((n for n, fine in zip(values, ok, strict=True) if not fine), "the sum")
        when = "" if steps == 1 else f" in one of the last {steps} steps"
        raise FloatingPointError(
            f"term {name!r} was NaN/Inf{when}; lower the learning rate, check the inputs for "
            "NaN/Inf, or raise the temperature of a soft term."
        )
