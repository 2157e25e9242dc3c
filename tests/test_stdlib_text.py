"""The stdlib text corpus, its tokenizers and the token datasets."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from kdkit.data import stdlib_text
from kdkit.data.stdlib_text import STDLIB_FILES, load_stdlib_corpus, split_of
from kdkit.data.text import IGNORE_INDEX, TokenBlocks, TokenSequences, collate_sequences
from kdkit.data.tokenizer import CharVocab, encode_documents, stdlib_bpe, train_bpe


@pytest.fixture(scope="module")
def corpus() -> stdlib_text.StdlibCorpus:
    return load_stdlib_corpus()


def test_file_list_is_fixed_and_present(corpus):
    assert len(STDLIB_FILES) == len(set(STDLIB_FILES)) == 287
    assert all(name.endswith(".py") and not name.startswith("/") for name in STDLIB_FILES)
    sizes = {s: len(corpus.split(s)) for s in stdlib_text.SPLITS}
    assert sum(sizes.values()) == 287 and sizes["val"] > 10 and sizes["test"] > 10
    assert corpus.stdlib_dir == sysconfig.get_paths()["stdlib"]


def test_split_is_a_pure_function_of_the_name(corpus):
    assert [split_of(n) for n in ("codecs.py", "json/tool.py", "abc.py")] == [
        "val",
        "val",
        "train",
    ]
    assert [d.name for d in corpus.val] == [n for n in STDLIB_FILES if split_of(n) == "val"]
    assert not {d.name for d in corpus.train} & {d.name for d in corpus.test}


def test_sha256_covers_contents_and_is_recorded(corpus, tmp_path):
    again = load_stdlib_corpus()
    assert again.sha256 == corpus.sha256 and len(corpus.sha256) == 64
    info = corpus.describe()
    assert info["sha256"] == corpus.sha256 and info["python_version"] == corpus.python_version
    assert "differ between Python versions" in info["note"]
    # a copy with one changed file (and CRLF line endings elsewhere) hashes differently / alike
    root = Path(corpus.stdlib_dir)
    files = STDLIB_FILES[:3]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((root / name).read_bytes().replace(b"\n", b"\r\n"))
    crlf = load_stdlib_corpus(tmp_path, files)
    assert crlf.sha256 == load_stdlib_corpus(root, files).sha256
    (tmp_path / files[0]).write_text("changed\n")
    assert load_stdlib_corpus(tmp_path, files).sha256 != crlf.sha256


def test_missing_file_is_named(tmp_path):
    (tmp_path / "abc.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 listed .* argparse\.py.*stdlib_dir="):
        load_stdlib_corpus(tmp_path, ("abc.py", "argparse.py"))


def test_char_vocab_round_trip(corpus):
    vocab = CharVocab.from_texts(d.text for d in corpus.train[:5])
    text = corpus.train[0].text[:200]
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.encode("\x00") == [0] and vocab.eos_id is None
    assert vocab.vocab_size == len(vocab.chars) + 1
    assert CharVocab(vocab.chars).identity == vocab.identity


def test_bpe_training_is_deterministic(corpus):
    texts = [d.text for d in corpus.train[:12]]
    a, b = train_bpe(texts, 600), train_bpe(texts, 600)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab() and a.identity == b.identity
    assert a.vocab_size == 600 and a.eos_id == 0
    sample = corpus.val[0].text[:300]
    assert a.decode(a.encode(sample)) == sample
    with pytest.raises(ValueError, match="vocab_size must be an int above 257"):
        train_bpe(texts, 100)


def test_stdlib_bpe_is_cached_atomically_by_corpus_vocab_and_version(corpus, tmp_path, monkeypatch):
    import tokenizers

    small = stdlib_text.StdlibCorpus(corpus.train[:6], (), (), corpus.sha256, "x", "")
    first = stdlib_bpe(small, 500, cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.json")
    assert corpus.sha256[:16] in file.name and "v500" in file.name
    assert tokenizers.__version__ in file.name
    monkeypatch.setattr(
        "kdkit.data.tokenizer.train_bpe", lambda *a: pytest.fail("retrained a cached tokenizer")
    )
    assert stdlib_bpe(small, 500, cache_dir=tmp_path).identity == first.identity
    monkeypatch.undo()
    file.write_text("{not json")
    assert stdlib_bpe(small, 500, cache_dir=tmp_path).identity == first.identity
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]  # no temporary left


def test_token_blocks_shift_labels_once():
    ids = torch.arange(11)
    blocks = TokenBlocks(ids, 4)
    assert len(blocks) == 2
    x, y, i = blocks[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8] and i == 1
    with pytest.raises(ValueError, match="1-D tensor"):
        TokenBlocks(ids.view(1, -1), 4)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        TokenBlocks(ids, 0)


def test_token_sequences_cover_each_document_and_collate():
    docs = [torch.arange(10), torch.tensor([7]), torch.arange(100, 104)]
    data = TokenSequences(docs, max_length=4)
    assert data.lengths == [4, 4, 1, 3]  # 9 predictions of doc 0, none of doc 1, 3 of doc 2
    x, y, _ = data[2]
    assert x.tolist() == [8] and y.tolist() == [9]
    ids, labels, index = collate_sequences([data[2], data[3]], pad_id=5)
    assert ids.tolist() == [[8, 5, 5], [100, 101, 102]]
    assert labels.tolist() == [[9, IGNORE_INDEX, IGNORE_INDEX], [101, 102, 103]]
    assert index.tolist() == [2, 3]


def test_encode_documents_appends_eos(corpus):
    bpe = train_bpe([d.text for d in corpus.train[:4]], 400)
    (ids,) = encode_documents(["def f():\n    return 1\n"], bpe)
    assert ids[-1].item() == bpe.eos_id and ids.dtype == torch.long
    (chars,) = encode_documents(["ab"], CharVocab("ab"))
    assert chars.tolist() == [1, 2]
