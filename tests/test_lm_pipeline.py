"""`kdkit run experiment=lm` end to end with tiny models and budgets (the preset's CI smoke)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from kdkit.data.stdlib_text import load_stdlib_corpus
from kdkit.pipeline import load_model
from kdkit.pipeline.lm_report import load_lm_report

SMOKE = [
    "experiment=lm",
    "trainer.max_epochs=1",
    "teacher.max_epochs=2",
    "trainer.limit_train_batches=3",
    "data.batch_size=4",
    "data.block_size=32",
    "data.eval_blocks=6",
    "evaluate.latency_repeats=1",
    "progress_bar=none",
    "teacher.kwargs.config.num_hidden_layers=1",
    "teacher.kwargs.config.hidden_size=32",
    "teacher.kwargs.config.intermediate_size=64",
    "student.kwargs.config.n_layer=1",
    "student.kwargs.config.n_embd=16",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "run"
    main(["run", *SMOKE, f"hydra.run.dir={out}"])
    return out


def test_report_numbers_are_finite_and_consistent(run_dir: Path) -> None:
    rows, report = load_lm_report(run_dir)
    assert [r.role for r in rows] == ["teacher", "scratch", "distilled"]
    for r in rows:
        for value in (r.val_ppl, r.test_ppl, r.test_bpc, r.tokens_per_s, r.speedup_vs_teacher):
            assert value is not None and math.isfinite(value) and value > 0
        # a character vocabulary: one token per character, 6 blocks of 32 tokens
        assert r.test_tokens == r.test_characters == 6 * 32
        assert r.test_ppl == pytest.approx(math.exp(r.test_nll))
        # bits per character recomputed from the perplexity and the counts
        bpc = math.log(r.test_ppl) * r.test_tokens / r.test_characters / math.log(2)
        assert r.test_bpc == pytest.approx(bpc, rel=1e-9)
        assert r.params > 0 and r.size_bytes > 4 * r.params
    teacher, scratch, distilled = rows
    assert teacher.agreement is None and 0 <= distilled.agreement <= 1
    assert teacher.speedup_vs_teacher == pytest.approx(1.0)
    corpus = load_stdlib_corpus()
    assert report["data"]["sha256"] == corpus.sha256
    assert report["data"]["python_version"] == report["python_version"] == corpus.python_version
    text = (run_dir / "report.md").read_text()
    assert corpus.sha256 in text and "bits/char" in text
    assert not list(run_dir.rglob("*.tmp"))


def test_scratch_and_distilled_start_from_the_same_weights(run_dir: Path) -> None:
    rows = {r.role: r for r in load_lm_report(run_dir)[0]}
    assert rows["scratch"].init_sha256 == rows["distilled"].init_sha256 is not None
    assert rows["teacher"].init_sha256 != rows["scratch"].init_sha256
    # ... and end apart: the distilled one was trained on other losses
    scratch = load_model(run_dir / "scratch" / "model.pt")
    distilled = load_model(run_dir / "distilled" / "model.pt")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(scratch.state_dict().values(), distilled.state_dict().values(), strict=True)
    )


def test_model_files_reload_as_hugging_face_models(run_dir: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = load_model(run_dir / "distilled" / "model.pt")
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.vocab_size == load_lm_report(run_dir)[1]["data"]["vocab_size"]
    ckpt = torch.load(run_dir / "distilled/checkpoints/last.ckpt", weights_only=False)
    assert not any("teacher" in k for k in ckpt["state_dict"])  # the teacher is never saved
    config = json.loads((run_dir / "report.json").read_text())["config"]
    assert config["task"] == "lm"


def test_ckpt_path_last_resumes_every_stage_of_the_run(run_dir: Path, tmp_path: Path) -> None:
    # Every stage of the copied run is complete: each resumes from its last.ckpt (the teacher's
    # weights, hence the distilled stage's fingerprint, come back from it) and trains no further.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for stage in ("teacher", "scratch", "distilled"):
        (copy / stage / "model.pt").unlink()
    main(["run", *SMOKE, f"hydra.run.dir={copy}", "ckpt_path=last"])
    for stage in ("teacher", "scratch", "distilled"):
        a = load_model(run_dir / stage / "model.pt").state_dict()
        b = load_model(copy / stage / "model.pt").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    before = {r.role: r.test_ppl for r in load_lm_report(run_dir)[0]}
    assert {r.role: r.test_ppl for r in load_lm_report(copy)[0]} == before


def test_llama_student_config_builds_for_the_data_vocabulary() -> None:
    from hydra import compose, initialize_config_dir
    from transformers import LlamaForCausalLM

    from kdkit.cli import CONFIG_DIR
    from kdkit.pipeline.build import build_datamodule
    from kdkit.pipeline.lm import build_lm

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=lm", "student=llama_tiny"])
    datamodule = build_datamodule(cfg)
    model, spec = build_lm(cfg, "student", datamodule)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == datamodule.num_classes == spec["num_classes"]
    assert model.config.max_position_embeddings == datamodule.block_size == 128
    assert 80_000 < sum(p.numel() for p in model.parameters()) < 150_000
