"""Shared fixtures: scikit-learn's digits (real 8x8 images, shipped with the package) as tensors."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(tmp_path_factory, monkeypatch) -> None:
    """Tests never write kdkit's user cache (trained tokenizers) into the real home folder."""
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kdkit-cache"))


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """Flattened digits in [0, 1], split 1200 train / 597 test with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}


def mlp(hidden: int, depth: int = 2, num_classes: int = 10, in_features: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def train_supervised(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
