"""Datasets for kdkit: a registry, the embedded ``digits`` default, CIFAR, ImageFolder, synthetic,
and text (``stdlib_docstrings``: the standard library's docstrings labelled by package).

``build_datasets(name, **options) -> DataSplits``; every split yields ``(x, y, index)``.
``KDDataModule`` wraps it for Lightning.
"""

from kdkit.data import (  # noqa: F401  (registration)
    cifar,
    digits,
    image_folder,
    synthetic,
    text_classification,
)
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
