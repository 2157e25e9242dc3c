"""A Hugging Face encoder as a sentence-transformers model: pooled, L2-normalised sentence vectors.

``SentenceEncoder(model, pooling="mean", normalize=True)`` is the sentence-transformers pipeline
``Transformer -> Pooling -> Normalize`` (Reimers & Gurevych 2019, "Sentence-BERT") in one
``nn.Module``:

    embedding = normalize(sum_t m_t h_t / sum_t m_t)        (pooling="mean")

over the last hidden states ``h_t`` of the tokens the attention mask ``m`` keeps (``"cls"``
takes ``h_0``, ``"max"`` the maximum over kept tokens). Its forward returns a
:class:`SentenceEmbeddingOutput`, so Distiller terms read ``output.embedding``,
``output.last_hidden_state`` or ``output.hidden_states[i]`` (Hugging Face indices).

:meth:`SentenceEncoder.from_pretrained` reads a sentence-transformers directory (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``) or a plain Hugging Face one (mean
pooling); :meth:`~SentenceEncoder.save_pretrained` writes one that both
``SentenceEncoder.from_pretrained`` and ``sentence_transformers.SentenceTransformer`` load.
Needs the ``hf`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.atomic import atomic_dir

__all__ = ["POOLING_MODES", "SentenceEmbeddingOutput", "SentenceEncoder", "pool"]

POOLING_MODES = ("mean", "cls", "max")
# sentence-transformers' names: modules.json types and 1_Pooling/config.json keys.
_ST = "sentence_transformers.models."
_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "max": "pooling_mode_max_tokens"}  # fmt: skip
_OTHER_POOLING_KEYS = (
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
DEFAULT_MAX_LENGTH = 256


@dataclass
class SentenceEmbeddingOutput:
    """What :class:`SentenceEncoder` returns: the sentence vectors ``[B, D]`` and the encoder's
    token states (``hidden_states`` / ``attentions`` only when asked for)."""

    embedding: Tensor
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def pool(hidden: Tensor, mask: Tensor, mode: str = "mean") -> Tensor:
    """Sentence vectors ``[B, D]`` from token states ``[B, L, D]`` and the mask ``[B, L]``."""
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        # sentence-transformers' Pooling: the clamp keeps an all-padding row finite (zero).
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).amax(1)
    raise ValueError(f"pooling={mode!r} is not one of {POOLING_MODES}")


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"SentenceEncoder: pooling={pooling!r} is not one of {POOLING_MODES} (mean over kept "
            "tokens as sentence-transformers' all-* models, the [CLS] token, or the maximum)"
        )
    return pooling


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder (``model``, e.g. a ``BertModel``) with sentence pooling.

    Args:
        model: the encoder; called ``model(input_ids=..., attention_mask=..., ...)``.
        pooling: ``"mean"`` (over the tokens the attention mask keeps), ``"cls"`` or ``"max"``.
        normalize: L2-normalise the pooled vector (sentence-transformers' ``Normalize``).
        max_length: the longest input in tokens that :meth:`encode` feeds (longer ones are
            truncated), sentence-transformers' ``max_seq_length``.
    """

    def __init__(
        self,
        model: nn.Module,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        super().__init__()
        self.model = model
        self.pooling = _check_pooling(pooling)
        self.normalize = bool(normalize)
        self.max_length = int(max_length)

    @property
    def config(self) -> Any:
        """The encoder's Hugging Face config."""
        return self.model.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SentenceEmbeddingOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **({"token_type_ids": token_type_ids} if token_type_ids is not None else {}),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        embedding = pool(out.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            embedding = nn.functional.normalize(embedding, dim=-1)
        return SentenceEmbeddingOutput(
            embedding,
            out.last_hidden_state,
            out.hidden_states if output_hidden_states else None,
            out.attentions if output_attentions else None,
        )

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], tokenizer: Any, batch_size: int = 32) -> Tensor:
        """The embeddings ``[N, D]`` of ``sentences`` (eval mode, no grad, on the model's device),
        tokenized with ``tokenizer`` (truncated at ``max_length``), in batches of similar length
        (as sentence-transformers' ``encode``: less padding), returned in the given order."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        embeddings = torch.empty(len(sentences), self.config.hidden_size, device=device)
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [sentences[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                embeddings[rows] = self(**{k: v.to(device) for k, v in batch.items()}).embedding
            return embeddings
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(
        cls, directory: str | Path, attn_implementation: str = "sdpa"
    ) -> SentenceEncoder:
        """Load a sentence-transformers directory (its pooling, normalisation and maximum
        length), or a plain Hugging Face model directory (mean pooling, normalised)."""
        from kdkit.models.hf_models import create_hf_model

        directory = Path(directory)
        pooling, normalize, max_length = _read_sentence_config(directory)
        model = create_hf_model(
            str(directory), 0, head="base", attn_implementation=attn_implementation
        )
        return cls(model, pooling, normalize, max_length)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write the encoder (``save_pretrained``), ``tokenizer`` and the sentence-transformers
        files to ``directory`` atomically (a temporary directory renamed into place)."""
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            kinds = [("", "Transformer"), ("1_Pooling", "Pooling")]
            if self.normalize:
                kinds.append(("2_Normalize", "Normalize"))
                (tmp / "2_Normalize").mkdir()
            modules = [
                {"idx": i, "name": str(i), "path": path, "type": _ST + kind}
                for i, (path, kind) in enumerate(kinds)
            ]
            pooling_config = {"word_embedding_dimension": int(self.config.hidden_size)}
            pooling_config |= {key: mode == self.pooling for mode, key in _POOLING_KEYS.items()}
            pooling_config["pooling_mode_mean_sqrt_len_tokens"] = False
            (tmp / "1_Pooling").mkdir()
            _write_json(tmp / "1_Pooling" / "config.json", pooling_config)
            _write_json(tmp / "modules.json", modules)
            _write_json(
                tmp / "sentence_bert_config.json",
                {"max_seq_length": self.max_length, "do_lower_case": False},
            )
        return Path(directory)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"SentenceEncoder.from_pretrained: cannot read {path} ({error}); the directory is "
            "not a complete sentence-transformers model: save it again"
        ) from None


def _read_sentence_config(directory: Path) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length) of a sentence-transformers directory; a plain Hugging
    Face directory (no modules.json) gives mean pooling, normalised."""
    max_length = DEFAULT_MAX_LENGTH
    if (directory / "sentence_bert_config.json").is_file():
        max_length = int(
            _read_json(directory / "sentence_bert_config.json").get("max_seq_length", max_length)
        )
    if not (directory / "modules.json").is_file():
        return "mean", True, max_length
    modules = _read_json(directory / "modules.json")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    normalize = "Normalize" in types
    if "Pooling" not in types:
        raise ValueError(
            f"SentenceEncoder.from_pretrained: {directory}/modules.json has no Pooling module "
            f"(modules: {types}); SentenceEncoder reads Transformer -> Pooling [-> Normalize] "
            "models"
        )
    path = directory / modules[types.index("Pooling")]["path"] / "config.json"
    config = _read_json(path)
    if "pooling_mode" in config:  # sentence-transformers >= 5 writes the mode by name
        modes = (
            [config["pooling_mode"]]
            if isinstance(config["pooling_mode"], str)
            else list(config["pooling_mode"])
        )
    else:
        modes = [m for m, key in _POOLING_KEYS.items() if config.get(key)]
        modes += [key for key in _OTHER_POOLING_KEYS if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"SentenceEncoder.from_pretrained: {path} asks for pooling {modes}; SentenceEncoder "
            f"pools with exactly one of {POOLING_MODES}"
        )
    return modes[0], normalize, max_length
