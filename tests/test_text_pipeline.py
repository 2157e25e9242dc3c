"""`kdkit run experiment=text_cls` end to end on a tiny override (dict batches, Hugging Face
models from configs): the report's values, the shipped ``save_pretrained`` student and
tokenizer, the ONNX file on dynamic batch and sequence axes, a teacher given by path, `kdkit
eval` and `kdkit export` of the Hugging Face student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from kdkit.pipeline import load_model

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SMOKE = [
    "experiment=text_cls",
    "data.train_samples=64",
    "data.eval_samples=24",
    "data.max_length=20",
    "data.vocab_size=200",
    "data.batch_size=16",
    "teacher.max_epochs=1",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "progress_bar=none",
    "evaluate.latency_repeats=2",
    *[
        f"{role}.kwargs.config.{key}={value}"
        for role in ("teacher", "student")
        for key, value in (("hidden_size", 16), ("intermediate_size", 32))
    ],
]


def kdkit(*argv: str) -> None:
    main(list(argv))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "run"
    kdkit("run", *SMOKE, f"hydra.run.dir={out}")
    return out


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))


TEXTS = [
    "Return the event loop of this thread.",
    "Parse an email message from a file and return the message object.",
    "Add a handler to this logger.",
]


def test_text_cls_run_reports_the_three_models(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    rows = {m["role"]: m for m in report["models"]}
    assert set(rows) == {"teacher", "scratch", "distilled"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["params"] > 0 and row["latency_ms_per_sample"] > 0
    assert 0.0 <= rows["distilled"]["agreement"] <= 1.0
    assert rows["teacher"]["params"] > rows["distilled"]["params"]
    assert rows["distilled"]["name"] == "hf:bert (transformer)"
    terms = (run_dir / "logs/csv/distilled/metrics.csv").read_text().splitlines()[0]
    for term in ("train/ce", "train/kd", "train/hidden", "train/attention"):
        assert term in terms


def test_saved_hf_student_reloads_with_its_tokenizer_and_gives_the_same_logits(
    run_dir: Path,
) -> None:
    hf_dir = run_dir / "distilled" / "hf"
    # Eager attention, as the student was trained (its terms read attention probabilities): bit
    # for bit the same model. (The default, sdpa, rounds differently, in the 9th digit.)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, attn_implementation="eager"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 8
    batch = _batch(tokenizer, TEXTS)
    assert batch["input_ids"].shape[1] <= 20
    assert bool((batch["input_ids"][:, 0] == tokenizer.cls_token_id).all())
    kdkit_model = load_model(run_dir / "distilled" / "model.pt")
    with torch.no_grad():
        expected = kdkit_model(**batch).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".hf.*"))


def test_run_exports_the_student_to_onnx_with_dynamic_batch_and_sequence(run_dir: Path) -> None:
    session = ort.InferenceSession(str(run_dir / "distilled" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        run_dir / "distilled" / "hf"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "distilled" / "hf")
    for texts in (TEXTS, TEXTS[:1] * 5):  # batch 3 and 5, two lengths; the export used 2 x 20
        batch = _batch(tokenizer, texts)
        (got,) = session.run(
            None, {k: v.numpy() for k, v in batch.items() if k != "token_type_ids"}
        )
        with torch.no_grad():
            expected = model(**batch).logits.numpy()
        assert got.shape == expected.shape
        assert abs(got - expected).max() < 1e-4


def test_teacher_by_path_is_used_as_it_is(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "by_path"
    teacher_dir = run_dir / "teacher" / "hf"
    # threads=null: the default thread count reads the directory's model (not on meta)
    kdkit("run", *SMOKE, f"teacher.name=hf:{teacher_dir}", "threads=null", f"hydra.run.dir={out}")
    assert not (out / "teacher" / "checkpoints").exists()  # not trained again
    first = {m["role"]: m for m in json.loads((run_dir / "report.json").read_text())["models"]}
    again = {m["role"]: m for m in json.loads((out / "report.json").read_text())["models"]}
    assert again["teacher"]["accuracy"] == first["teacher"]["accuracy"]
    assert again["teacher"]["name"] == f"hf:{teacher_dir}"
    assert again["distilled"]["agreement"] == first["distilled"]["agreement"]


def test_teacher_path_without_config_json_or_with_other_classes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        kdkit("run", *SMOKE, f"teacher.name=hf:{empty}", f"hydra.run.dir={tmp_path / 'a'}")
    assert "no config.json in it" in capsys.readouterr().err
    other = tmp_path / "two_classes"
    config = transformers.BertConfig(
        vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=2
    )
    transformers.BertForSequenceClassification(config).save_pretrained(other)
    with pytest.raises(SystemExit):
        kdkit("run", *SMOKE, f"teacher.name=hf:{other}", f"hydra.run.dir={tmp_path / 'b'}")
    err = " ".join(capsys.readouterr().err.split())
    assert "predicts 2 classes but dataset 'stdlib_docstrings' has 8" in err
    assert "teacher.finetune=true" in err


def test_eval_and_export_commands_take_the_hf_student(run_dir: Path, tmp_path: Path) -> None:
    model_file = run_dir / "distilled" / "model.pt"
    kdkit("eval", *SMOKE, f"checkpoint={model_file}", f"hydra.run.dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = {m["role"]: m for m in json.loads((run_dir / "report.json").read_text())["models"]}
    assert evaluated["accuracy"] == rows["distilled"]["accuracy"]
    out = tmp_path / "export"
    kdkit("export", *SMOKE, f"checkpoint={model_file}", f"hydra.run.dir={out}")
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert session.get_inputs()[1].shape == ["batch", "sequence"]


def test_a_model_directory_is_built_as_saved_not_from_the_preset_sizes(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from kdkit.pipeline.build import spec_for
    from kdkit.pipeline.checkpoint import build_from_spec

    saved = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_labels=8
        )
    )
    saved.save_pretrained(tmp_path / "model")
    cfg = OmegaConf.create(
        {
            "teacher": {
                "name": f"hf:{tmp_path / 'model'}",
                "kwargs": {"head": "sequence_classification", "config": {"num_hidden_layers": 4}},
            }
        }
    )
    spec = spec_for(cfg, "teacher", 8, (20,))
    assert spec["kwargs"] == {"head": "sequence_classification"}
    model = build_from_spec(spec)
    assert model.config.num_hidden_layers == 1
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_cache_command_refuses_text_data(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = f"teacher.name=hf:{run_dir / 'teacher' / 'hf'}"
    with pytest.raises(SystemExit):
        kdkit("cache", *SMOKE, teacher, f"hydra.run.dir={tmp_path}")
    err = " ".join(capsys.readouterr().err.split())
    assert "'stdlib_docstrings' pads its own batches" in err and "online teacher" in err
