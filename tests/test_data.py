"""Datasets: the digits default, CIFAR on a fake on-disk copy, ImageFolder, synthetic, the
transfer-set recipe and the LightningDataModule."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from kdkit.data import (
    UNLABELED,
    IndexedDataset,
    KDDataModule,
    build_datasets,
    dataset_meta,
    list_datasets,
)
from kdkit.data.digits import digits_split_indices


def test_registry_lists_builtin_datasets():
    assert {"digits", "cifar10", "cifar100", "image_folder", "synthetic"} <= set(list_datasets())


def test_unknown_dataset_lists_available():
    with pytest.raises(ValueError) as err:
        build_datasets("digit")
    msg = str(err.value)
    assert "'digit'" in msg and "Did you mean 'digits'" in msg and "cifar100" in msg


def test_digits_fixed_stratified_split():
    splits = build_datasets("digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1077, 360, 360)
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    assert splits.class_names == [str(i) for i in range(10)]
    train, val, test = digits_split_indices()
    assert len(set(train) | set(val) | set(test)) == 1797
    # Independent of the global torch/numpy seed: the same test set for every run.
    torch.manual_seed(123)
    np.random.seed(123)
    assert np.array_equal(digits_split_indices()[2], test)
    counts = np.bincount([int(splits.test[i][1]) for i in range(len(splits.test))], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class


def test_digits_samples_are_indexed_scaled_images():
    from sklearn.datasets import load_digits

    raw = load_digits()
    splits = build_datasets("digits")
    _, _, test_idx = digits_split_indices()
    x, y, i = splits.test[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and i == 5
    assert torch.allclose(x[0], torch.tensor(raw.images[test_idx[5]], dtype=torch.float32) / 16)
    assert y == raw.target[test_idx[5]]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_digits_augment_shifts_by_at_most_one_pixel():
    plain = build_datasets("digits").train
    aug = build_datasets("digits", augment=True).train
    x0 = plain[3][0]
    padded = torch.nn.functional.pad(x0, (1, 1, 1, 1))
    shifts = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x = aug[3][0]
        match = [k for k, s in enumerate(shifts) if torch.equal(s, x)]
        assert match, "augmented image is not a 1-pixel shift of the original"
        seen.add(match[0])
    assert len(seen) > 3  # it really varies
    assert torch.equal(build_datasets("digits").train[3][0], x0)  # no augmentation by default


def test_labeled_fraction_hides_labels_with_fixed_seed():
    a = build_datasets("digits", labeled_fraction=0.1)
    b = build_datasets("digits", labeled_fraction=0.1)
    ya = [a.train[i][1] for i in range(len(a.train))]
    yb = [b.train[i][1] for i in range(len(b.train))]
    assert ya == yb
    assert sum(y != UNLABELED for y in ya) == round(1077 * 0.1) == a.train.num_labeled
    full = build_datasets("digits")
    for i, y in enumerate(ya):
        assert y == UNLABELED or y == full.train[i][1]
    assert all(a.val[i][1] != UNLABELED for i in range(len(a.val)))
    assert all(a.test[i][1] != UNLABELED for i in range(len(a.test)))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "half", None])
def test_labeled_fraction_out_of_range(bad):
    with pytest.raises(ValueError, match=r"labeled_fraction must be a float in \(0, 1\]"):
        build_datasets("synthetic", labeled_fraction=bad)


def test_indexed_dataset_contract():
    base = [(torch.zeros(1), 3), (torch.ones(1), 4)]
    ds = IndexedDataset(base, hide_labels=torch.tensor([False, True]))
    assert ds[0][1:] == (3, 0) and ds[1][1:] == (UNLABELED, 1)
    with pytest.raises(ValueError, match="shape"):
        IndexedDataset(base, hide_labels=torch.tensor([True]))
    with pytest.raises(TypeError):
        IndexedDataset(ds)


def test_indexed_dataset_passes_per_token_labels_through():
    # Token labels [L] (next-token ids, -100 at padding) must reach the cache path unchanged.
    labels = torch.tensor([5, 7, -100])
    base = [(torch.tensor([1, 5, 7]), labels), (torch.tensor([2, 3]), torch.tensor([3, 9]))]
    ds = IndexedDataset(base)
    x, y, i = ds[0]
    assert torch.equal(y, labels) and i == 0
    assert torch.equal(ds[1][1], torch.tensor([3, 9]))
    arr = IndexedDataset([(torch.zeros(1), np.array([1, 2]))])[0][1]
    assert isinstance(arr, np.ndarray) and arr.tolist() == [1, 2]
    # Scalar labels still become ints (collated to int64), as before.
    scalar = IndexedDataset([(torch.zeros(1), torch.tensor(4, dtype=torch.uint8))])[0][1]
    assert type(scalar) is int and scalar == 4
    # Hidden token labels become UNLABELED everywhere, keeping their shape.
    hidden = IndexedDataset(base, hide_labels=torch.tensor([True, False]))
    assert torch.equal(hidden[0][1], torch.full((3,), UNLABELED))
    assert torch.equal(hidden[1][1], torch.tensor([3, 9]))


def test_synthetic_is_deterministic_and_learnable():
    from sklearn.linear_model import LogisticRegression

    s = build_datasets("synthetic", num_classes=5, input_shape=(2, 4, 4), size=400, seed=3)
    assert s.num_classes == 5 and s.input_shape == (2, 4, 4)
    x, y, i = s.train[7]
    assert x.shape == (2, 4, 4) and i == 7
    assert torch.equal(
        build_datasets("synthetic", num_classes=5, input_shape=(2, 4, 4), size=400, seed=3).train[
            7
        ][0],
        x,
    )

    def arrays(ds):
        return (
            np.stack([ds[k][0].flatten().numpy() for k in range(len(ds))]),
            np.array([ds[k][1] for k in range(len(ds))]),
        )

    clf = LogisticRegression(max_iter=500).fit(*arrays(s.train))
    assert clf.score(*arrays(s.test)) > 0.9
    assert dataset_meta("synthetic", num_classes=7, input_shape=(3, 2, 2)).num_classes == 7


# ---- CIFAR on a tiny fake copy in the exact on-disk format ---------------------------------


def _write_pickle(path: Path, obj) -> str:
    path.write_bytes(pickle.dumps(obj))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar(root: Path, monkeypatch, cls, per_file: int, n_classes: int) -> np.ndarray:
    """Write ``cls``'s files under root; point its md5 lists at them; return test pixels."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if cls is datasets.CIFAR10 else "fine_labels"
    last = None

    def batch(name: str, offset: int):
        nonlocal last
        data = last = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = [(offset + k) % n_classes for k in range(per_file)]
        return [name, _write_pickle(folder / name, {"data": data, label_key: labels})]

    train_list = [batch(name, k * per_file) for k, (name, _) in enumerate(cls.train_list)]
    test_list = [batch(name, 0) for name, _ in cls.test_list]
    names = [f"class{k}" for k in range(n_classes)]
    meta_md5 = _write_pickle(folder / cls.meta["filename"], {cls.meta["key"]: names})
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})
    return last  # the test batch


def test_cifar10_loads_fake_copy_with_val_split(tmp_path, monkeypatch):
    test_pixels = _fake_cifar(tmp_path, monkeypatch, datasets.CIFAR10, per_file=20, n_classes=10)
    s = build_datasets("cifar10", root=tmp_path, val_size=20)
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 20)
    assert s.num_classes == 10 and s.input_shape == (3, 32, 32)
    assert s.class_names == [f"class{k}" for k in range(10)]
    # Train and val are disjoint and cover the 100 training images.
    base_train = s.train.dataset.indices
    base_val = s.val.dataset.indices
    assert sorted(base_train + base_val) == list(range(100))
    # Test split: no augmentation, normalised with the CIFAR-10 mean/std.
    x, y, i = s.test[0]
    assert x.shape == (3, 32, 32) and y == 0 and i == 0
    raw = test_pixels[0].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)[:, None, None]
    assert np.allclose(x.numpy(), (raw - mean) / std, atol=1e-5)
    # Same split on every build (fixed split_seed).
    assert build_datasets("cifar10", root=tmp_path, val_size=20).val.dataset.indices == base_val


def test_cifar10_val_size_zero_uses_test(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, monkeypatch, datasets.CIFAR10, per_file=4, n_classes=10)
    s = build_datasets("cifar10", root=tmp_path, val_size=0, augment=False)
    assert len(s.train) == 20 and len(s.val) == len(s.test) == 4
    assert torch.equal(s.val[2][0], s.test[2][0])
    with pytest.raises(ValueError, match="val_size"):
        build_datasets("cifar10", root=tmp_path, val_size=20)


def test_cifar100_loads_fake_copy(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, monkeypatch, datasets.CIFAR100, per_file=300, n_classes=100)
    s = build_datasets("cifar100", root=tmp_path, val_size=100)
    assert (len(s.train), len(s.val), len(s.test)) == (200, 100, 300)
    assert s.num_classes == 100 and len(s.class_names) == 100
    # Stratified: each class exactly once in val.
    assert sorted(s.val[k][1] for k in range(100)) == list(range(100))


def test_cifar_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_datasets("cifar10", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert str((tmp_path / "nowhere" / "cifar-10-batches-py").resolve()) in msg
    assert "data.download=true" in msg and "cifar-10-batches-py" in msg


def test_cifar_corrupt_data_is_file_not_found(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete or corrupt"):
        build_datasets("cifar100", root=tmp_path)


# ---- ImageFolder ----------------------------------------------------------------------------


def _write_images(root: Path, split: str, classes: list[str], per_class: int) -> None:
    for k, name in enumerate(classes):
        d = root / split / name
        d.mkdir(parents=True)
        for j in range(per_class):
            color = (40 * k, 100, 10 * j)
            Image.new("RGB", (20, 12), color).save(d / f"{j}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path, "train", ["cat", "dog", "eel"], 3)
    _write_images(tmp_path, "val", ["cat", "dog", "eel"], 2)
    assert dataset_meta("image_folder", root=tmp_path, image_size=16).num_classes == 3
    s = build_datasets(
        "image_folder", root=tmp_path, image_size=16, augment=False, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert s.class_names == ["cat", "dog", "eel"] and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (9, 6, 6)
    assert s.input_shape == (3, 16, 16)
    x, y, i = s.train[4]  # dog, image 1
    assert x.shape == (3, 16, 16) and y == 1 and i == 4
    assert torch.allclose(x[:, 8, 8], torch.tensor([40, 100, 10]) / 255.0, atol=1e-6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'train' folder"):
        build_datasets("image_folder", root=tmp_path)
    _write_images(tmp_path, "train", ["a", "b"], 1)
    with pytest.raises(FileNotFoundError, match="no 'val' folder"):
        build_datasets("image_folder", root=tmp_path)
    _write_images(tmp_path, "val", ["a", "c"], 1)
    with pytest.raises(ValueError, match="differ from train"):
        build_datasets("image_folder", root=tmp_path)


# ---- LightningDataModule --------------------------------------------------------------------


def test_datamodule_meta_without_loading():
    assert (KDDataModule("digits").num_classes, KDDataModule("digits").input_shape) == (
        10,
        (1, 8, 8),
    )
    # No CIFAR on disk and no download: the class count is still known.
    dm = KDDataModule("cifar100", root="/nonexistent")
    assert dm.num_classes == 100 and dm.input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        KDDataModule("mnist")


def test_datamodule_batches_and_seeded_shuffle():
    dm = KDDataModule("digits", batch_size=32, seed=1)
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and idx.shape == (32,)
    assert torch.equal(y, torch.stack([torch.tensor(dm.splits.train[int(k)][1]) for k in idx]))

    def first_indices(seed):
        d = KDDataModule("digits", batch_size=32, seed=seed)
        d.setup("fit")
        return next(iter(d.train_dataloader()))[2]

    assert torch.equal(first_indices(1), idx)
    assert not torch.equal(first_indices(2), idx)
    val_idx = next(iter(dm.val_dataloader()))[2]
    assert torch.equal(val_idx, torch.arange(32))
    assert len(dm.test_dataloader().dataset) == 360
    assert dm.class_names[0] == "0"


def test_epoch_dependent_training_sets_get_fresh_workers_each_epoch():
    from kdkit.cache import SeededViews
    from kdkit.data import KDDataModule

    dm = KDDataModule("digits", num_workers=1)
    assert dm.train_dataloader().persistent_workers
    dm.splits.train = SeededViews(dm.splits.train, num_views=2)
    assert not dm.train_dataloader().persistent_workers
