"""The labelled text set every machine has (standard library docstrings by package), its cached
word-level tokenizer and the registered ``stdlib_docstrings`` data set."""

from __future__ import annotations

import collections

import pytest
import torch

from kdkit.data import KDDataModule, dataset_meta
from kdkit.data.docstrings import PACKAGES, load_docstrings, split_of

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def docs():
    return load_docstrings()


def test_docstrings_are_labelled_by_package_and_split_by_text(docs):
    assert docs.packages == PACKAGES
    for split in ("train", "val", "test"):
        for d in docs.split(split):
            assert split_of(d.text) == split
            assert d.source.split("/")[0] == PACKAGES[d.label]
    total = sum(len(docs.split(s)) for s in ("train", "val", "test"))
    assert total > 1000
    assert 0.6 < len(docs.train) / total < 0.8
    # every class in every split; no text twice (not within a split, not across splits)
    for split in ("train", "val", "test"):
        assert set(collections.Counter(d.label for d in docs.split(split))) == set(range(8))
    texts = [d.text for s in ("train", "val", "test") for d in docs.split(s)]
    assert len(set(texts)) == len(texts)
    assert docs.describe()["samples"]["train"] == len(docs.train)


def test_docstrings_from_another_lib_dir(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""Package docstring long enough."""\n')
    (tmp_path / "pkg" / "mod.py").write_text(
        'def f():\n    """Function docstring, long enough."""\n'
        "class C:\n    def g(self):\n"
        '        """Method docstring, long enough too."""\n'
        '        x = """not a docstring, an expression"""\n'
        'def short():\n    """Too short."""\n'
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text('"""Function docstring, long enough."""\n')
    got = load_docstrings(tmp_path, packages=("pkg", "other"))
    texts = sorted(d.text for s in ("train", "val", "test") for d in got.split(s))
    # the text both packages hold is dropped (it would have two labels)
    assert texts == ["Method docstring, long enough too.", "Package docstring long enough."]
    with pytest.raises(FileNotFoundError, match=r"\['missing'\].*stdlib_dir="):
        load_docstrings(tmp_path, packages=("pkg", "missing"))


def test_docstrings_of_functions_under_except_and_match_are_samples(tmp_path):
    # e.g. locale.localeconv, defined in an ``except ImportError:`` fallback
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        "try:\n    from _fast import f\nexcept ImportError:\n"
        '    def f():\n        """The fallback under except, documented."""\n'
        "match 1:\n    case 1:\n"
        '        def g():\n            """A function in a match case, documented."""\n'
    )
    got = load_docstrings(tmp_path, packages=("pkg",))
    texts = sorted(d.text for s in ("train", "val", "test") for d in got.split(s))
    assert texts == [
        "A function in a match case, documented.",
        "The fallback under except, documented.",
    ]


def test_word_tokenizer_is_built_once_and_cached(tmp_path, monkeypatch):
    from kdkit.data import word_tokenizer

    texts = ["the event loop runs the task", "an email message has headers"] * 20
    first = word_tokenizer.cached_word_tokenizer(texts, 60, 16, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    monkeypatch.setattr(
        word_tokenizer, "train_word_tokenizer", lambda *a: pytest.fail("trained again")
    )
    second = word_tokenizer.cached_word_tokenizer(texts, 60, 16, cache_dir=tmp_path)
    assert second.get_vocab() == first.get_vocab()
    ids = second("the event loop")["input_ids"]
    assert ids[0] == second.cls_token_id and ids[-1] == second.sep_token_id
    assert second.pad_token_id == 0
    assert len(second("word " * 40, truncation=True)["input_ids"]) == 16


def test_word_tokenizer_is_a_function_of_the_texts_and_a_damaged_cache_is_rebuilt(tmp_path):
    from kdkit.data.word_tokenizer import cached_word_tokenizer, train_word_tokenizer

    # every word as frequent as every other: the cut at 5 + 6 words is decided by ties alone
    texts = ["asyncio futures and tasks", "logging handlers format records"] * 10
    built = [train_word_tokenizer(texts, 11).to_str() for _ in range(3)]
    assert built[0] == built[1] == built[2]
    vocab = train_word_tokenizer(texts, 11).get_vocab()
    assert sorted(vocab, key=vocab.get)[5:] == ["and", "asyncio", "format", "futures", "handlers",
                                                "logging"]  # fmt: skip
    cached_word_tokenizer(texts, 50, 8, cache_dir=tmp_path)
    (file,) = tmp_path.iterdir()
    file.write_text("{not json")
    assert len(cached_word_tokenizer(texts, 50, 8, cache_dir=tmp_path)) == 5 + 8
    assert file.read_text().startswith("{")
    with pytest.raises(ValueError, match="vocab_size must be an int above 5"):
        train_word_tokenizer(texts, 5)


def test_stdlib_docstrings_data_module_gives_dict_batches(tmp_path):
    assert dataset_meta("stdlib_docstrings", max_length=32).input_shape == (32,)
    dm = KDDataModule(
        "stdlib_docstrings",
        batch_size=8,
        vocab_size=300,
        max_length=32,
        train_samples=40,
        eval_samples=16,
        cache_dir=str(tmp_path),
    )
    assert dm.num_classes == 8 and dm.input_shape == (32,)
    splits = dm.prepare()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 16, 16)
    assert splits.class_names == list(PACKAGES)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "index", "input_ids", "labels"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8 and ids.shape[1] <= 32
    assert torch.equal(ids[mask == 0], torch.zeros_like(ids[mask == 0]))
    assert bool((ids[:, 0] == dm.tokenizer.cls_token_id).all())
    lengths = mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert ids[row, n - 1] == dm.tokenizer.sep_token_id
    x, y, index = splits.train[int(batch["index"][0])]
    assert torch.equal(x, ids[0, : len(x)]) and y == int(batch["labels"][0])
    with pytest.raises(ValueError, match="max_length must be an int >= 3"):
        KDDataModule("stdlib_docstrings", max_length=2, cache_dir=str(tmp_path)).prepare()
