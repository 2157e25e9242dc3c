"""``kdkit run experiment=lm``: teacher -> scratch student -> distilled student for causal LMs.

The task ``lm`` (:mod:`kdkit.pipeline.tasks`): a teacher is trained on next-token prediction
(or loaded from ``teacher.checkpoint``), then the student twice with the same initial weights,
the same batches in the same order and the same budget: once from scratch (cross-entropy on the
labels) and once distilled (the ``distill`` terms through a :class:`~kdkit.Distiller`, e.g. a
token KL with the teacher plus cross-entropy). The labels are shifted once, by the dataset
(:mod:`kdkit.data.stdlib_lm`); models are called without ``labels=``
(:mod:`kdkit.lightning_lm`).

Each stage writes ``<run>/<stage>/model.pt`` (a kdkit model file: ``kdkit.pipeline.checkpoint.
load_model`` rebuilds the Hugging Face model) and Lightning checkpoints, and resumes with
``ckpt_path=last`` like the classification pipeline. The report (``report.md``,
``report.json``, :mod:`kdkit.pipeline.lm_report`) gives validation and test perplexity, bits per
character, top-1 token agreement with the teacher, CPU tokens/s, parameters, size and speed-up,
with the corpus sha256 and the Python version.

``distill=seqkd`` (sequence-level KD) and ``distill=gkd`` (on-policy GKD) train the distilled
student on generated batches: their ``distill.recipe`` (:func:`build_recipe`, a
:mod:`kdkit.generation` recipe) continues each block's first ``prompt_length`` tokens with the
teacher's (seqkd) or, with probability ``lmbda``, the student's (gkd) own tokens; same steps and
blocks as every other method, ``train/generated`` logged (:class:`~kdkit.lightning_lm.
CausalLMDistillationModule`). The character vocabulary has no EOS or pad token: rows run
``max_new_tokens`` and ``pad_token_id=0`` fills only what is neither attended nor labelled.

``<role>.gradient_checkpointing=true`` switches on the Hugging Face model's gradient
checkpointing (:func:`enable_gradient_checkpointing`: activations recomputed in the backward;
less memory, the same gradients, more time).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from kdkit.cache.fingerprint import fingerprint_teacher
from kdkit.data.text import IGNORE_INDEX
from kdkit.evaluation import count_parameters, measure_latency, size_on_disk
from kdkit.generation import OnPolicyGKD, SequenceKD
from kdkit.lightning_lm import (
    CausalLMDistillationModule,
    CausalLMModule,
    lm_logits,
    next_token_loss,
)
from kdkit.pipeline.build import (
    build_datamodule,
    build_model,
    build_optimizer_factories,
    build_trainer,
    load_teacher,
    output_dir,
    to_container,
)
from kdkit.pipeline.checkpoint import save_model
from kdkit.pipeline.distill import build_distiller
from kdkit.pipeline.lm_report import LMRow, bits_per_character, build_lm_report, print_lm_report
from kdkit.pipeline.log import get_logger
from kdkit.pipeline.resume import Resume, resume_mode, run_info
from kdkit.pipeline.run import save_config
from kdkit.pipeline.stage import StageResult, fit_stage

log = get_logger(__name__)

__all__ = [
    "build_lm",
    "build_recipe",
    "distill_lm",
    "enable_gradient_checkpointing",
    "evaluate_lm",
    "run",
    "train_lm",
]


def enable_gradient_checkpointing(model: nn.Module, who: str = "model") -> None:
    """Switch on a Hugging Face model's gradient (activation) checkpointing, non-reentrant:
    activations are recomputed in the backward instead of kept (same gradients, less memory)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{who}.gradient_checkpointing=true but {type(model).__name__} does not support it; "
            f"use a Hugging Face model that does (hf:gpt2, hf:llama) or set "
            f"{who}.gradient_checkpointing=false."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_lm(cfg: DictConfig, role: str, datamodule: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A freshly initialised teacher or student for the data's vocabulary, and its spec; with
    ``<role>.gradient_checkpointing`` its gradient checkpointing switched on."""
    model, spec = build_model(cfg, role, datamodule.num_classes, datamodule.input_shape)
    if cfg[role].get("gradient_checkpointing"):
        enable_gradient_checkpointing(model, role)
    return model, spec


def _fit(
    cfg: DictConfig,
    datamodule: Any,
    module: L.LightningModule,
    model: nn.Module,
    spec: dict[str, Any],
    role: str,
    stage: str,
    info: dict[str, Any],
    resume: Resume,
) -> StageResult:
    """Fit one stage and write its model file (with the hash of its initial weights)."""
    init = fingerprint_teacher(model)
    stage_dir = output_dir(cfg) / stage
    epochs = cfg.teacher.max_epochs if role == "teacher" else None
    trainer = build_trainer(cfg, stage_dir, stage, spec, max_epochs=epochs, info=info)
    start = time.perf_counter()
    resumed = fit_stage(
        cfg, trainer, module, datamodule, stage, stage_dir, spec, info, resume=resume
    )
    metadata = {"stage": stage, "init_sha256": init, "train_s": time.perf_counter() - start}
    if trainer.is_global_zero:
        save_model(stage_dir / "model.pt", model, spec, metadata=metadata)
    model.kdkit_metadata = metadata  # type: ignore[assignment]
    return StageResult(model.eval(), spec, stage_dir, resumed)


def train_lm(
    cfg: DictConfig, datamodule: Any, role: str, stage: str, *, resume: Resume = False
) -> StageResult:
    """Next-token training of ``cfg.<role>``; writes ``<run>/<stage>/model.pt``. The model is
    built right after ``seed_everything(cfg.seed)``, as the distilled student is."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, spec = build_lm(cfg, role, datamodule)
    module = CausalLMModule(model, *build_optimizer_factories(cfg))
    info = run_info(cfg, stage, role)
    return _fit(cfg, datamodule, module, model, spec, role, stage, info, resume)


def build_recipe(
    cfg: DictConfig, student: nn.Module, teacher: nn.Module
) -> tuple[SequenceKD | OnPolicyGKD | None, int | None]:
    """``cfg.distill.recipe`` (``distill=seqkd`` / ``distill=gkd``) built for these models, with
    its ``prompt_length``; ``(None, None)`` for methods that train on the data's batches. The
    recipe is seeded with ``cfg.seed`` unless the node sets ``seed``."""
    node = cfg.distill.get("recipe")
    if node is None:
        return None, None
    options = to_container(node)
    prompt_length = options.pop("prompt_length", None)
    options.setdefault("seed", int(cfg.seed))
    block = int(cfg.data.block_size)
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        raise ValueError(
            f"distill.recipe.prompt_length must be an int (the tokens of each block kept as "
            f"the prompt), got {prompt_length!r}; set distill.recipe.prompt_length=<1.."
            f"{block - 1}>."
        )
    if not 1 <= prompt_length < block:
        raise ValueError(
            f"distill.recipe.prompt_length={prompt_length} must be in [1, {block - 1}] "
            f"(data.block_size={block}); lower it or raise data.block_size."
        )
    new_tokens = options.get("max_new_tokens")
    if isinstance(new_tokens, int) and prompt_length + new_tokens > block:
        raise ValueError(
            f"distill.recipe.prompt_length={prompt_length} + max_new_tokens={new_tokens} is "
            f"longer than the models' positions (data.block_size={block}); make their sum "
            f"<= {block}, e.g. distill.recipe.max_new_tokens={block - prompt_length}."
        )
    factory = instantiate(options)
    recipe = factory(student, teacher) if _takes(factory, "student") else factory(teacher)
    if not isinstance(recipe, SequenceKD | OnPolicyGKD):
        raise TypeError(
            f"distill.recipe built a {type(recipe).__name__}; use kdkit.generation.SequenceKD "
            "or kdkit.generation.OnPolicyGKD as its _target_."
        )
    if isinstance(recipe, OnPolicyGKD):
        extra = [name for name, node in cfg.distill.terms.items() if node is not None]
        if extra:
            raise ValueError(
                f"distill={cfg.distill.method}: OnPolicyGKD scores every batch with its own "
                f"generalized-JSD term (distill.recipe.beta / temperature), so distill.terms "
                f"must be empty, got {extra}; remove them (~distill.terms.{extra[0]})."
            )
    return recipe, prompt_length


def _takes(factory: Any, name: str) -> bool:
    return name in inspect.signature(factory).parameters


def distill_lm(
    cfg: DictConfig, datamodule: Any, teacher: nn.Module, stage: str = "distilled", *,
    resume: Resume = False,
) -> StageResult:  # fmt: skip
    """Distil ``cfg.student`` from ``teacher`` with the ``cfg.distill`` terms; the student starts
    from the scratch student's weights and sees its batches."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student, spec = build_lm(cfg, "student", datamodule)
    recipe, prompt_length = build_recipe(cfg, student, teacher)
    if isinstance(recipe, OnPolicyGKD):
        distiller = recipe.distiller
    else:
        distiller = build_distiller(cfg, student, teacher, datamodule)
    module = CausalLMDistillationModule(
        distiller, *build_optimizer_factories(cfg), recipe=recipe, prompt_length=prompt_length
    )
    info = run_info(cfg, "distilled", "student", teacher=teacher)
    return _fit(cfg, datamodule, module, student, spec, "student", stage, info, resume)


@torch.no_grad()
def evaluate_lm(
    models: dict[str, nn.Module], datamodule: Any, split: str, teacher: str | None = "teacher"
) -> dict[str, dict[str, float]]:
    """Each model's nats per token, perplexity, bits per character (and top-1 agreement with
    ``models[teacher]``) over every kept token of ``split``, in one pass over its batches."""
    loader = getattr(datamodule, f"{split}_dataloader")()
    nats = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    tokens = characters = 0
    for model in models.values():
        model.eval()
    for batch in loader:
        input_ids, labels = batch[0], batch[1]
        keep = labels != IGNORE_INDEX
        tokens += int(keep.sum())
        characters += datamodule.characters(labels)
        logits = {role: lm_logits(model, input_ids) for role, model in models.items()}
        reference = logits[teacher].argmax(-1)[keep] if teacher in logits else None
        for role, z in logits.items():
            nats[role] += float(next_token_loss(z, labels, reduction="sum"))
            if reference is not None:
                agree[role] += int((z.argmax(-1)[keep] == reference).sum())
    if tokens == 0:
        raise ValueError(
            f"the {split} split has no tokens to evaluate; raise data.eval_blocks (or set it to "
            "null for the whole split) or lower data.block_size."
        )
    return {
        role: {
            "nll": nats[role] / tokens,
            "ppl": math.exp(nats[role] / tokens),
            "bpc": bits_per_character(nats[role], characters),
            "tokens": tokens,
            "characters": characters,
            "agreement": agree[role] / tokens if teacher in models else None,
        }
        for role in models
    }


def _tokens_per_s(cfg: DictConfig, model: nn.Module, datamodule: Any) -> float | None:
    """CPU inference throughput on one thread over a batch of test blocks."""
    if not cfg.evaluate.latency:
        return None
    input_ids = next(iter(datamodule.test_dataloader()))[0]
    timing = measure_latency(model, input_ids, repeats=int(cfg.evaluate.latency_repeats))
    return input_ids.numel() / (timing["latency_ms_per_batch"] / 1000.0)


def _rows(
    cfg: DictConfig, stages: dict[str, StageResult], names: dict[str, str], datamodule: Any
) -> list[LMRow]:
    models = {role: stage.model for role, stage in stages.items()}
    val = evaluate_lm(models, datamodule, "val")
    test = evaluate_lm(models, datamodule, "test")
    rows = []
    for role, stage in stages.items():
        metadata = getattr(stage.model, "kdkit_metadata", {})
        rows.append(
            LMRow(
                role=role,
                name=names[role],
                params=count_parameters(stage.model),
                size_bytes=size_on_disk(stage.model),
                val_nll=val[role]["nll"],
                val_ppl=val[role]["ppl"],
                val_bpc=val[role]["bpc"],
                test_nll=test[role]["nll"],
                test_ppl=test[role]["ppl"],
                test_bpc=test[role]["bpc"],
                test_tokens=int(test[role]["tokens"]),
                test_characters=int(test[role]["characters"]),
                agreement=test[role]["agreement"] if role != "teacher" else None,
                tokens_per_s=_tokens_per_s(cfg, stage.model, datamodule),
                init_sha256=metadata.get("init_sha256"),
                train_s=metadata.get("train_s"),
            )
        )
    return rows


def _teacher(cfg: DictConfig, datamodule: Any, resume: Resume) -> StageResult:
    if not cfg.teacher.checkpoint:
        return train_lm(cfg, datamodule, "teacher", "teacher", resume=resume)
    model, spec = load_teacher(cfg, datamodule.num_classes)
    return StageResult(model, spec, output_dir(cfg) / "teacher")


def _label(cfg: DictConfig, role: str, spec: dict[str, Any]) -> str:
    """The model's ``label`` in its config (e.g. ``gpt2-4x128``), else its registry name."""
    return str(cfg[role].get("label") or spec["name"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Teacher, scratch student, distilled student, evaluation and report."""
    start = time.perf_counter()
    out = output_dir(cfg)
    save_config(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    resume = resume_mode(cfg, run_command=True)
    stages = {"teacher": _teacher(cfg, datamodule, resume)}
    stages["scratch"] = train_lm(cfg, datamodule, "student", "scratch", resume=resume)
    stages["distilled"] = distill_lm(cfg, datamodule, stages["teacher"].model, resume=resume)
    if rank_zero_only.rank != 0:
        return {}
    student = _label(cfg, "student", stages["scratch"].spec)
    names = {
        "teacher": _label(cfg, "teacher", stages["teacher"].spec),
        "scratch": student,
        "distilled": f"{student} ({cfg.distill.method})",
    }
    rows = _rows(cfg, stages, names, datamodule)
    title = (
        f"kdkit report: {cfg.experiment_name} ({names['teacher']} -> {student}, "
        f"{cfg.distill.method})"
    )
    data = datamodule.describe()
    build_lm_report(rows, out, title=title, data=data, config=to_container(cfg))
    print_lm_report(rows, title=title)
    log.info("report: %s  (%.1f s)", out / "report.md", time.perf_counter() - start)
    return {row.role: row.test_ppl for row in rows}
