"""`kdkit run experiment=lm distill=seqkd | gkd` (issue 10, item 4): the recipes of
kdkit.generation trained by CausalLMDistillationModule, with tiny models and budgets."""

from __future__ import annotations

import csv
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_lm_pipeline import SMOKE  # the LM preset's tiny models and budget

from kdkit import Distiller, Term
from kdkit.cli import CONFIG_DIR, main
from kdkit.generation import OnPolicyGKD, SequenceKD, split_prompt
from kdkit.lightning_lm import CausalLMDistillationModule
from kdkit.losses import GeneralizedJSDLoss
from kdkit.pipeline import load_model
from kdkit.pipeline.build import build_datamodule
from kdkit.pipeline.lm import build_lm, build_recipe
from kdkit.pipeline.lm_report import load_lm_report

pytest.importorskip("transformers")

# the LM preset's smoke budget, and prompts of 16 tokens continued by 16 in its 32-token blocks
TINY = [
    *(o for o in SMOKE if not o.startswith("trainer.max_epochs")),
    "distill.recipe.prompt_length=16",
    "distill.recipe.max_new_tokens=16",
]


def _run(out: Path, method: str, *extra: str) -> Path:
    main(
        ["run", *TINY, f"distill={method}", "trainer.max_epochs=1", *extra, f"hydra.run.dir={out}"]
    )
    return out


def _generated(run_dir: Path) -> list[float]:
    """The epochs' ``train/generated`` of the distilled stage (metrics.csv)."""
    with (run_dir / "logs/csv/distilled/metrics.csv").open() as f:
        return [float(r["train/generated"]) for r in csv.DictReader(f) if r["train/generated"]]


def _coins(seed: int, lmbda: float, calls: int) -> list[bool]:
    """OnPolicyGKD's on-policy coins: one random() and one randrange per call."""
    rng = random.Random(seed)
    coins = []
    for _ in range(calls):
        coins.append(rng.random() < lmbda)
        rng.randrange(2**63)
    return coins


@pytest.mark.parametrize("method", ["seqkd", "gkd"])
def test_run_trains_on_generated_batches_and_reports_finite_numbers(
    method: str, tmp_path: Path
) -> None:
    run_dir = _run(tmp_path / "run", method)
    rows, _ = load_lm_report(run_dir)
    assert [r.role for r in rows] == ["teacher", "scratch", "distilled"]
    for r in rows:
        for value in (r.val_ppl, r.test_ppl, r.test_bpc, r.tokens_per_s):
            assert value is not None and math.isfinite(value) and value > 0
    assert rows[2].name.endswith(f"({method})") and 0 <= rows[2].agreement <= 1
    # every seqkd batch is the teacher's; gkd's follow its lmbda coin (seeded with cfg.seed)
    expected = 1.0 if method == "seqkd" else sum(_coins(0, 0.5, 3)) / 3
    assert _generated(run_dir) == [pytest.approx(expected)]
    assert 0 < expected < 1 or method == "seqkd"
    # the distilled student was trained away from the scratch one (same init)
    a = load_model(run_dir / "scratch" / "model.pt").state_dict()
    b = load_model(run_dir / "distilled" / "model.pt").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gkd_lmbda_is_the_fraction_of_generated_batches(tmp_path: Path) -> None:
    run_dir = _run(tmp_path / "run", "gkd", "distill.recipe.lmbda=0")
    assert _generated(run_dir) == [0.0]


@pytest.mark.parametrize("method", ["seqkd", "gkd"])
def test_ckpt_path_last_resume_continues_the_recipe_stream(method: str, tmp_path: Path) -> None:
    # One run of 2 epochs vs 1 epoch then resumed for the 2nd from its last.ckpt: the same
    # student only if the recipe's generation seeds (and GKD's coins) come back from it.
    # (seqkd samples here: its greedy default draws nothing from the stream)
    lmbda = ["distill.recipe.lmbda=0.5"] if method == "gkd" else ["+distill.recipe.do_sample=true"]
    whole = _run(tmp_path / "whole", method, "trainer.max_epochs=2", *lmbda)
    part = _run(tmp_path / "part", method, *lmbda)
    (part / "distilled" / "model.pt").unlink()
    shutil.rmtree(part / "scratch")  # only the distilled stage is under test
    _run(part, method, "trainer.max_epochs=2", "ckpt_path=last", *lmbda)
    a = load_model(whole / "distilled" / "model.pt").state_dict()
    b = load_model(part / "distilled" / "model.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(part / "distilled/checkpoints/last.ckpt", weights_only=False)
    assert "kdkit_recipe" in ckpt


def _parts(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides, "paths.output_dir=/tmp/unused"])
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    torch.manual_seed(0)
    teacher, _ = build_lm(cfg, "teacher", datamodule)
    student, _ = build_lm(cfg, "student", datamodule)
    input_ids, labels = next(iter(datamodule.train_dataloader()))[:2]
    return cfg, student, teacher, input_ids, labels


def test_gkd_with_lmbda_0_is_the_off_policy_generalized_jsd_loss() -> None:
    cfg, student, teacher, input_ids, labels = _parts(
        "distill=gkd", "distill.recipe.lmbda=0", "distill.beta=0.3", "distill.temperature=2"
    )
    recipe, prompt_length = build_recipe(cfg, student, teacher)
    assert isinstance(recipe, OnPolicyGKD) and prompt_length == 16
    module = CausalLMDistillationModule(recipe.distiller, recipe=recipe, prompt_length=16)
    loss = module.training_step((input_ids, labels, torch.arange(4)), 0)
    _, _, data = split_prompt(input_ids, labels, 16)
    jsd = Distiller(student, teacher, [Term(GeneralizedJSDLoss(0.3, 2.0, -100))])
    assert loss.item() == pytest.approx(float(jsd(data.inputs, data.labels).loss), rel=1e-6)
    # ... which is not the loss of the whole block: the prompt's predictions are left out
    whole = jsd(input_ids, labels).loss
    assert loss.item() != pytest.approx(float(whole), rel=1e-3)


def test_seqkd_trains_cross_entropy_on_the_teacher_continuations() -> None:
    cfg, student, teacher, input_ids, labels = _parts("distill=seqkd")
    recipe, prompt_length = build_recipe(cfg, student, teacher)
    assert isinstance(recipe, SequenceKD) and recipe.seed == cfg.seed
    distiller = Distiller(student, teacher, [Term(GeneralizedJSDLoss(0.0, 1.0, -100))])
    module = CausalLMDistillationModule(distiller, recipe=recipe, prompt_length=prompt_length)
    loss = module.training_step((input_ids, labels), 0)
    prompts, mask, _ = split_prompt(input_ids, labels, 16)
    gen = SequenceKD(teacher, max_new_tokens=16, pad_token_id=0, seed=0)(prompts, mask)
    assert gen.labels.ne(-100).sum(1).tolist() == [16] * 4
    assert loss.item() == pytest.approx(float(distiller(gen.inputs, gen.labels).loss), rel=1e-6)


def test_bad_recipe_settings_are_refused_with_the_fix() -> None:
    cfg, student, teacher, *_ = _parts("distill=seqkd", "distill.recipe.max_new_tokens=17")
    with pytest.raises(ValueError, match=r"prompt_length=16 \+ max_new_tokens=17 .*block_size=32"):
        build_recipe(cfg, student, teacher)
    cfg, *_ = _parts("distill=seqkd", "distill.recipe.prompt_length=32")
    with pytest.raises(ValueError, match=r"prompt_length=32 must be in \[1, 31\]"):
        build_recipe(cfg, student, teacher)
    cfg, *_ = _parts("distill=gkd")
    cfg.distill.terms.ce = {"_target_": "kdkit.Term", "loss": {"_target_": "kdkit.losses.MSELoss"}}
    with pytest.raises(ValueError, match=r"distill.terms\s+must be empty, got \['ce'\]"):
        build_recipe(cfg, student, teacher)
    for bad in (None, -1):
        with pytest.raises(ValueError, match=r"pad_token_id must be a token id .*eos_token_id"):
            OnPolicyGKD(student, teacher, max_new_tokens=4, pad_token_id=bad)
        with pytest.raises(ValueError, match=rf"SequenceKD: pad_token_id .* got {bad}"):
            SequenceKD(teacher, max_new_tokens=4, pad_token_id=bad)
    gkd = OnPolicyGKD(student, teacher, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(ValueError, match="pass distiller=recipe.distiller"):
        other = Distiller(student, teacher, [Term(GeneralizedJSDLoss(0.5, 1.0, -100))])
        CausalLMDistillationModule(other, recipe=gkd, prompt_length=4)
    with pytest.raises(ValueError, match="pass prompt_length=<int>"):
        CausalLMDistillationModule(gkd.distiller, recipe=gkd)
