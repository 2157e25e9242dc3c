"""The Distiller reads a TeacherCache in place of the teacher, with the same training result."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import mlp, train_supervised
from torch.utils.data import DataLoader, TensorDataset

from kdkit import Distiller, Term
from kdkit.cache import TeacherCache
from kdkit.data import IndexedDataset
from kdkit.losses import HintonLoss, MSEHiddenStatesLoss


def train(distiller: Distiller, loader: DataLoader, use_index: bool) -> None:
    opt = torch.optim.SGD(distiller.parameters(), lr=0.1)
    torch.manual_seed(0)
    for x, y, index in loader:
        out = distiller(x, y, index=index) if use_index else distiller(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def test_cached_teacher_trains_like_online_teacher(digits, tmp_path):
    torch.manual_seed(0)
    teacher = mlp(64)
    train_supervised(teacher, digits["x_train"], digits["y_train"], steps=100)
    data = IndexedDataset(TensorDataset(digits["x_train"][:256], digits["y_train"][:256]))
    cache = TeacherCache.build(teacher, data, tmp_path / "cache", features=["2"], batch_size=64)
    torch.manual_seed(1)
    student = mlp(64, depth=1)
    terms = {
        "hinton": Term(HintonLoss(temperature=4.0)),
        "hidden": Term(MSEHiddenStatesLoss(), weight=0.1, student="2", teacher="2"),
    }
    loader = DataLoader(data, batch_size=64, shuffle=False)

    online = Distiller(copy.deepcopy(student), teacher, copy.deepcopy(terms))
    cached = Distiller(copy.deepcopy(student), cache, copy.deepcopy(terms))
    train(online, loader, use_index=False)
    train(cached, loader, use_index=True)
    for (name, a), b in zip(
        online.student.state_dict().items(), cached.student.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(online.student[0].weight, student[0].weight)


def test_cache_without_index_says_how(digits, tmp_path):
    teacher = mlp(32).eval()
    data = IndexedDataset(TensorDataset(digits["x_train"][:64], digits["y_train"][:64]))
    cache = TeacherCache.build(teacher, data, tmp_path / "c")
    distiller = Distiller(mlp(16), cache, [Term(HintonLoss())])
    with pytest.raises(ValueError, match=r"IndexedDataset"):
        distiller(digits["x_train"][:4], digits["y_train"][:4])


def test_lightning_moves_seeded_views_to_the_current_epoch(digits):
    import lightning as L

    from kdkit.cache import SeededViews
    from kdkit.lightning import DistillationModule

    views = SeededViews(
        IndexedDataset(TensorDataset(digits["x_train"][:64], digits["y_train"][:64])),
        num_views=3,
    )
    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(views.epoch)

    module = DistillationModule(Distiller(mlp(16), mlp(32), [Term(HintonLoss())]), 10)
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(views, batch_size=32))
    assert seen == [0, 1, 2]
