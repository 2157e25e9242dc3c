"""What a batch is, once for every layer: ``(inputs, labels[, index])``; inputs a tensor, a
tuple of positional arguments or a mapping of keyword arguments (Hugging Face style)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

UNLABELED = -1
"""The label of an unlabeled sample of a transfer set (the teacher labels it)."""


LABELS_KEY, INDEX_KEY = "labels", "index"


def unpack_batch(batch: Any) -> tuple[Any, Tensor, Tensor | None]:
    """``(x, y)`` or ``(x, y, index)`` -> ``(x, y, index or None)``; a dict batch (Hugging Face
    style) -> ``(the other keys as the model's keyword arguments, batch["labels"],
    batch.get("index"))``."""
    if isinstance(batch, Mapping):
        if LABELS_KEY not in batch:
            raise TypeError(
                f"a dict batch must hold its labels under {LABELS_KEY!r}, got keys "
                f"{sorted(batch)}; rename the label key (kdkit.data.text_classification."
                "collate_tokens makes such batches)."
            )
        inputs = {k: v for k, v in batch.items() if k not in (LABELS_KEY, INDEX_KEY)}
        return inputs, batch[LABELS_KEY], batch.get(INDEX_KEY)
    if isinstance(batch, tuple | list) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    length = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
    raise TypeError(
        f"a batch must be (inputs, labels) or (inputs, labels, index), or a dict with "
        f"{LABELS_KEY!r}, got {type(batch).__name__}{length}; make the dataset yield such tuples "
        "(kdkit.data.IndexedDataset adds the index)."
    )


def first_rows(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of ``inputs``: every tensor in it (a tensor, a tuple or a dict of
    them) cut to its first ``n`` rows."""
    return apply_to_collection(inputs, Tensor, lambda t: t[:n])


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move the tensors of ``inputs`` (a tensor, or tensors nested in tuples, lists, mappings
    and dataclasses) to ``device``; other values are kept as they are."""
    return apply_to_collection(inputs, Tensor, Tensor.to, device)


def call_model(model: nn.Module | Any, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple/list, ``model(**x)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


MASK_KEYS = ("attention_mask", "input_mask")


def find_mask(inputs: Any, keys: Sequence[str] = MASK_KEYS) -> Tensor | None:
    """The token mask of a dict batch: the value of the first of ``keys`` it holds, else None."""
    if keys and isinstance(inputs, Mapping):
        for key in keys:
            if key in inputs:
                return inputs[key]
    return None


def teacher_kwargs(
    inputs: Mapping[str, Any], rename: Mapping[str, str], drop: Collection[str]
) -> dict[str, Any]:
    """A dict batch as a teacher's keyword arguments: ``drop`` keys out (e.g. ``labels``), and
    ``rename`` ({teacher argument: batch key}) applied."""
    batch = {k: v for k, v in inputs.items() if k not in drop}
    for argument, key in rename.items():
        if key not in batch:
            raise ValueError(
                f"teacher_inputs maps the teacher's {argument!r} to batch key {key!r}, which "
                f"this batch lacks (it has {sorted(inputs)}); fix the mapping."
            )
        batch[argument] = batch.pop(key)
    return batch
