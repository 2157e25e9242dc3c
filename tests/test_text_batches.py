"""Dict batches (Hugging Face style) through the batch helpers, the Lightning modules and the
evaluation: labels from the batch, the model called with keyword arguments, logits read from
its ModelOutput; every loss checked against a hand-written reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkit import Distiller, Term
from kdkit.batch import first_rows, unpack_batch
from kdkit.data.text_classification import collate_tokens
from kdkit.evaluation import evaluate, measure_latency
from kdkit.lightning import ClassifierModule, DistillationModule
from kdkit.losses import CrossEntropyLoss, KLDivLoss, MSEHiddenStatesLoss

transformers = pytest.importorskip("transformers")
# training_step outside a Trainer: Lightning warns that self.log has no trainer to log to
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

VOCAB, CLASSES, T = 40, 3, 2.0


def _bert(layers: int, seed: int) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    items = [
        (torch.randint(1, VOCAB, (n,), generator=g), label, i)
        for i, (n, label) in enumerate([(7, 0), (4, 2), (9, 1), (2, 1)])
    ]
    return collate_tokens(items, pad_id=0)


def test_collate_tokens_pads_and_masks():
    items = [(torch.tensor([5, 6, 7]), 1, 10), (torch.tensor([8]), 0, 11)]
    batch = collate_tokens(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["index"].tolist() == [10, 11]


def test_unpack_dict_batch_keeps_labels_and_index_out_of_the_inputs():
    batch = _batch()
    inputs, labels, index = unpack_batch(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids"]
    assert labels is batch["labels"] and index is batch["index"]
    assert unpack_batch({"input_ids": batch["input_ids"], "labels": labels})[2] is None
    with pytest.raises(TypeError, match="'labels'.*got keys \\['input_ids'\\]"):
        unpack_batch({"input_ids": batch["input_ids"]})


def test_first_rows_cuts_every_tensor_of_a_dict():
    cut = first_rows(unpack_batch(_batch())[0], 2)
    assert cut["input_ids"].shape == (2, 9) and cut["attention_mask"].shape == (2, 9)


def test_classifier_module_dict_batch_loss_is_cross_entropy_of_the_logits():
    model = _bert(1, seed=0)
    module = ClassifierModule(model, CLASSES)
    batch = _batch()
    loss = module.training_step(batch, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(loss, F.cross_entropy(logits, batch["labels"]), atol=1e-6)
    assert torch.equal(module(unpack_batch(batch)[0]), logits)


def test_distillation_module_dict_batch_every_term_equals_a_reference():
    student, teacher = _bert(1, seed=0), _bert(2, seed=1).eval()
    distiller = Distiller(
        student,
        teacher,
        {
            "ce": Term(CrossEntropyLoss(), teacher=None, target=True),
            "kd": Term(KLDivLoss(temperature=T)),
            "hidden": Term(
                MSEHiddenStatesLoss(),
                student=["output.hidden_states[1]"],
                teacher=["output.hidden_states[2]"],
            ),
        },
    )
    module = DistillationModule(distiller, CLASSES)
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)  # type: ignore[method-assign]
    module.log = lambda name, value, **_: logged.update({name: value})  # type: ignore[method-assign]
    batch = _batch()
    loss = module.training_step(batch, 0)

    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_out = student(**kwargs, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**kwargs, output_hidden_states=True)
    ce = F.cross_entropy(s_out.logits, batch["labels"])
    kd = (
        F.kl_div(
            F.log_softmax(s_out.logits / T, -1), F.softmax(t_out.logits / T, -1), reduction="sum"
        )
        / len(batch["labels"])
        * T**2
    )
    keep = batch["attention_mask"].bool()  # the hidden term alone gets the token mask
    hidden = ((s_out.hidden_states[1] - t_out.hidden_states[2]) ** 2).mean(-1)[keep].mean()
    assert torch.allclose(logged["train/ce"], ce, atol=1e-5)
    assert torch.allclose(logged["train/kd"], kd, atol=1e-5)
    assert torch.allclose(logged["train/hidden"], hidden, atol=1e-5)
    assert torch.allclose(loss, ce + kd + hidden, atol=1e-5)


def test_mixup_refuses_token_inputs():
    module = ClassifierModule(_bert(1, seed=0), CLASSES, mixup_alpha=0.2)
    with pytest.raises(ValueError, match="mixup.*dict.*mixup_alpha=0"):
        module.training_step(_batch(), 0)


def test_evaluate_and_latency_on_dict_batches():
    model = _bert(1, seed=0).eval()
    batch = _batch()
    metrics = evaluate(model, [batch, batch])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert metrics["num_samples"] == 8
    assert metrics["accuracy"] == pytest.approx(accuracy)
    latency = measure_latency(model, batch, repeats=2, warmup=0)
    assert latency["batch_size"] == 4
    assert 0 < latency["latency_ms_per_sample"] and 0 < latency["latency_ms_per_batch"]
