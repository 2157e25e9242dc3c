"""``cifar10`` / ``cifar100`` through torchvision, with the standard KD-paper recipe.

Training transform: RandomCrop(32, padding=4) + RandomHorizontalFlip + normalisation with the
CIFAR mean/std; val/test: normalisation only. The validation split is carved from the training
files (``val_size`` images, default 5000, stratified with ``split_seed``, independent of the run
seed); ``val_size=0`` uses the test set as validation (what the published tables do).
``download`` defaults to False: nothing is fetched unless asked for.
"""

from __future__ import annotations

from pathlib import Path

from sklearn.model_selection import train_test_split
from torchvision import datasets
from torchvision import transforms as T

from kdkit.data.registry import DataSplits, register_dataset
from kdkit.data.subset import TransformedSubset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _load(cls: type[datasets.CIFAR10], root: str | Path, train: bool, download: bool):
    folder = Path(root).expanduser().resolve() / cls.base_folder
    if not download and not folder.is_dir():
        raise FileNotFoundError(
            f"{cls.__name__} data not found: looked for {folder}. Set data.download=true to "
            f"download it, or place the extracted '{cls.base_folder}' folder under "
            f"{folder.parent} (data.root)."
        )
    try:
        return cls(root=str(folder.parent), train=train, download=download)
    except OSError as err:  # urllib's URLError, a refused connection, a timeout
        if not download:
            raise
        raise FileNotFoundError(
            f"could not download {cls.__name__} to {folder.parent} ({err}): check the network "
            f"connection, or download it elsewhere, copy the extracted '{cls.base_folder}' "
            f"folder there and pass data.root=<its parent folder> data.download=false."
        ) from err
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{cls.__name__} data under {folder} is incomplete or corrupt ({err}). Set "
            f"data.download=true to fetch it again, or replace '{cls.base_folder}' with a "
            "fresh copy."
        ) from err


def _build(
    cls: type[datasets.CIFAR10],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    root: str | Path,
    download: bool,
    augment: bool,
    val_size: int,
    split_seed: int,
) -> DataSplits:
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(
        ([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []) + normalize
    )
    eval_tf = T.Compose(normalize)
    train_files = _load(cls, root, train=True, download=download)
    test_files = _load(cls, root, train=False, download=False)
    n = len(train_files)
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size for {cls.__name__} must be in [0, {n}), got {val_size}; "
            "0 uses the test set for validation"
        )
    indices = list(range(n))
    if val_size > 0:
        try:
            train_idx, val_idx = train_test_split(
                indices, test_size=val_size, stratify=train_files.targets, random_state=split_seed
            )
        except ValueError:
            # Too few images per class to stratify (tiny subsets): a seeded random split.
            train_idx, val_idx = train_test_split(
                indices, test_size=val_size, random_state=split_seed
            )
        train = TransformedSubset(train_files, sorted(train_idx), train_tf)
        val = TransformedSubset(train_files, sorted(val_idx), eval_tf)
    else:
        train = TransformedSubset(train_files, indices, train_tf)
        val = TransformedSubset(test_files, range(len(test_files)), eval_tf)
    test = TransformedSubset(test_files, range(len(test_files)), eval_tf)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        class_names=list(train_files.classes),
    )


@register_dataset("cifar10", num_classes=10, input_shape=(3, 32, 32))
def build_cifar10(
    root: str | Path = "data",
    download: bool = False,
    augment: bool = True,
    val_size: int = 5000,
    split_seed: int = 0,
) -> DataSplits:
    return _build(
        datasets.CIFAR10,
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
        root,
        download,
        augment,
        val_size,
        split_seed,
    )


@register_dataset("cifar100", num_classes=100, input_shape=(3, 32, 32))
def build_cifar100(
    root: str | Path = "data",
    download: bool = False,
    augment: bool = True,
    val_size: int = 5000,
    split_seed: int = 0,
) -> DataSplits:
    return _build(
        datasets.CIFAR100,
        100,
        CIFAR100_MEAN,
        CIFAR100_STD,
        root,
        download,
        augment,
        val_size,
        split_seed,
    )
