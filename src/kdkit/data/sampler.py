"""``EpochShuffleSampler``: a shuffle whose order is a pure function of ``(seed, epoch)``.

A ``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from ``g``'s running
state, which no checkpoint holds: a run resumed at epoch 16 would replay epoch 0's order.
Here the order depends only on the seed and the epoch Lightning sets before each epoch
(``set_epoch``), so a resumed run sees exactly the batches the uninterrupted one saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import RandomSampler


class EpochShuffleSampler(RandomSampler):
    """Shuffles ``range(len(data_source))`` anew each epoch, reproducibly.

    The order of epoch ``e`` is ``randperm(n)`` under a generator seeded from
    ``SeedSequence([seed, e])`` (well mixed: seed 0 epoch 1 and seed 1 epoch 0 are unrelated).
    It is a :class:`~torch.utils.data.RandomSampler`, so Lightning knows the loader shuffles
    and, under DDP, replaces it with a ``DistributedSampler(shuffle=True)``, whose order is
    likewise a function of (seed, epoch).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order ``__iter__`` yields (Lightning calls it before each epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()  # type: ignore[arg-type]
