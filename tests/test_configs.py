"""Every shipped config composes; every distill method builds a working Distiller (no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdkit import Distiller, Term
from kdkit.cli import CONFIG_DIR
from kdkit.config import terms_from_config
from kdkit.pipeline.build import spec_for
from kdkit.pipeline.checkpoint import build_from_spec

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "distill").glob("*.yaml"))
# Methods of other tasks, for other models (tests/test_minilm_parts.py and
# tests/test_lm_recipes.py check them by value).
TASK_METHODS = {"embedding", "seqkd", "gkd"}
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# Feature methods need conv features on both sides: small CNNs of different widths (adapters).
TINY = [
    "teacher=small_cnn",
    "teacher.kwargs.width=8",
    "student=small_cnn",
    "student.kwargs.width=4",
]
# Methods made for Hugging Face BERT-style models (they read hidden states and attention
# projections): tiny BERTs and a dict batch instead.
HF_METHODS = {"transformer"}
HF_TINY = [
    "teacher=bert_4x64",
    "student=bert_2x64",
    *[
        f"{role}.kwargs.config.{key}={value}"
        for role in ("teacher", "student")
        for key, value in (("hidden_size", 16), ("intermediate_size", 32), ("vocab_size", 50))
    ],
]


def _tiny(method: str) -> list[str]:
    return HF_TINY if method in HF_METHODS else TINY


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, "paths.output_dir=/tmp/unused"])


def test_all_methods_and_experiments_are_shipped() -> None:
    assert METHODS == sorted(
        [
            "kd",
            "hinton",
            "fitnet",
            "at",
            "mse_hidden",
            "dkd",
            "dist",
            "rkd",
            "pkt",
            "cosine",
            "reverse_kl",
            "gjsd",
            "embedding",
            "transformer",
            "token_kd",
            "seqkd",
            "gkd",
        ]
    )
    assert {"digits", "cifar10_resnet50_resnet18", "cifar100_resnet32x4_resnet8x4", "lm"} <= set(
        EXPERIMENTS
    )


def test_default_is_the_digits_experiment() -> None:
    cfg = _compose([])
    assert cfg.experiment_name == "digits"
    assert cfg.data.name == "digits"
    assert (cfg.teacher.name, cfg.student.name) == ("small_cnn", "mlp")
    assert cfg.distill.method == "kd"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    hydra_cfg = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").hydra
    assert OmegaConf.to_container(hydra_cfg)["run"]["dir"] == (
        "${kdkit.unique_dir:runs/${experiment_name}/${now:%Y-%m-%d_%H-%M-%S}}"
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["experiment_name"] == experiment
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = instantiate(cfg.optimizer)(params)
    assert isinstance(opt, torch.optim.Optimizer)
    if cfg.scheduler is not None:
        instantiate(cfg.scheduler)(opt)
    terms = terms_from_config(cfg.distill)
    assert all(isinstance(t, Term) for t in terms.values())


def test_cifar100_preset_is_the_mdistiller_protocol() -> None:
    cfg = _compose(["experiment=cifar100_resnet32x4_resnet8x4"])
    assert (cfg.teacher.name, cfg.student.name, cfg.data.name) == (
        "resnet32x4",
        "resnet8x4",
        "cifar100",
    )
    assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)
    sched = instantiate(cfg.scheduler)(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(sched.milestones) == [150, 180, 210] and sched.gamma == 0.1
    terms = terms_from_config(cfg.distill)
    assert terms["ce"].weight == 0.1 and terms["kd"].weight == 0.9
    assert terms["kd"].loss.temperature == 4.0
    assert cfg.data.download is False


def test_cifar10_preset_is_seed_002() -> None:
    cfg = _compose(["experiment=cifar10_resnet50_resnet18"])
    assert (cfg.teacher.name, cfg.student.name) == ("tv:resnet50", "tv:resnet18")
    assert cfg.student.kwargs.cifar_stem is True and cfg.data.download is False
    assert cfg.distill.method == "hinton"
    student = build_from_spec(spec_for(cfg, "student", 10, (3, 32, 32)))
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("method", sorted(set(METHODS) - TASK_METHODS))
def test_method_builds_a_distiller_with_finite_loss(method: str) -> None:
    cfg = _compose([f"distill={method}", *_tiny(method)])
    terms = terms_from_config(cfg.distill)
    # a term set to null in the method file (hinton's ce) is left out
    assert set(terms) == {name for name, node in cfg.distill.terms.items() if node is not None}
    torch.manual_seed(0)
    shape = (12,) if method in HF_METHODS else (1, 8, 8)
    teacher = build_from_spec(spec_for(cfg, "teacher", 10, shape))
    student = build_from_spec(spec_for(cfg, "student", 10, shape))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    if method in HF_METHODS:
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[1, 6:] = 0
        x = {"input_ids": torch.randint(0, 50, (8, 12)), "attention_mask": mask}
    distiller = Distiller(student, teacher, terms, example_input=x)
    out = distiller(x, y)
    assert math.isfinite(out.loss.item())
    expected = sum(terms[name].weight * value for name, value in out.terms.items())
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-5)
    # The teacher never enters the student's state_dict.
    assert not any(k.startswith("teacher") for k in distiller.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_method_file_outside_hydra_matches_the_composed_one(method: str) -> None:
    # Distiller.from_config reads the method files with OmegaConf; their shared block comes
    # from Hydra's defaults list (configs/_distill_base.yaml), which it must merge the same way.
    from kdkit.config import load_distill_config

    composed = _compose(["~experiment", f"distill={method}", *_tiny(method)])  # no presets
    keys = ("feature_layers", "embedding_layer", "attention_layers", "attention_heads")
    context = {
        role: {k: composed[role][k] for k in keys if k in composed[role]}
        for role in ("student", "teacher")
    }
    loaded = load_distill_config(method, context)
    assert OmegaConf.to_container(loaded, resolve=True) == OmegaConf.to_container(
        composed.distill, resolve=True
    )


def test_kd_weights_and_temperature_follow_the_top_level_keys() -> None:
    cfg = _compose(["distill=kd", "distill.temperature=2.5", "distill.kd_weight=0.3"])
    terms = terms_from_config(cfg.distill)
    assert terms["kd"].loss.temperature == 2.5 and terms["kd"].weight == 0.3
    assert terms["ce"].teacher is None and terms["ce"].reads_target


def test_unequal_feature_lists_are_paired_keeping_the_deepest() -> None:
    cfg = _compose(["distill=fitnet", "student.feature_layers=[block3]"])
    terms = terms_from_config(cfg.distill)
    assert terms["hint"].student == ["block3"] and terms["hint"].teacher == ["block3"]


def test_term_can_be_removed_by_override() -> None:
    cfg = _compose(["distill=kd", "~distill.terms.ce"])
    assert list(terms_from_config(cfg.distill)) == ["kd"]


@pytest.mark.parametrize(
    "group",
    [
        "trainer=gpu",
        "trainer=ddp",
        "logger=tensorboard",
        "logger=mlflow",
        "logger=wandb",
        "data=cifar10",
        "data=cifar100",
        "data=synthetic",
        "data=image_folder",
    ],
)
def test_groups_compose(group: str) -> None:
    cfg = _compose([group])
    if group == "trainer=gpu":
        assert cfg.trainer.precision == "bf16-mixed"
    if group == "trainer=ddp":
        assert cfg.trainer.strategy.process_group_backend == "gloo"
    if group == "logger=mlflow":
        assert cfg.logger.mlflow.tracking_uri == "sqlite:////tmp/unused/mlflow.db"
    if group == "logger=wandb":
        assert cfg.logger.wandb.mode == "offline"


def test_experiment_name_follows_the_data() -> None:
    # `kdkit run data=synthetic` writes runs/synthetic/..., titled synthetic, not digits
    assert _compose(["data=synthetic"]).experiment_name == "synthetic"
    assert _compose([]).experiment_name == "digits"
    assert _compose(["experiment=cifar10_resnet50_resnet18"]).experiment_name == (
        "cifar10_resnet50_resnet18"
    )


MODEL_CONFIGS = [
    (role, p.stem)
    for role in ("student", "teacher")
    for p in sorted((Path(CONFIG_DIR) / role).glob("*.yaml"))
    # image classifiers; the causal LMs of experiment=lm have no feature points
    if "feature_layers" in OmegaConf.load(p)
]


@pytest.mark.parametrize(("role", "option"), MODEL_CONFIGS)
def test_feature_layers_are_the_models_own_feature_points(role: str, option: str) -> None:
    # One source of truth: a model config's feature_layers are the feature points the model
    # registers (feature_paths), and they, and the embedding layer, exist in the built model.
    cfg = _compose([f"{role}={option}"])
    shape = (3, 32, 32) if cfg.data.name != "digits" else (1, 8, 8)
    if cfg[role].name.startswith("hf:"):
        # Hugging Face models register no feature points: their configs name hidden states
        # (one per layer and the embeddings) and attention projections that exist.
        model = build_from_spec(spec_for(cfg, role, 10, (16,)))
        layers = model.config.num_hidden_layers
        expected = [f"output.hidden_states[{i}]" for i in range(layers + 1)]
        assert set(cfg[role].feature_layers) <= set(expected)
        for path in [*cfg[role].attention_layers, cfg[role].embedding_layer]:
            model.get_submodule(path)
        return
    model = build_from_spec(spec_for(cfg, role, 10, shape))
    layers = list(cfg[role].feature_layers)
    assert layers and layers == list(model.feature_paths)
    for path in [*layers, cfg[role].embedding_layer]:
        model.get_submodule(path)
