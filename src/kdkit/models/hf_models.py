"""Hugging Face models in the model registry: ``hf:<model_type>`` and ``hf:<local directory>``.

``create_model("hf:bert", num_classes, head="sequence_classification", config={...})`` builds a
randomly initialised model from a config (``AutoConfig.for_model(model_type, **config)``);
``create_model("hf:/path/to/model_dir", num_classes, head=...)`` loads a local model directory
(``from_pretrained(path, local_files_only=True)``: nothing is ever fetched from a hub).

``head`` picks the Auto class:

* ``sequence_classification``: ``AutoModelForSequenceClassification`` with ``num_labels =
  num_classes`` (text classification; the output's ``logits`` are ``[B, num_classes]``);
* ``causal_lm``: ``AutoModelForCausalLM``; ``num_classes`` is the vocabulary size (it sets
  the config's ``vocab_size``);
* ``base``: ``AutoModel`` (the encoder alone, e.g. for sentence embeddings); ``num_classes``
  is not used.

The models are returned as Hugging Face builds them (their forward takes keyword arguments and
returns a ``ModelOutput``), so terms can read ``output.hidden_states[i]`` and the model can be
shipped with ``save_pretrained``. ``attn_implementation`` defaults to ``"eager"`` (attention
probabilities and every capture point exist; pass ``"sdpa"`` for speed). Needs the ``hf`` extra.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

HF_PREFIX = "hf:"
HEADS = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "base": "AutoModel",
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "hf:<model> models need Hugging Face transformers; install the extra: "
            "pip install 'kdkit[hf]'"
        ) from error
    return transformers


def is_local_path(target: str) -> bool:
    """Whether ``hf:<target>`` names a local directory (a path), not a model type."""
    return "/" in target or target.startswith(".") or Path(target).is_dir()


def hf_config(target: str, num_classes: int, head: str, config: Mapping[str, Any]) -> Any:
    """The ``PretrainedConfig`` of ``hf:<target>`` with ``config`` applied (and ``num_labels``
    for a classification head)."""
    transformers = _transformers()
    fields = dict(config)
    if head == "sequence_classification":
        fields.setdefault("num_labels", num_classes)
    if head == "causal_lm" and not is_local_path(target):
        vocab = fields.setdefault("vocab_size", num_classes)
        if vocab != num_classes:
            raise ValueError(
                f"model hf:{target}: config vocab_size={vocab} but num_classes (the vocabulary "
                f"size of a causal_lm head) is {num_classes}; drop vocab_size from the config "
                "(num_classes sets it) or make the two equal."
            )
    if is_local_path(target):
        directory = Path(target).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"model hf:{target}: {str(directory)!r} is not a Hugging Face model directory "
                "(no config.json in it); give a directory written by save_pretrained, or "
                "hf:<model_type> (e.g. hf:bert) with config={...} for a fresh model."
            )
        return transformers.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, **fields
        )
    try:
        return transformers.AutoConfig.for_model(target, **fields)
    except ValueError:
        known = sorted(transformers.CONFIG_MAPPING.keys())
        close = difflib.get_close_matches(target, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"model hf:{target}: {target!r} is neither a Hugging Face model type nor a local "
            f"directory.{hint} Use a model_type such as bert, gpt2, llama (one of {len(known)} "
            "that transformers knows), or the path of a save_pretrained directory."
        ) from None


def create_hf_model(
    target: str,
    num_classes: int,
    head: str = "sequence_classification",
    config: Mapping[str, Any] | None = None,
    attn_implementation: str = "eager",
) -> nn.Module:
    """Build (model type) or load (local directory) the Hugging Face model ``hf:<target>``."""
    if head not in HEADS:
        raise ValueError(
            f"model hf:{target}: head={head!r} is not one of {', '.join(HEADS)}; pick the one "
            "for the task (sequence_classification for text classification, causal_lm for "
            "language models, base for an encoder's hidden states)."
        )
    transformers = _transformers()
    auto = getattr(transformers, HEADS[head])
    model_config = hf_config(target, num_classes, head, config or {})
    model_config._attn_implementation = attn_implementation
    if is_local_path(target):
        model = auto.from_pretrained(
            str(Path(target).expanduser()), config=model_config, local_files_only=True
        )
    else:
        model = auto.from_config(model_config)
    return model
