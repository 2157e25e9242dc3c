"""Tests for kdkit.cache: storage round-trip, top-k, fingerprints, integrity, resume, views."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from time import time_ns

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from kdkit.cache import SeededViews, TeacherCache, topk_compress, topk_reconstruct

N, D, C, BS = 37, 8, 10, 8  # N not a multiple of BS: the last batch is short


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


class CrashingNet(TinyNet):
    """Same state_dict as TinyNet; raises on forward number ``crash_at`` (a killed build)."""

    def __init__(self, crash_at: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.crash_at = crash_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls + 1 == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().forward(x)


class RecordingNet(TinyNet):
    """Same state_dict as TinyNet; keeps every input batch it saw."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return super().forward(x)


class Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class RandomAug(Indexed):
    """Augments with torch's global RNG on every read: not replayable by the cache."""

    def __getitem__(self, i: int):
        return self.x[i] + torch.randn(D), self.y[i], i


class Pairs(Dataset):
    """(x, y) only, for SeededViews, which adds the index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Noise:
    def __init__(self, std: float) -> None:
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)

    def __repr__(self) -> str:
        return f"Noise(std={self.std})"


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def batched(teacher: nn.Module, x: torch.Tensor, bs: int = BS) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher(x[i : i + bs]) for i in range(0, len(x), bs)])


@pytest.fixture
def data() -> Indexed:
    return Indexed(*make_data())


def test_dense_round_trip_is_exact(tmp_path, data):
    teacher = TinyNet()
    cache = TeacherCache.build(teacher, data, tmp_path / "c", batch_size=BS)
    assert teacher.calls == 5  # ceil(37 / 8) batches, one forward each
    expected = batched(teacher, data.x)  # same batch composition as the build
    out = cache.teacher_output(torch.arange(N))
    assert out["logits"].dtype == torch.float32
    assert torch.equal(out["logits"], expected)
    perm = torch.randperm(N)
    assert torch.equal(cache.teacher_output(perm)["logits"], expected[perm])
    assert torch.equal(cache.teacher_output([3, 3, 0])["logits"], expected[[3, 3, 0]])
    assert len(cache) == N and cache.num_classes == C and cache.top_k is None
    assert "features" not in out
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["samples_done"] == N
    assert meta["arrays"]["logits"]["shape"] == [1, N, C]
    assert len(meta["arrays"]["logits"]["sha256"]) == 64
    # one contiguous array, no leftovers from the atomic build
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["logits.npy", "meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    arr = np.load(tmp_path / "c" / "logits.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (1, N, C)
    with pytest.raises(IndexError, match="out of range"):
        cache.teacher_output(torch.tensor([N]))
    # pickled caches (DataLoader workers, DDP ranks) reopen their memmaps lazily
    again = pickle.loads(pickle.dumps(cache))
    assert torch.equal(again.teacher_output(torch.tensor([5]))["logits"], expected[[5]])


def test_build_again_reuses_finished_cache(tmp_path, data):
    TeacherCache.build(TinyNet(), data, tmp_path / "c", batch_size=BS)
    teacher = TinyNet()
    cache = TeacherCache.build(teacher, data, tmp_path / "c", batch_size=BS)
    assert teacher.calls == 0
    assert len(cache) == N


def test_fp16_dense_and_bytes_per_sample(tmp_path, data):
    teacher = TinyNet()
    dense = TeacherCache.build(teacher, data, tmp_path / "d", batch_size=BS)
    half = TeacherCache.build(teacher, data, tmp_path / "h", batch_size=BS, dtype=torch.float16)
    topk = TeacherCache.build(teacher, data, tmp_path / "t", batch_size=BS, top_k=3)
    assert dense.bytes_per_sample == 4 * C  # 40
    assert half.bytes_per_sample == 2 * C  # 20
    assert topk.bytes_per_sample == 3 * 2 + 3 * 2 + 4  # fp16 values, int16 indices, f32 tail
    expected = batched(teacher, data.x)
    assert torch.equal(half.teacher_output(torch.arange(N))["logits"], expected.half().float())


def test_topk_reconstruction(tmp_path, data):
    teacher = TinyNet()
    k = 3
    cache = TeacherCache.build(teacher, data, tmp_path / "t", batch_size=BS, top_k=k)
    assert cache.top_k == k
    z_t = batched(teacher, data.x)
    p_t = z_t.softmax(-1)
    z = cache.teacher_output(torch.arange(N))["logits"]
    assert z.shape == (N, C) and torch.isfinite(z).all()
    p = z.softmax(-1)
    top_p, top_i = p_t.topk(k, -1)
    # top-k classes and their probabilities are kept (fp16 log-probs: ~1e-3 relative)
    assert torch.equal(p.topk(k, -1).indices, top_i)
    torch.testing.assert_close(p.gather(-1, top_i), top_p, rtol=2e-3, atol=1e-5)
    # the tail mass 1 - sum(top-k) is spread evenly over the other C - k classes
    tail = 1 - top_p.sum(-1)
    rest = p.scatter(-1, top_i, 0.0)
    torch.testing.assert_close(rest.sum(-1), tail, rtol=2e-3, atol=1e-5)
    others = rest[rest > 0].view(N, C - k)
    even = (tail / (C - k)).unsqueeze(-1).expand(N, C - k)
    torch.testing.assert_close(others, even, rtol=2e-3, atol=1e-6)
    assert torch.equal(others, others[:, :1].expand(N, C - k))  # exactly even


def test_topk_equal_to_classes_is_exact(tmp_path, data):
    teacher = TinyNet()
    p_t = batched(teacher, data.x).softmax(-1)
    full32 = TeacherCache.build(
        teacher, data, tmp_path / "a", batch_size=BS, top_k=C, topk_dtype=torch.float32
    )
    p = full32.teacher_output(torch.arange(N))["logits"].softmax(-1)
    torch.testing.assert_close(p, p_t, rtol=1e-6, atol=1e-7)
    full16 = TeacherCache.build(teacher, data, tmp_path / "b", batch_size=BS, top_k=C)
    p16 = full16.teacher_output(torch.arange(N))["logits"].softmax(-1)
    torch.testing.assert_close(p16, p_t, rtol=5e-3, atol=1e-5)


def test_topk_helpers_known_answer():
    z = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    values, index, tail = topk_compress(z, 2)
    assert index[0, 0].item() == 0
    torch.testing.assert_close(tail, torch.tensor([0.3]))
    p = topk_reconstruct(values, index, tail, 4).softmax(-1)
    assert p[0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert p[0, index[0, 1]].item() == pytest.approx(0.2, abs=1e-6)
    assert sorted(p[0].tolist())[:2] == pytest.approx([0.15, 0.15], abs=1e-6)
    with pytest.raises(ValueError, match="top_k=11 exceeds"):
        TeacherCache.build(TinyNet(), Indexed(*make_data()), "/nonexistent/x", top_k=11)


def test_features_are_cached(tmp_path, data):
    teacher = TinyNet()
    cache = TeacherCache.build(
        teacher, data, tmp_path / "f", batch_size=BS, features=["net.0", "net.1"]
    )
    with torch.no_grad():
        hidden = torch.cat([teacher.net[0](data.x[i : i + BS]) for i in range(0, N, BS)])
    out = cache.teacher_output(torch.tensor([0, 36, 9]))
    assert set(out["features"]) == {"net.0", "net.1"}
    assert torch.equal(out["features"]["net.0"], hidden[[0, 36, 9]])
    assert torch.equal(out["features"]["net.1"], hidden[[0, 36, 9]].relu())
    assert cache.bytes_per_sample == 4 * (C + 16 + 16)
    assert cache.feature_paths == ["net.0", "net.1"]


def test_refuses_wrong_teacher_data_transform(tmp_path, data):
    teacher = TinyNet()
    path = tmp_path / "c"
    TeacherCache.build(teacher, data, path, batch_size=BS, transform_id="flip+crop")
    TeacherCache.open(path, teacher=TinyNet(), dataset=data, transform_id="flip+crop")

    other = TinyNet()
    with torch.no_grad():
        other.net[2].bias[0] += 1e-3
    with pytest.raises(ValueError, match="teacher weights differ") as err:
        TeacherCache.open(path, teacher=other)
    assert "TeacherCache.build" in str(err.value) and "dataset differs" not in str(err.value)

    x, y = make_data()
    x[N - 1, 0] += 1.0  # the last sample changed
    with pytest.raises(ValueError, match="dataset differs") as err:
        TeacherCache.open(path, teacher=teacher, dataset=Indexed(x, y), transform_id="flip+crop")
    assert "teacher" not in str(err.value).split("does not match:")[1].split(";")[0]
    assert "kdkit cache" in str(err.value)
    with pytest.raises(ValueError, match="dataset differs.*with 36 samples"):
        TeacherCache.open(path, dataset=Indexed(x[:-1], y[:-1]), transform_id="flip+crop")

    with pytest.raises(ValueError, match="transform differs") as err:
        TeacherCache.open(path, teacher=teacher, dataset=data, transform_id="flip")
    assert "dataset differs" not in str(err.value)
    assert "teacher weights" not in str(err.value)


def test_refuses_changed_transform_repr(tmp_path):
    x, y = make_data()
    path = tmp_path / "c"
    TeacherCache.build(
        TinyNet(), SeededViews(Pairs(x, y), Noise(0.1), num_views=1), path, batch_size=BS
    )
    TeacherCache.open(path, dataset=SeededViews(Pairs(x, y), Noise(0.1), num_views=1))
    with pytest.raises(ValueError, match="transform differs.*Noise\\(std=0.2\\)"):
        TeacherCache.open(path, dataset=SeededViews(Pairs(x, y), Noise(0.2), num_views=1))


def test_truncated_and_corrupted_files(tmp_path, data):
    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, path, batch_size=BS)
    file = path / "logits.npy"
    good = file.read_bytes()

    file.write_bytes(good[:-7])
    with pytest.raises(ValueError, match="logits.npy.*truncated.*rebuild"):
        TeacherCache.open(path)
    with pytest.raises(ValueError, match="logits.npy"):
        TeacherCache.open(path, verify=False)  # sizes are always checked

    bad = bytearray(good)
    bad[-5] ^= 0x01
    file.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="logits.npy.*checksum.*rebuild"):
        TeacherCache.open(path)

    file.write_bytes(good)
    TeacherCache.open(path)
    (path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="TeacherCache.build"):
        TeacherCache.open(path)


def test_dataset_without_indices_gets_wrapping_hint(tmp_path):
    x, y = make_data()
    with pytest.raises(ValueError, match=r"kdkit\.data\.IndexedDataset\(dataset\)"):
        TeacherCache.build(TinyNet(), TensorDataset(x, y), tmp_path / "c")
    # three items, but the third is not the sample index
    bad = TensorDataset(x, y, torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dataset\[\d+\] returned index 0.*IndexedDataset"):
        TeacherCache.build(TinyNet(), bad, tmp_path / "c")


@pytest.mark.parametrize(
    ("kwargs", "crash_at", "views"),
    [
        ({}, 3, False),  # dense, dies inside the only view
        ({"top_k": 4, "features": ["net.0"]}, 8, True),  # 2 views x 5 batches: dies in view 2
    ],
)
def test_resume_after_interruption_equals_uninterrupted(tmp_path, kwargs, crash_at, views):
    x, y = make_data()

    def dataset():
        if views:
            return SeededViews(Pairs(x, y), Noise(0.5), seed=7, num_views=2)
        return Indexed(x, y)

    common = {"batch_size": BS, "checkpoint_every": 1, "epochs": 2 if views else 1, **kwargs}
    path = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        TeacherCache.build(CrashingNet(crash_at), dataset(), path, **common)
    assert not path.exists()
    partial = tmp_path / ".resumed.partial" / "meta.json.partial"
    done = crash_at - 1  # batches finished before the crash; 5 batches per view
    assert json.loads(partial.read_text())["rows_done"] == (done // 5) * N + (done % 5) * BS
    with pytest.raises(FileNotFoundError, match="resume"):
        TeacherCache.open(path)

    teacher = TinyNet()
    resumed = TeacherCache.build(teacher, dataset(), path, **common)
    total_batches = 5 * common["epochs"]
    assert teacher.calls == total_batches - (crash_at - 1)  # only the missing batches ran
    assert not (tmp_path / ".resumed.partial").exists()

    fresh = TeacherCache.build(TinyNet(), dataset(), tmp_path / "fresh", **common)
    names = sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.suffix == ".npy")
    assert names == sorted(p.name for p in path.iterdir() if p.suffix == ".npy")
    for name in names:
        assert (path / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert resumed.meta["arrays"] == fresh.meta["arrays"]


def test_changed_arguments_discard_partial_build(tmp_path, data):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError):
        TeacherCache.build(CrashingNet(3), data, path, batch_size=BS, checkpoint_every=1)
    teacher = TinyNet()
    with pytest.warns(UserWarning, match="discarding the unfinished build"):
        cache = TeacherCache.build(teacher, data, path, batch_size=BS, top_k=2)
    assert teacher.calls == 5 and cache.top_k == 2


def test_random_augmentation_without_seeded_views_is_refused(tmp_path):
    with pytest.raises(ValueError, match="different inputs on two reads") as err:
        TeacherCache.build(TinyNet(), RandomAug(*make_data()), tmp_path / "c")
    assert "SeededViews" in str(err.value) and "online teacher" in str(err.value)
    assert not (tmp_path / "c").exists()


def test_views_need_seeded_views_with_matching_count(tmp_path, data):
    with pytest.raises(ValueError, match="epochs=3.*SeededViews"):
        TeacherCache.build(TinyNet(), data, tmp_path / "c", epochs=3)
    ds = SeededViews(Pairs(*make_data()), Noise(0.1), seed=0, num_views=2)
    with pytest.raises(ValueError, match="num_views is 2 but epochs=3"):
        TeacherCache.build(TinyNet(), ds, tmp_path / "c", epochs=3)


def test_seeded_views_replay_the_teachers_view(tmp_path):
    x, y = make_data()
    k = 3
    teacher = RecordingNet()
    cache = TeacherCache.build(
        teacher,
        SeededViews(Pairs(x, y), Noise(0.5), seed=11, num_views=k),
        tmp_path / "c",
        batch_size=BS,
        epochs=k,
        seed=11,
    )
    assert cache.num_views == k
    seen = [torch.cat(teacher.inputs[v * 5 : (v + 1) * 5]) for v in range(k)]
    assert not torch.equal(seen[0], seen[1])  # the views really are different augmentations
    logits = [batched(teacher, s) for s in seen]

    # the student's dataset: a fresh object (as in another process), from the cache's settings
    student_ds = cache.seeded_views(Pairs(x, y), Noise(0.5))
    TeacherCache.open(tmp_path / "c", teacher=TinyNet(), dataset=student_ds)
    idx = torch.tensor([36, 0, 17, 5])
    for epoch in range(2 * k + 1):
        student_ds.set_epoch(epoch)
        rng = torch.get_rng_state()
        inputs = torch.stack([student_ds[int(i)][0] for i in idx])
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left untouched
        assert torch.equal(inputs, seen[epoch % k][idx])
        assert all(student_ds[int(i)][2] == int(i) for i in idx)
        out = cache.teacher_output(idx, epoch)
        assert torch.equal(out["logits"], logits[epoch % k][idx])
    with pytest.raises(ValueError, match="`epoch` is required"):
        cache.teacher_output(idx)


def test_seed_comes_from_seeded_views(tmp_path):
    ds = SeededViews(Pairs(*make_data()), Noise(0.1), seed=5, num_views=1)
    cache = TeacherCache.build(TinyNet(), ds, tmp_path / "a", batch_size=BS)
    assert cache.seed == 5 and cache.seeded_views(Pairs(*make_data()), None).seed == 5
    with pytest.raises(ValueError, match="seed=4 but the dataset's SeededViews has seed=5"):
        TeacherCache.build(TinyNet(), ds, tmp_path / "b", seed=4)


def test_works_with_kdkit_indexed_dataset(tmp_path):
    data_mod = pytest.importorskip("kdkit.data.indexed")
    x, y = make_data()
    ds = data_mod.IndexedDataset(TensorDataset(x, y))
    teacher = TinyNet()
    cache = TeacherCache.build(teacher, ds, tmp_path / "c", batch_size=BS)
    assert torch.equal(cache.teacher_output(torch.arange(N))["logits"], batched(teacher, x))
    assert "IndexedDataset/TensorDataset" in cache.meta["dataset_name"]


class TokenNet(nn.Module):
    """[B, L] token ids -> [B, L, V] logits, the LM case (classes on the last dim)."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 12)
        self.head = nn.Linear(12, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_token_logits_topk(tmp_path):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (N, 6), generator=g)
    teacher = TokenNet()
    cache = TeacherCache.build(
        teacher, Indexed(ids, ids[:, 0]), tmp_path / "c", batch_size=BS, top_k=5
    )
    assert cache.num_classes == 50
    assert cache.bytes_per_sample == 6 * (5 * 2 + 5 * 2 + 4)
    z = cache.teacher_output(torch.tensor([2, 30]))["logits"]
    assert z.shape == (2, 6, 50)
    with torch.no_grad():
        p_t = teacher(ids[[2, 30]]).softmax(-1)
    top_p, top_i = p_t.topk(5, -1)
    torch.testing.assert_close(z.softmax(-1).gather(-1, top_i), top_p, rtol=2e-3, atol=1e-5)


def test_meta_json_of_the_wrong_shape_is_reported_as_corrupted(tmp_path, data):
    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, path, batch_size=BS)
    (path / "meta.json").write_text("[]")
    with pytest.raises(ValueError, match=r"meta.json is corrupted \(not a kdkit cache"):
        TeacherCache.open(path)


def test_rebuilding_with_other_settings_warns_before_replacing(tmp_path, data):
    path = tmp_path / "c"
    teacher = TinyNet()
    TeacherCache.build(teacher, data, path, batch_size=BS, top_k=2)
    with pytest.warns(UserWarning, match=r"replacing the cache"):
        cache = TeacherCache.build(teacher, data, path, batch_size=BS)
    assert cache.top_k is None


def test_augmented_reads_are_named_as_the_likely_cause(tmp_path, data):
    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, path, batch_size=BS, transform_id="t")
    x, y = make_data()
    x[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"same class and length.*data.augment=false"):
        TeacherCache.open(path, dataset=Indexed(x, y), transform_id="t")


# ---- a resumed build trusts only verified blocks ---------------------------------------------


def _npy_rows(file, n_rows: int = N, row_bytes: int = 4 * C) -> tuple[int, int]:
    """Byte offset of row 0 in an ``[1, N, C]`` float32 ``.npy`` file, and the bytes per row."""
    return file.stat().st_size - n_rows * row_bytes, row_bytes


def _same_bytes(a, b) -> None:
    names = sorted(p.name for p in b.iterdir() if p.suffix == ".npy")
    assert names == sorted(p.name for p in a.iterdir() if p.suffix == ".npy")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _truncate(file, start: int, row: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(start + row * 12 + 5)  # inside block 1 (rows 8..15)


def _flip(file, start: int, row: int) -> None:
    data = bytearray(file.read_bytes())
    data[start + row * 10 + 3] ^= 0x40  # row 10: block 1
    file.write_bytes(bytes(data))


def _zero(file, start: int, row: int) -> None:
    data = bytearray(file.read_bytes())
    data[start + row * 8 : start + row * 16] = bytes(row * 8)  # all of block 1
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip, _zero], ids=["truncate", "flip", "zero"])
def test_resume_recomputes_damaged_blocks(tmp_path, data, damage, caplog):
    # Blocks of 8 rows (one batch each); the crash leaves blocks 0..2 (rows 0..23) recorded.
    common = {"batch_size": BS, "checkpoint_every": 1}
    path = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        TeacherCache.build(CrashingNet(4), data, path, **common)
    file = tmp_path / ".c.partial" / "logits.npy"
    damage(file, *_npy_rows(file))

    teacher = TinyNet()
    with caplog.at_level("INFO", logger="kdkit.cache"):
        TeacherCache.build(teacher, data, path, **common)
    # block 1 failed verification (and, when truncated, block 2 lost its rows too)
    recomputed = 2 if damage is _truncate else 1
    assert teacher.calls == 2 + recomputed  # blocks 3, 4 were never done
    log = caplog.text
    assert "resuming" in log and f"{recomputed} block(s) failed verification" in log
    fresh = TeacherCache.build(TinyNet(), data, tmp_path / "fresh", **common)
    _same_bytes(path, tmp_path / "fresh")
    assert json.loads((path / "meta.json").read_text())["arrays"] == fresh.meta["arrays"]


def test_resume_recomputes_block_whose_feature_array_is_damaged(tmp_path, data):
    common = {"batch_size": BS, "checkpoint_every": 2, "top_k": 3, "features": ["net.0"]}
    path = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        TeacherCache.build(CrashingNet(5), data, path, **common)  # blocks of 16 rows: 0, 1 done
    feat = tmp_path / ".c.partial" / "feat_000.npy"
    raw = bytearray(feat.read_bytes())
    raw[-(N - 20) * 16 * 4] ^= 0x01  # row 20 of the features: block 1
    feat.write_bytes(bytes(raw))
    teacher = TinyNet()
    TeacherCache.build(teacher, data, path, **common)
    assert teacher.calls == 2 + 1  # block 1 again (2 batches), block 2 (1 short batch)
    TeacherCache.build(TinyNet(), data, tmp_path / "fresh", **common)
    _same_bytes(path, tmp_path / "fresh")


def test_partial_state_records_a_checksum_per_block(tmp_path, data):
    with pytest.raises(RuntimeError):
        TeacherCache.build(CrashingNet(4), data, tmp_path / "c", batch_size=BS, checkpoint_every=1)
    state = json.loads((tmp_path / ".c.partial" / "meta.json.partial").read_text())
    assert state["block_rows"] == BS
    sums = state["blocks"][0]
    assert [s is not None for s in sums] == [True, True, True, False, False]
    arr = np.load(tmp_path / ".c.partial" / "logits.npy", mmap_mode="r")
    import hashlib

    assert sums[1]["logits"] == hashlib.sha256(arr[0, 8:16].tobytes()).hexdigest()


_KILL_SCRIPT = """
import sys, time, torch
from torch import nn
from torch.utils.data import Dataset
from kdkit.cache import TeacherCache

class Indexed(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i], i

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear({D}, 16), nn.ReLU(), nn.Linear(16, {C}))
    def forward(self, x):
        time.sleep(0.4)  # slow enough to be killed mid-build
        return self.net(x)

teacher = TinyNet()
teacher.load_state_dict(torch.load(sys.argv[1]))
x, y = torch.load(sys.argv[2])
TeacherCache.build(teacher, Indexed(x, y), sys.argv[3], batch_size={BS}, checkpoint_every=1,
                   progress=False)
"""


def test_kill_9_then_corruption_resumes_to_identical_bytes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    teacher, (x, y) = TinyNet(), make_data()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    torch.save((x, y), tmp_path / "data.pt")
    script = tmp_path / "build.py"
    script.write_text(_KILL_SCRIPT.format(D=D, C=C, BS=BS))
    path = tmp_path / "c"
    partial = tmp_path / ".c.partial" / "meta.json.partial"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(script), str(tmp_path / "teacher.pt"), str(tmp_path / "data.pt")]
    proc = subprocess.Popen([*args, str(path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.is_file() and json.loads(partial.read_text())["rows_done"] >= 2 * BS:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not path.exists()
    file = tmp_path / ".c.partial" / "logits.npy"
    _zero(file, *_npy_rows(file))  # block 1 zeroed after the kill
    TeacherCache.build(TinyNet(), Indexed(x, y), path, batch_size=BS, checkpoint_every=1)
    TeacherCache.build(TinyNet(), Indexed(x, y), tmp_path / "fresh", batch_size=BS)
    _same_bytes(path, tmp_path / "fresh")


# ---- progress ---------------------------------------------------------------------------------


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(tmp_path, data, monkeypatch, capsys):
    TeacherCache.build(TinyNet(), data, tmp_path / "a", batch_size=BS)
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    TeacherCache.build(TinyNet(), data, tmp_path / "b", batch_size=BS)
    shown = "".join(term.parts)
    assert "samples/s" in shown and f"{N}/{N}" in shown
    term.parts.clear()
    TeacherCache.build(TinyNet(), data, tmp_path / "c", batch_size=BS, progress=False)
    assert term.parts == []


def test_resume_is_logged_with_where_it_continues(tmp_path, data, caplog):
    with pytest.raises(RuntimeError):
        TeacherCache.build(CrashingNet(4), data, tmp_path / "c", batch_size=BS, checkpoint_every=1)
    with caplog.at_level("INFO", logger="kdkit.cache"):
        TeacherCache.build(TinyNet(), data, tmp_path / "c", batch_size=BS, checkpoint_every=1)
    assert "resuming" in caplog.text
    assert "24 of 37 rows verified" in caplog.text and "view 0, sample 24" in caplog.text
    assert "failed verification" not in caplog.text


# ---- verification once per process ------------------------------------------------------------


def _count_hashes(monkeypatch) -> list[str]:
    from kdkit.cache import store

    calls: list[str] = []
    real = store._sha256_file

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(store, "_sha256_file", counting)
    return calls


def test_second_open_does_not_rehash_unchanged_files(tmp_path, data, monkeypatch):
    from kdkit.cache import store

    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, path, batch_size=BS, top_k=3)
    # the files were written long ago (racily recent files are always re-hashed)
    monkeypatch.setattr(store, "_now_ns", lambda: time_ns() + 3600 * 10**9)
    calls = _count_hashes(monkeypatch)
    TeacherCache.open(path)
    assert sorted(calls) == ["topk_index.npy", "topk_logp.npy", "topk_tail.npy"]
    TeacherCache.open(path, teacher=TinyNet(), dataset=data)
    TeacherCache.open(str(path) + "/")  # the same files by another spelling of the path
    assert len(calls) == 3

    # same size, same inode, new content: refused
    file = path / "topk_tail.npy"
    stat = file.stat()
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0x01
    file.write_bytes(bytes(raw))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="topk_tail.npy fails its sha256"):
        TeacherCache.open(path)


def test_recently_written_file_is_rehashed_on_every_open(tmp_path, data):
    # A change within the file system's timestamp granularity keeps size, mtime and inode: a
    # file modified around the time it was verified is never trusted by its identity alone.
    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, path, batch_size=BS)
    TeacherCache.open(path)
    file = path / "logits.npy"
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0x10
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fails its sha256"):
        TeacherCache.open(path)


# ---- labels are not part of what the cache stores ----------------------------------------------


def test_hidden_labels_do_not_change_the_cache(tmp_path):
    from kdkit.data import IndexedDataset
    from kdkit.data.indexed import unlabeled_mask

    x, y = make_data()
    all_labels = IndexedDataset(TensorDataset(x, y))
    tenth = IndexedDataset(TensorDataset(x, y), hide_labels=unlabeled_mask(N, 0.1))
    half = IndexedDataset(TensorDataset(x, y), hide_labels=unlabeled_mask(N, 0.5))
    teacher = TinyNet()
    cache = TeacherCache.build(teacher, tenth, tmp_path / "c", batch_size=BS)
    TeacherCache.open(tmp_path / "c", teacher=teacher, dataset=all_labels)
    TeacherCache.open(tmp_path / "c", teacher=teacher, dataset=half)
    again = TeacherCache.build(TinyNet(), half, tmp_path / "c", batch_size=BS)
    assert again.meta["fingerprint"] == cache.meta["fingerprint"]
    # the inputs still count
    x2 = x.clone()
    x2[0, 0] += 1.0
    with pytest.raises(ValueError, match="dataset differs"):
        TeacherCache.open(tmp_path / "c", dataset=IndexedDataset(TensorDataset(x2, y)))


def test_unreadable_partial_header_or_record_is_rebuilt(tmp_path, data, caplog):
    common = {"batch_size": BS, "checkpoint_every": 1}
    path = tmp_path / "c"
    TeacherCache.build(TinyNet(), data, tmp_path / "fresh", **common)

    with pytest.raises(RuntimeError):
        TeacherCache.build(CrashingNet(4), data, path, **common)
    file = tmp_path / ".c.partial" / "logits.npy"
    raw = bytearray(file.read_bytes())
    raw[10:20] = b"garbage!!!"  # inside the .npy header
    file.write_bytes(bytes(raw))
    teacher = TinyNet()
    with caplog.at_level("INFO", logger="kdkit.cache"):
        TeacherCache.build(teacher, data, path, **common)
    assert teacher.calls == 5 and "3 block(s) failed verification" in caplog.text
    _same_bytes(path, tmp_path / "fresh")

    shutil.rmtree(path)
    with pytest.raises(RuntimeError):
        TeacherCache.build(CrashingNet(4), data, path, **common)
    (tmp_path / ".c.partial" / "meta.json.partial").write_text('{"settings": ')
    teacher = TinyNet()
    with pytest.warns(UserWarning, match="progress record meta.json.partial is unreadable"):
        TeacherCache.build(teacher, data, path, **common)
    assert teacher.calls == 5
    _same_bytes(path, tmp_path / "fresh")
