"""kdkit.hf_trainer.DistillationTrainer: the Distiller's terms under transformers.Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdkit import Distiller, Term
from kdkit.losses import KLDivLoss, MSEHiddenStatesLoss

transformers = pytest.importorskip("transformers")
from kdkit.hf_trainer import EXTRAS_NAME, DistillationTrainer  # noqa: E402

safetensors = pytest.importorskip("safetensors.torch")


def _bert(hidden: int, layers: int) -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=30,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


class Texts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 30, (16, 7), generator=g)
        self.mask = torch.ones(16, 7, dtype=torch.long)
        self.mask[::3, 5:] = 0

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.ids[i, 0] % 2,
        }


def _trainer(out_dir, **args):
    torch.manual_seed(0)
    student, teacher = _bert(16, 1), _bert(32, 2)
    hidden = MSEHiddenStatesLoss(
        need_mapping=True, student_hidden_state_dim=16, teacher_hidden_state_dim=32
    )
    distiller = Distiller(
        student,
        teacher,
        {
            "kd": Term(KLDivLoss(temperature=2.0)),
            "hidden": Term(
                hidden, student="output.hidden_states[1]", teacher="output.hidden_states[2]"
            ),
        },
    )
    training = transformers.TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
        **args,
    )
    return DistillationTrainer(distiller, args=training, train_dataset=Texts())


def test_resume_from_checkpoint_matches_uninterrupted_training(tmp_path):
    whole = _trainer(tmp_path / "whole")
    mapping_before = [p.detach().clone() for p in whole.distiller.extra_parameters()]
    whole.train()
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for a, b in zip(
        whole.distiller.state_dict().values(), resumed.distiller.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
    # the adapters (loss mappings) are in the optimizer: they were trained
    after = whole.distiller.extra_parameters()
    assert not all(torch.equal(a, b) for a, b in zip(mapping_before, after, strict=True))
    # each term is logged
    logged = [entry for entry in whole.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all("terms/kd" in e and "terms/hidden" in e for e in logged)
    assert all(e["terms/hidden"] > 0 for e in logged)


def test_checkpoints_and_saved_model_hold_the_student_only(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    keys = set(safetensors.load_file(str(checkpoint / "model.safetensors")))
    student_keys = set(trainer.distiller.student.state_dict())
    assert keys <= student_keys and len(keys) > 10
    assert json.loads((checkpoint / "config.json").read_text())["hidden_size"] == 16
    extras = torch.load(checkpoint / EXTRAS_NAME, weights_only=True)
    assert sorted(extras) == ["losses.hidden.mapping.bias", "losses.hidden.mapping.weight"] or all(
        k.startswith(("losses.", "adapters.")) for k in extras
    )
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / EXTRAS_NAME).exists()
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "final")
    for name, value in trainer.distiller.student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_num_items_in_batch_is_passed_through(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run", gradient_accumulation_steps=2)
    seen = []
    forward = Distiller.forward

    def spy(self, inputs, target=None, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return forward(self, inputs, target, **kwargs)

    monkeypatch.setattr(Distiller, "forward", spy)
    trainer.args.max_steps = 1
    trainer.train()
    assert [int(n) for n in seen] == [8, 8]  # labels of both accumulated batches of 4


def test_a_model_argument_is_refused(tmp_path):
    with pytest.raises(TypeError, match="Distiller in place of model="):
        DistillationTrainer(_trainer(tmp_path).distiller, model=torch.nn.Linear(2, 2))


def test_an_interrupted_save_leaves_the_saved_model_whole(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run")
    final = tmp_path / "final"
    trainer.save_model(str(final))
    before = (final / "model.safetensors").read_bytes()
    student = trainer.distiller.student
    real_save = student.save_pretrained

    def crash_midway(directory, **kwargs):
        real_save(directory, **kwargs)
        Path(directory, "model.safetensors").write_bytes(b"half")  # a write cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(student, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(final))
    assert (final / "model.safetensors").read_bytes() == before
    transformers.BertForSequenceClassification.from_pretrained(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "run"]  # no temporary left
