"""Dataset registry: ``build_datasets(name, **options) -> DataSplits``.

Each registration declares its class count and input shape statically (or as a cheap function
of the options) so :func:`dataset_meta` can answer without loading or downloading anything —
the CLI needs ``num_classes`` to build models before the data exists.

Options every dataset accepts (handled here, not by the builders):

* ``labeled_fraction`` (float in (0, 1], default 1.0): transfer-set recipe for an unlabeled
  transfer set. Only that fraction of *training* samples keep their label (chosen with a fixed
  seed, independent of the run seed); the others get label ``-1``. The teacher labels them:
  losses that use ground-truth labels must ignore ``-1`` (e.g. ``ignore_index=-1``).

All splits are wrapped in :class:`kdkit.data.indexed.IndexedDataset`, so every sample is
``(x, y, index)`` with ``index`` its position in that split (the teacher cache keys on it).

``input_shape`` is what one input is: ``(C, H, W)`` for images, ``(max_length,)`` (tokens per
text) for text. A text data set also gives the ``collate_fn`` that pads its samples into dict
batches (:func:`kdkit.data.text_classification.collate_tokens`) and the ``tokenizer`` to ship
with a model trained on it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from kdkit.data.indexed import IndexedDataset, unlabeled_mask

LABEL_SEED = 0  # fixed so every run hides the same labels


@dataclass
class DataSplits:
    """The three splits of one dataset plus what a model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (max_length,) for text
    class_names: list[str] = field(default_factory=list)
    collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default collation
    tokenizer: Any = None  # text: the tokenizer that made the input ids


@dataclass(frozen=True)
class DatasetMeta:
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (max_length,) for text


MetaFn = Callable[..., DatasetMeta]
Builder = Callable[..., DataSplits]


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    meta: MetaFn


_DATASETS: dict[str, _Entry] = {}


def register_dataset(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    meta: MetaFn | None = None,
) -> Callable[[Builder], Builder]:
    """Register ``builder(**options) -> DataSplits`` under ``name``.

    Give either the static ``num_classes`` and ``input_shape`` or ``meta(**options) ->
    DatasetMeta`` (for datasets whose shape depends on options or on a folder's contents).
    """
    if meta is None:
        if num_classes is None or input_shape is None:
            raise ValueError(
                f"register_dataset({name!r}) needs num_classes and input_shape, or meta="
            )
        static = DatasetMeta(int(num_classes), tuple(int(s) for s in input_shape))  # type: ignore[arg-type]

        def meta(**_options) -> DatasetMeta:
            return static

    def decorator(builder: Builder) -> Builder:
        _DATASETS[name] = _Entry(builder, meta)
        return builder

    return decorator


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def _entry(name: str) -> _Entry:
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown dataset data.name={name!r}.{hint} Available: {', '.join(list_datasets())} "
            "(or register one with kdkit.data.register_dataset)."
        )
    return _DATASETS[name]


def _check_fraction(labeled_fraction: float) -> float:
    try:
        value = float(labeled_fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"labeled_fraction must be a float in (0, 1], got {labeled_fraction!r}; "
            "use 1.0 to keep every label, e.g. 0.1 to keep 10% and let the teacher label the rest"
        )
    return value


def _check_options(name: str, builder: Builder, options: dict) -> None:
    """Refuse an option the data set's builder does not take (e.g. a preset's ``download``)."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        key = unknown[0]
        raise ValueError(
            f"data.{key}={options[key]!r} is not an option of dataset {name!r}; it takes "
            f"{', '.join(sorted(params)) or 'no options'} (and labeled_fraction). Remove it "
            f"(~data.{key}) or pick a data set that has it."
        )


def dataset_meta(name: str, **options) -> DatasetMeta:
    """``num_classes`` and ``input_shape`` of ``name`` under ``options``; loads no data.

    An option the data set does not take is refused here, before anything is built.
    """
    options.pop("labeled_fraction", None)
    entry = _entry(name)
    _check_options(name, entry.builder, options)
    return entry.meta(**options)


def build_datasets(name: str, *, labeled_fraction: float = 1.0, **options) -> DataSplits:
    """Build the train/val/test splits of dataset ``name``, each yielding ``(x, y, index)``."""
    entry = _entry(name)
    _check_options(name, entry.builder, options)
    fraction = _check_fraction(labeled_fraction)
    splits = entry.builder(**options)
    hide = None
    if fraction < 1.0:
        hide = unlabeled_mask(len(splits.train), fraction, seed=LABEL_SEED)
    splits.train = IndexedDataset(splits.train, hide_labels=hide)
    splits.val = IndexedDataset(splits.val)
    splits.test = IndexedDataset(splits.test)
    return splits
