"""TokenCache (per-token top-k + tail, flat, resumable, verified) and the sparse KL loss."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit import functional as KF
from kdkit.cache import TokenCache, TopKTokens, topk_log_compress
from kdkit.cache.fingerprint import _probe_indices
from kdkit.data import IndexedDataset
from kdkit.data.text import IGNORE_INDEX, TokenSequences, collate_sequences
from kdkit.losses import KLDivLoss, SparseKLDivLoss

V = 50


class TinyLM(nn.Module):
    """A causal LM: position t sees tokens <= t (a running mean of embeddings)."""

    def __init__(self, vocab: int = V, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.emb(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return 3 * self.head(h)


class Crashing(TinyLM):
    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.calls + 1 == self.crash_at:
            raise KeyboardInterrupt
        return super().forward(input_ids)


def _docs(n: int = 7, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(length),), generator=g) for length in range(5, 5 + 6 * n, 6)]


@pytest.fixture
def data() -> TokenSequences:
    return TokenSequences(_docs(), max_length=12)


def _dense_logp(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids.unsqueeze(0))[0].float(), -1)


# ---- the sparse loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sparse_kl_equals_dense_kl_when_k_is_vocab(temperature):
    torch.manual_seed(0)
    s = torch.randn(2, 5, V, requires_grad=True)
    t = torch.randn(2, 5, V) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    values, index, log_tail = topk_log_compress(t, V)
    assert torch.isneginf(log_tail).all()
    sparse = KF.sparse_kl_div(s, (values, index, log_tail), temperature, mask)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    dense = KF.kl_div(s, t, temperature, mask)
    (g_dense,) = torch.autograd.grad(dense, s)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)
    assert g_sparse[0, 3:].abs().sum() == 0  # masked tokens get no gradient


def test_sparse_kl_is_the_kl_of_the_merged_tail_bucket():
    torch.manual_seed(1)
    k = 4
    s = torch.randn(3, V, requires_grad=True)
    t = torch.randn(3, V) * 3
    values, index, log_tail = topk_log_compress(t, k)
    got = KF.sparse_kl_div(s, (values, index, log_tail), reduction="none")
    p, q = t.softmax(-1), s.softmax(-1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, index, True)
    p_b = torch.cat([p[kept].view(3, k), (p * ~kept).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q[kept].view(3, k), (q * ~kept).sum(-1, keepdim=True)], -1)
    # topk order vs boolean order: compare as sums, which do not depend on the order
    want = (p_b * (p_b.log() - q_b.log())).sum(-1)
    assert torch.allclose(got, want, atol=1e-5)
    # a lower bound of the full KL (data processing inequality), and 0 for a perfect student
    assert (got <= KF.kl_div(s, t, reduction="none") + 1e-6).all()
    assert KF.sparse_kl_div(t, (values, index, log_tail)).item() == pytest.approx(0, abs=1e-6)


def test_sparse_kl_loss_honours_ignore_index_and_matches_mask():
    torch.manual_seed(2)
    s = torch.randn(2, 6, V)
    t = torch.randn(2, 6, V)
    labels = torch.randint(0, V, (2, 6))
    labels[0, 4:] = IGNORE_INDEX
    cached = topk_log_compress(t, 8)
    # NaN at an ignored position never reaches the value
    s[0, 5] = float("nan")
    loss = SparseKLDivLoss(ignore_index=IGNORE_INDEX)
    by_labels = loss(s, cached, target=labels)
    by_mask = SparseKLDivLoss()(s, cached, mask=labels != IGNORE_INDEX)
    assert torch.isfinite(by_labels) and by_labels.item() == pytest.approx(by_mask.item())
    kept = labels != IGNORE_INDEX
    rows = KF.sparse_kl_div(s.nan_to_num(), cached, reduction="none")
    assert by_labels.item() == pytest.approx((rows[kept].sum() / kept.sum()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="ignore_index is None"):
        SparseKLDivLoss()(s, cached, target=labels)


def test_sparse_kl_refuses_mismatched_shapes():
    s = torch.randn(2, 3, V)
    values, index, log_tail = topk_log_compress(torch.randn(2, 4, V), 5)
    with pytest.raises(ValueError, match=r"need teacher values and indices \[\*\[2, 3\], k\]"):
        KF.sparse_kl_div(s, (values, index, log_tail))
    with pytest.raises(TypeError, match=r"\(values, indices, log_tail\)"):
        KF.sparse_kl_div(s, torch.randn(2, 3, V))


def test_re_temperature_exact_ratios_and_exact_for_uniform_tail():
    torch.manual_seed(3)
    z = torch.randn(4, V) * 2
    k = 6
    values, index, log_tail = topk_log_compress(z, k)
    for temperature in (0.5, 2.0, 4.0):
        v_t, tail_t = KF.topk_at_temperature(values, log_tail, V, temperature)
        true = torch.log_softmax(z / temperature, -1).gather(-1, index)
        # kept ratios exact: the differences of log-probs match
        assert torch.allclose(v_t - v_t[..., :1], true - true[..., :1], atol=1e-5)
        total = torch.cat([v_t, tail_t[:, None]], -1).logsumexp(-1)
        assert torch.allclose(total, torch.zeros(4), atol=1e-6)
        # the even-spread estimate over-estimates the tail for T > 1, under for T < 1
        true_tail = (1 - true.exp().sum(-1)).log()
        over = tail_t >= true_tail - 1e-5
        under = tail_t <= true_tail + 1e-5
        assert (over if temperature > 1 else under).all()
    # a truly uniform tail: every temperature is exact
    zu = torch.cat([torch.tensor([[3.0, 2.0, 1.0]]), torch.zeros(1, V - 3)], -1)
    values, index, log_tail = topk_log_compress(zu, 3)
    v_t, tail_t = KF.topk_at_temperature(values, log_tail, V, 3.0)
    assert torch.allclose(v_t, torch.log_softmax(zu / 3.0, -1)[:, :3], atol=1e-5)
    assert KF.topk_at_temperature(values, log_tail, V, 1.0)[0] is values


# ---- the cache ---------------------------------------------------------------------------------


def test_build_round_trip_no_padding_stored(tmp_path, data):
    teacher = TinyLM()
    cache = TokenCache.build(teacher, data, tmp_path / "c", top_k=5, batch_size=3, progress=False)
    assert len(cache) == len(data) and cache.num_tokens == sum(data.lengths)
    assert cache.lengths.tolist() == data.lengths
    assert cache.bytes_per_token == 5 * 2 + 5 * 2 + 2  # fp16 values, uint16 ids, fp16 log tail
    arrays = cache.meta["arrays"]
    assert arrays["topk_index"]["dtype"] == "uint16"
    assert arrays["topk_logp"]["shape"] == [1, cache.num_tokens, 5]
    out = cache.teacher_output(torch.tensor([4, 0, 2]))
    assert isinstance(out, TopKTokens) and out.values.shape == (
        3,
        max(data.lengths[i] for i in (4, 0, 2)),
        5,
    )
    assert out.lengths.tolist() == [data.lengths[i] for i in (4, 0, 2)]
    for row, i in enumerate((4, 0, 2)):
        n = data.lengths[i]
        logp = _dense_logp(teacher, data[i][0])
        want_v, want_i, want_tail = topk_log_compress(logp, 5)
        assert torch.equal(out.indices[row, :n], want_i)
        assert torch.allclose(out.values[row, :n], want_v, atol=2e-3, rtol=1e-3)
        assert torch.allclose(out.log_tail[row, :n], want_tail, atol=2e-3, rtol=1e-3)
        assert not out.mask[row, n:].any() and out.mask[row, :n].all()
        assert (out.values[row, n:] == 0).all()


def test_padding_in_a_batch_does_not_change_a_causal_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0
    )
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(config)
    data = TokenSequences(_docs(4), max_length=16)
    cache = TokenCache.build(gpt, data, tmp_path / "g", top_k=V, batch_size=4, progress=False)
    out = cache.teacher_output([0])  # the shortest sequence, cached in a padded batch
    gpt.eval()  # build restores the mode it found (training, for a fresh HF model)
    with torch.no_grad():
        alone = torch.log_softmax(gpt(data[0][0].unsqueeze(0)).logits[0], -1)
    assert torch.allclose(out.dense()[0], alone, atol=4e-3)  # fp16 storage
    assert cache.bytes_per_token == V * 4 + 2


def test_dense_spreads_the_tail_uniformly_and_is_exact_at_k_equal_v(tmp_path, data):
    teacher = TinyLM()
    full = TokenCache.build(teacher, data, tmp_path / "f", top_k=V, progress=False)
    out = full.teacher_output([1])
    n = data.lengths[1]
    # fp16 storage: half a unit in the last place of log-probs in [-8, -4) is 2e-3
    assert torch.allclose(out.dense()[0, :n], _dense_logp(teacher, data[1][0]), atol=4e-3)
    top = TokenCache.build(teacher, data, tmp_path / "t", top_k=3, progress=False)
    dense = top.teacher_output([1]).dense()[0, :n]
    assert torch.allclose(dense.logsumexp(-1), torch.zeros(n), atol=1e-5)
    others = dense.exp().sort(-1).values[:, : V - 3]  # the V - 3 smallest: all equal
    assert torch.allclose(others, others[:, :1].expand_as(others), rtol=1e-5)


def test_open_refuses_other_teacher_data_tokenizer_and_vocab(tmp_path, data):
    path = tmp_path / "c"
    TokenCache.build(TinyLM(), data, path, top_k=4, tokenizer_id="tok-a", progress=False)
    cache = TokenCache.open(path, teacher=TinyLM(), dataset=data, tokenizer_id="tok-a")
    assert cache.vocab_size == V
    with pytest.raises(ValueError, match="teacher weights differ"):
        TokenCache.open(path, teacher=TinyLM(seed=5))
    with pytest.raises(ValueError, match="dataset differs"):
        TokenCache.open(path, dataset=TokenSequences(_docs(seed=9), max_length=12))
    cache.check(dataset=data)
    # same class, length and probed sequences, but a sequence that is not probed is shorter
    longer = TokenSequences(_docs(40), max_length=12)
    TokenCache.build(TinyLM(), longer, tmp_path / "l", top_k=4, progress=False)
    probes = set(_probe_indices(len(longer)))
    j = next(i for i in range(len(longer)) if i not in probes and longer.lengths[i] > 1)
    d, start, length = longer.pieces[j]
    longer.pieces[j] = (d, start, length - 1)
    with pytest.raises(ValueError, match="sequence lengths are not the ones cached"):
        TokenCache.open(tmp_path / "l", dataset=longer)
    with pytest.raises(ValueError, match=r"tokenizer differs.*vocabulary size differs"):
        TokenCache.open(path, tokenizer_id="tok-b", vocab_size=V + 1)


def test_corrupted_array_fails_its_checksum(tmp_path, data):
    path = tmp_path / "c"
    TokenCache.build(TinyLM(), data, path, top_k=4, progress=False)
    file = path / "topk_logp.npy"
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"topk_logp\.npy fails its sha256"):
        TokenCache.open(path)
    TokenCache.open(path, verify=False)  # sizes only


def test_interrupted_build_resumes_from_verified_blocks(tmp_path, data, caplog):
    path = tmp_path / "c"
    common = {"top_k": 4, "batch_size": 2, "checkpoint_every": 1, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(Crashing(crash_at=4), data, path, **common)  # 3 blocks of 2 done
    with pytest.raises(FileNotFoundError, match="not finished"):
        TokenCache.open(path)
    partial = tmp_path / ".c.partial"
    state = json.loads((partial / "meta.json.partial").read_text())
    assert sum(b is not None for b in state["blocks"][0]) == 3
    # damage block 1's rows on disk: it must be computed again
    start = state["meta"]["arrays"]["topk_logp"]
    arr = np.load(partial / start["file"], mmap_mode="r+")
    lo = sum(data.lengths[:2])
    arr[0, lo] = 0
    arr.flush()
    del arr
    teacher = TinyLM()
    with caplog.at_level(logging.INFO, logger="kdkit.cache.partial"):
        resumed = TokenCache.build(teacher, data, path, **common)
    blocks = math.ceil(len(data) / 2)
    assert teacher.calls == blocks - 3 + 1
    assert "1 block(s) failed verification" in caplog.text and "TokenCache.build" in caplog.text
    fresh = TokenCache.build(TinyLM(), data, tmp_path / "fresh", **common)
    for name in ("topk_logp", "topk_index", "log_tail", "offsets"):
        assert resumed.meta["arrays"][name]["sha256"] == fresh.meta["arrays"][name]["sha256"]
    # a second build with the same arguments opens it
    again = TinyLM()
    TokenCache.build(again, data, path, **common)
    assert again.calls == 0


def test_dataloader_with_per_token_labels_through_indexed_dataset(tmp_path):
    base = TokenSequences(_docs(), max_length=12)
    plain = [(x, y) for x, y, _ in (base[i] for i in range(len(base)))]
    data = IndexedDataset(plain)  # per-token labels pass through (they broke on int(y))
    teacher = TinyLM()
    cache = TokenCache.build(teacher, data, tmp_path / "c", top_k=V, progress=False)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate_sequences)
    student = TinyLM(seed=3)
    for ids, labels, index in loader:
        cached = cache.teacher_output(index)
        assert cached.values.shape[:2] == ids.shape and torch.equal(cached.mask, labels != -100)
        logits = student(ids)
        sparse = SparseKLDivLoss(ignore_index=-100)(logits, cached, target=labels)
        with torch.no_grad():
            teacher_logits = teacher(ids)
        dense = KLDivLoss(ignore_index=-100)(logits, teacher_logits, target=labels)
        assert sparse.item() == pytest.approx(dense.item(), rel=2e-3)


def test_build_refuses_bad_arguments(tmp_path, data):
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        TokenCache.build(TinyLM(), data, tmp_path / "c", top_k=0)
    with pytest.raises(ValueError, match=r"top_k=51 exceeds the teacher's vocabulary size V=50"):
        TokenCache.build(TinyLM(), data, tmp_path / "c", top_k=V + 1, progress=False)
    unindexed = [(x, y, 0) for x, y, _ in (data[i] for i in range(len(data)))]
    with pytest.raises(ValueError, match=r"dataset\[1\] must be \(input_ids, labels, 1\)"):
        TokenCache.build(TinyLM(), unindexed, tmp_path / "d", top_k=3, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        TokenCache.build(TinyLM(), data, tmp_path / "e", top_k=3, progress=False).teacher_output(
            [len(data)]
        )


def test_sparse_kl_on_bf16_student_logits_matches_float32_on_the_same_values():
    torch.manual_seed(3)
    s = torch.randn(2, 5, V).to(torch.bfloat16)
    t = torch.randn(2, 5, V) * 2
    t[..., -3:] = float("-inf")  # masked vocabulary in the teacher
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s_low = s.clone().requires_grad_(True)
    s_high = s.float().masked_fill(~mask[..., None], float("nan")).requires_grad_(True)
    teacher = topk_log_compress(t, 8)
    low = KF.sparse_kl_div(s_low, teacher, 2.0, mask)
    high = KF.sparse_kl_div(s_high, teacher, 2.0, mask)  # NaN at the dropped tokens
    assert torch.isfinite(high) and low.dtype == torch.float32
    torch.testing.assert_close(low, high, rtol=1e-5, atol=1e-6)
    (g_low,) = torch.autograd.grad(low, s_low)
    (g_high,) = torch.autograd.grad(high, s_high)
    assert torch.isfinite(g_high).all() and (g_high[~mask] == 0).all()
    torch.testing.assert_close(g_low.float(), g_high, rtol=1e-2, atol=1e-3)
