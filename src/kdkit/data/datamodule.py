"""``KDDataModule``: a LightningDataModule over :func:`kdkit.data.build_datasets`.

Batches are ``(x, y, index)``: ``index`` is the sample's position in its split (the teacher
cache keys on it) and ``y`` is ``-1`` for training samples whose label is hidden by
``labeled_fraction``. A data set with a ``collate_fn`` (text) batches its own way: dicts of
``input_ids``, ``attention_mask``, ``labels`` and ``index``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from kdkit.data.registry import DataSplits, build_datasets, dataset_meta
from kdkit.data.sampler import EpochShuffleSampler


class KDDataModule(L.LightningDataModule):
    """``KDDataModule(name="digits", batch_size=64, num_workers=0, seed=0, **dataset_options)``.

    ``num_classes`` and ``input_shape`` are known right after construction (from the
    dataset's registration; nothing is loaded or downloaded). ``seed`` seeds the training
    shuffle: the order of each epoch is a function of ``(seed, epoch)``
    (:class:`~kdkit.data.sampler.EpochShuffleSampler`), so a resumed run sees the batches the
    uninterrupted one saw.
    """

    def __init__(
        self,
        name: str = "digits",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        **dataset_options,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (it seeds the shuffle), got {seed!r}")
        self.name = name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.dataset_options = dict(dataset_options)
        meta = dataset_meta(name, **self.dataset_options)
        self.num_classes: int = meta.num_classes
        self.input_shape: tuple[int, ...] = meta.input_shape
        self.splits: DataSplits | None = None

    @property
    def class_names(self) -> list[str]:
        return self.prepare().class_names

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of a text data set (None for images)."""
        return self.prepare().tokenizer

    def prepare(self) -> DataSplits:
        """Build the splits once (idempotent); returns them."""
        if self.splits is None:
            self.splits = build_datasets(self.name, **self.dataset_options)
            self.num_classes = self.splits.num_classes
            self.input_shape = tuple(self.splits.input_shape)  # type: ignore[assignment]
        return self.splits

    def prepare_data(self) -> None:
        # Downloads happen here (rank 0 only in DDP) when the dataset was asked to download.
        if self.dataset_options.get("download"):
            build_datasets(self.name, **self.dataset_options)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        splits = self.prepare()
        dataset = getattr(splits, split)
        # Workers that outlive an epoch keep a stale copy of an epoch-dependent dataset
        # (kdkit.cache.SeededViews): fresh workers each epoch then see its set_epoch.
        persistent = self.num_workers > 0 and not hasattr(dataset, "set_epoch")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and split == "train",
            persistent_workers=persistent,
            collate_fn=splits.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
