"""Datasets for kdkit: a registry, the embedded ``digits`` default, CIFAR, ImageFolder, synthetic.

``build_datasets(name, **options) -> DataSplits``; every split yields ``(x, y, index)``.
``KDDataModule`` wraps it for Lightning.
"""

from kdkit.data import cifar, digits, image_folder, synthetic  # noqa: F401  (registration)
from kdkit.data.datamodule import KDDataModule
from kdkit.data.indexed import UNLABELED, IndexedDataset
from kdkit.data.registry import (
    DatasetMeta,
    DataSplits,
    build_datasets,
    dataset_meta,
    list_datasets,
    register_dataset,
)

__all__ = [
    "UNLABELED",
    "DataSplits",
    "DatasetMeta",
    "IndexedDataset",
    "KDDataModule",
    "build_datasets",
    "dataset_meta",
    "list_datasets",
    "register_dataset",
]
