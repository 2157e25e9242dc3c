"""``image_folder``: your own images, one sub-folder per class (torchvision ``ImageFolder``).

Layout::

    root/train/<class>/*.png|jpg...
    root/val/<class>/...
    root/test/<class>/...      (optional; val is used as test when absent)

Images are converted to RGB, resized to ``image_size`` (shorter side, then center crop;
training adds a random crop with 4 px padding and a horizontal flip when ``augment``), and
normalised with ``mean``/``std`` (ImageNet statistics by default). Class names and order
come from ``train/``; ``val/`` and ``test/`` must have the same class folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision import datasets
from torchvision import transforms as T

from kdkit.data.registry import DatasetMeta, DataSplits, register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split_dir(root: str | Path, split: str, required: bool = True) -> Path | None:
    base = Path(root).expanduser().resolve()
    path = base / split
    if not path.is_dir():
        if not required:
            return None
        raise FileNotFoundError(
            f"image_folder: no '{split}' folder at {path}. Expected {base}/train/<class>/*.png "
            f"and {base}/val/<class>/*.png (test/ optional); set data.root to that folder."
        )
    return path


def _classes(root: str | Path) -> list[str]:
    train = _split_dir(root, "train")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())  # type: ignore[union-attr]
    if not classes:
        raise FileNotFoundError(
            f"image_folder: {train} has no class sub-folders; put each class's images in "
            f"{train}/<class_name>/"
        )
    return classes


def _meta(root: str | Path = "data", image_size: int = 32, **_options) -> DatasetMeta:
    return DatasetMeta(len(_classes(root)), (3, int(image_size), int(image_size)))


@register_dataset("image_folder", meta=_meta)
def build_image_folder(
    root: str | Path = "data",
    image_size: int = 32,
    augment: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> DataSplits:
    classes = _classes(root)
    resize = [T.Resize(image_size), T.CenterCrop(image_size)]
    normalize = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    augmentation = (
        [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()] if augment else []
    )
    train_tf = T.Compose(resize + augmentation + normalize)
    eval_tf = T.Compose(resize + normalize)

    def load(split: str, transform, required: bool = True):
        path = _split_dir(root, split, required)
        if path is None:
            return None
        ds = datasets.ImageFolder(str(path), transform=transform, loader=_rgb_loader)
        if ds.classes != classes:
            raise ValueError(
                f"image_folder: class folders of {path} {ds.classes} differ from train/ "
                f"{classes}; every split needs the same class sub-folders"
            )
        return ds

    train = load("train", train_tf)
    val = load("val", eval_tf)
    test = load("test", eval_tf, required=False) or val
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        class_names=classes,
    )


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
