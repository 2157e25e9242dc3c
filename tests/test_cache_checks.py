"""kdkit.cache.checks: the error messages a user reads when a dataset cannot be cached."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset

from kdkit.cache import SeededViews
from kdkit.cache.checks import _check_replayable


class OsRandomNoise(Dataset):
    """Noise from os.urandom: an RNG SeededViews cannot seed, so two reads differ."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        noise = int.from_bytes(os.urandom(4), "little") / 2**32
        return torch.full((3,), float(i) + noise), 0


def test_non_replayable_base_inside_seeded_views_reads_as_a_sentence():
    with pytest.raises(ValueError, match="different inputs") as err:
        _check_replayable(SeededViews(OsRandomNoise(), num_views=1), 4, epochs=1)
    assert "on two reads inside SeededViews (" in str(err.value)
