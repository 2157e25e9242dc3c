"""Hugging Face helpers: a student config from a teacher's, and a student initialised from it.

* :func:`student_config` builds a shallower / thinner config from a teacher's Hugging Face config,
  keeping everything else (vocabulary, positions, token types, labels, activation, ...).
* :func:`init_student_from_teacher` copies the teacher's embeddings, a subset of its layers and
  its head into the student wherever names and shapes match: DistilBERT's initialisation (Sanh et
  al. 2019, "one layer out of two"), or TinyBERT's uniform layer choice.

Both work for BERT-style encoders and GPT-2 / Llama-style causal LMs; configs are read through
their standard names (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``), which
Hugging Face maps to each model's own (``n_layer``, ``n_embd``, ``n_head``). Needs the ``hf``
extra: ``pip install 'kdkit[hf]'``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdkit.capture import map_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["InitSummary", "init_student_from_teacher", "student_config"]

LAYER_MAPS = ("uniform", "every_other")

# Feed-forward width, by config family: BERT / Llama, GPT-2 (None = 4 * hidden), OPT, T5.
_INTERMEDIATE_NAMES = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "kdkit.hf needs Hugging Face transformers; install the extra: pip install 'kdkit[hf]'"
        ) from error
    return transformers


# --------------------------------------------------------------------------------------------
# student config
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"student_config: {name} must be a positive int, got {value!r}")
    return value


def _standard(config: PretrainedConfig, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise ValueError(
            f"student_config: {type(config).__name__} has no {name!r} (nor an attribute_map entry "
            "for it), so it is not a transformer config this helper knows; set the fields "
            "yourself on a copy of the config"
        )
    return value


def student_config(
    teacher_config: PretrainedConfig,
    num_layers: int,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """A copy of ``teacher_config`` with ``num_layers`` layers (and optionally thinner).

    Args:
        teacher_config: the teacher's Hugging Face config (``teacher.config``).
        num_layers: the student's layer count, ``1 <= num_layers <= teacher's``.
        hidden_size: the student's width; None keeps the teacher's.
        num_heads: the student's attention heads; None keeps the teacher's. ``hidden_size`` must
            be a multiple of it (unless the config fixes ``head_dim`` on its own).
        intermediate_size: the feed-forward width (``intermediate_size``, GPT-2's ``n_inner``,
            ...); None keeps the teacher's ratio to the hidden size (the teacher's value when the
            width is unchanged; GPT-2's ``n_inner=None`` stays ``4 * hidden``).
        overrides: any other config attribute, e.g. ``num_labels=2`` or, for encoder-decoder
            models, ``decoder_layers=3``; applied last.

    Everything else is copied: vocabulary, maximum positions, token types, activation, dropout,
    labels, ``architectures``. ``head_dim`` follows the new width when it was ``hidden_size /
    num_attention_heads``; ``num_key_value_heads`` follows ``num_heads`` when the teacher had no
    grouped-query attention, else it is kept and must divide ``num_heads``. A per-layer
    ``layer_types`` list (full / sliding attention) keeps its first ``num_layers`` entries.
    """
    transformers = _require_transformers()
    if not isinstance(teacher_config, transformers.PretrainedConfig):
        raise TypeError(
            f"student_config needs the teacher's Hugging Face config (teacher.config), got "
            f"{type(teacher_config).__name__}"
        )
    teacher_layers = _standard(teacher_config, "num_hidden_layers")
    teacher_hidden = _standard(teacher_config, "hidden_size")
    teacher_heads = _standard(teacher_config, "num_attention_heads")
    num_layers = _positive("num_layers", num_layers)
    if num_layers > teacher_layers:
        raise ValueError(
            f"student_config: num_layers={num_layers} exceeds the teacher's {teacher_layers} "
            "layers; a student from a teacher is shallower (or as deep): pass num_layers <= "
            f"{teacher_layers}"
        )
    hidden = teacher_hidden if hidden_size is None else _positive("hidden_size", hidden_size)
    heads = teacher_heads if num_heads is None else _positive("num_heads", num_heads)

    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = num_layers
    config.hidden_size = hidden
    config.num_attention_heads = heads
    derived_head_dim = getattr(teacher_config, "head_dim", None) in (
        None,
        teacher_hidden // teacher_heads,
    )
    if derived_head_dim and hidden % heads:
        divisors = [h for h in range(1, hidden + 1) if hidden % h == 0]
        raise ValueError(
            f"student_config: hidden_size={hidden} is not divisible by num_heads={heads}; each "
            f"head gets hidden_size / num_heads features. Heads that divide {hidden}: {divisors}"
        )
    if derived_head_dim and getattr(teacher_config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    teacher_kv = getattr(teacher_config, "num_key_value_heads", None)
    if teacher_kv is not None and "num_key_value_heads" not in overrides:
        if teacher_kv == teacher_heads:
            config.num_key_value_heads = heads
        elif heads % teacher_kv:
            raise ValueError(
                f"student_config: num_heads={heads} is not a multiple of the teacher's "
                f"num_key_value_heads={teacher_kv} (grouped-query attention); pick num_heads a "
                "multiple of it, or pass num_key_value_heads=... as well"
            )
    layer_types = getattr(teacher_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == teacher_layers:
        # Per-layer attention kinds (Qwen2, Gemma: full / sliding): the pattern's first layers.
        config.layer_types = layer_types[:num_layers]
    _set_intermediate(config, teacher_config, intermediate_size, hidden, teacher_hidden)
    for name, value in overrides.items():
        setattr(config, name, value)
    config._name_or_path = ""
    return config


def _set_intermediate(
    config: PretrainedConfig,
    teacher_config: PretrainedConfig,
    intermediate_size: int | None,
    hidden: int,
    teacher_hidden: int,
) -> None:
    fields = teacher_config.to_dict()
    name = next((n for n in _INTERMEDIATE_NAMES if n in fields), None)
    if intermediate_size is not None:
        _positive("intermediate_size", intermediate_size)
        if name is None:
            raise ValueError(
                f"student_config: {type(teacher_config).__name__} has none of "
                f"{_INTERMEDIATE_NAMES}, so intermediate_size cannot be set; pass the config's "
                "own feed-forward field as a keyword instead"
            )
        setattr(config, name, intermediate_size)
    elif name is not None and fields[name] is not None and hidden != teacher_hidden:
        setattr(config, name, max(1, round(fields[name] * hidden / teacher_hidden)))


# --------------------------------------------------------------------------------------------
# student from teacher
# --------------------------------------------------------------------------------------------


@dataclass
class InitSummary:
    """What :func:`init_student_from_teacher` did.

    Attributes:
        copied: the student's parameter / buffer names that now hold the teacher's values.
        skipped: ``(name, reason)`` for the student's tensors left as they were.
        layers: for each layer stack (``nn.ModuleList``, student path), the teacher layer each
            student layer was copied from.
    """

    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layers: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} tensors, skipped {len(self.skipped)}"]
        lines += [f"  {path}: teacher layers {indices}" for path, indices in self.layers.items()]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _body_prefix(model: nn.Module) -> str:
    """The path of Hugging Face's ``base_model`` (``"bert"``, ``"transformer"``, ``"model"``)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    return next((name for name, module in model.named_modules() if module is base), "")


def _key(name: str, prefix: str) -> tuple[str, str]:
    """``("body", path in the base model)`` or ``("head", path)``: a BertModel student and a
    BertForSequenceClassification teacher share the body's names."""
    if not prefix:
        return ("body", name)
    if name.startswith(prefix + "."):
        return ("body", name[len(prefix) + 1 :])
    return ("head", name)


def _stacks(model: nn.Module, prefix: str) -> dict[tuple[str, str], tuple[str, int]]:
    """The layer stacks: outermost ``nn.ModuleList`` s of one module class, by key: (path, size)."""
    found: dict[tuple[str, str], tuple[str, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if any(name.startswith(path + ".") for path, _ in found.values()):
            continue  # a list inside a layer (experts, sub-layers) is part of that layer
        found[_key(name, prefix)] = (name, len(module))
    return found


def _layer_indices(
    layer_map: str | Sequence[int], student: int, teacher: int, path: str
) -> list[int]:
    """Teacher layer of each of the ``student`` layers of stack ``path``."""
    if layer_map == "uniform":
        if student > teacher:
            raise ValueError(
                f"init_student_from_teacher: the student's {path} has {student} layers, more "
                f"than the teacher's {teacher}; build the student with "
                "kdkit.hf.student_config(teacher.config, num_layers=...)"
            )
        # One definition of TinyBERT's uniform map: kdkit.capture.map_layers.
        return [int(t) for _, t in map_layers("{i}", "{i}", student, teacher, "uniform")]
    if layer_map == "every_other":
        if 2 * (student - 1) >= teacher:
            raise ValueError(
                f"init_student_from_teacher: layer_map='every_other' takes teacher layers 0, 2, "
                f"4, ..., so {student} student layers need at least {2 * student - 1} teacher "
                f"layers in {path}, the teacher has {teacher}; use layer_map='uniform'"
            )
        return [2 * i for i in range(student)]
    if isinstance(layer_map, str) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layer_map
    ):
        raise ValueError(
            f"init_student_from_teacher: layer_map must be one of {LAYER_MAPS} or a list of "
            f"teacher layer indices (one per student layer), got {layer_map!r}"
        )
    indices = list(layer_map)
    if len(indices) != student or not all(0 <= i < teacher for i in indices):
        raise ValueError(
            f"init_student_from_teacher: layer_map {indices} must give one teacher layer in "
            f"0..{teacher - 1} for each of the student's {student} layers in {path}"
        )
    return indices


def _tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and persistent buffers (a tied weight once, under its first name)."""
    persistent = set(model.state_dict())
    buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
    return [*model.named_parameters(), *buffers]


def init_student_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    layer_map: str | Sequence[int] = "uniform",
) -> InitSummary:
    """Copy the teacher's weights into the student wherever names and shapes match.

    Embeddings, final norms and the head are copied by name; in each layer stack (the outermost
    ``nn.ModuleList`` of one layer class: BERT's ``encoder.layer``, GPT-2's ``h``, Llama's
    ``layers``, an encoder-decoder's two stacks) student layer ``i`` takes teacher layer
    ``layer_map[i]``:

    * ``"uniform"`` (default): TinyBERT's uniform map, :func:`kdkit.capture.map_layers` (12 -> 6:
      teacher layers 1, 3, 5, 7, 9, 11; as many layers: the identity);
    * ``"every_other"``: DistilBERT's "one layer out of two", teacher layers 0, 2, 4, ...
      (DistilBERT's released script took 0, 2, 4, 7, 9, 11: pass that list to reproduce it);
    * a list of teacher layer indices, one per student layer.

    A bare model and its task model match by the body's names (``BertModel`` student,
    ``BertForSequenceClassification`` teacher). A student tensor whose teacher counterpart is
    missing or has another shape is skipped, not an error (a thinner student keeps its random
    init there); copying nothing at all is an error. Works on any pair of torch models of one
    architecture; Hugging Face models are the ones it is made for.

    Returns:
        an :class:`InitSummary`: what was copied, what was skipped and why, the layer maps.
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"init_student_from_teacher: {name} must be an nn.Module, got "
                f"{type(model).__name__}"
            )
    s_prefix, t_prefix = _body_prefix(student), _body_prefix(teacher)
    s_stacks, t_stacks = _stacks(student, s_prefix), _stacks(teacher, t_prefix)
    summary = InitSummary()
    maps: dict[tuple[str, str], list[int]] = {}
    for key, (path, size) in s_stacks.items():
        if key in t_stacks:
            maps[key] = _layer_indices(layer_map, size, t_stacks[key][1], path)
            summary.layers[path] = maps[key]

    teacher_tensors = {_key(name, t_prefix): tensor for name, tensor in _tensors(teacher)}
    with torch.no_grad():
        for name, tensor in _tensors(student):
            source = teacher_tensors.get(_teacher_key(_key(name, s_prefix), maps))
            if source is None:
                summary.skipped.append((name, "the teacher has no such tensor"))
            elif source.shape != tensor.shape:
                summary.skipped.append(
                    (name, f"shape {tuple(tensor.shape)}, the teacher's {tuple(source.shape)}")
                )
            else:
                tensor.copy_(source)
                summary.copied.append(name)
    if not summary.copied:
        reasons = "; ".join(f"{n}: {r}" for n, r in summary.skipped[:3])
        raise ValueError(
            "init_student_from_teacher copied nothing: no student tensor has a teacher tensor of "
            f"the same name and shape ({reasons}, ...). Student and teacher must share an "
            "architecture and widths; build the student from kdkit.hf.student_config("
            "teacher.config, num_layers=...)"
        )
    return summary


_LAYER_INDEX = re.compile(r"(\d+)(\..*|)$")


def _teacher_key(key: tuple[str, str], maps: dict[tuple[str, str], list[int]]) -> tuple[str, str]:
    """The teacher's key of a student tensor: its layer index mapped when it is in a stack."""
    part, path = key
    for (stack_part, stack), indices in maps.items():
        if stack_part == part and path.startswith(stack + "."):
            match = _LAYER_INDEX.match(path[len(stack) + 1 :])
            if match:
                return (part, f"{stack}.{indices[int(match.group(1))]}{match.group(2)}")
    return key
