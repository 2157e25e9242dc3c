"""Model files and atomic checkpoints.

A kdkit model file (``model.pt``) holds the model's spec (registry name, kwargs, class count,
input shape) beside its ``state_dict``, so :func:`load_model` rebuilds it as its own class
without the config that trained it. Lightning checkpoints written by the pipeline carry the
same spec (``checkpoint["kdkit_model"]``) and hold the student and its adapters, never the
teacher (the Distiller does not register it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from kdkit.atomic import atomic_dir, atomic_write

__all__ = [
    "AtomicCheckpointIO",
    "ModelSpecCallback",
    "is_hf_model",
    "load_model",
    "load_model_file",
    "save_hf_model",
    "save_model",
]

FORMAT = "kdkit-model"
FORMAT_VERSION = 1
# Lightning modules store the model under these prefixes: ClassifierModule.net,
# DistillationModule.distiller.student.
_PREFIXES = ("net.", "distiller.student.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose files appear whole or not at all.

    Writes go to a temporary file in the checkpoint's directory, are fsync-ed, and are moved
    into place with ``os.replace``; an interrupted save leaves the previous checkpoint intact.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO does not take storage_options (got {storage_options!r}); "
                "it writes local files only."
            )
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class ModelSpecCallback(L.Callback):
    """Stores the model spec in every Lightning checkpoint (``checkpoint["kdkit_model"]``).

    ``info`` (the stage and the run's fingerprint, :func:`kdkit.pipeline.resume.run_info`)
    goes to ``checkpoint["kdkit_run"]``, so that a checkpoint resumes only the run it belongs to.
    """

    def __init__(self, spec: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> None:
        self.spec = dict(spec)
        self.info = dict(info or {})

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["kdkit_model"] = dict(self.spec)
        if self.info:
            checkpoint["kdkit_run"] = dict(self.info)


def model_spec(
    name: str,
    kwargs: Mapping[str, Any],
    num_classes: int,
    input_shape: tuple[int, ...],
    role: str | None = None,
) -> dict[str, Any]:
    """What :func:`load_model` needs to rebuild a registry model."""
    return {
        "name": name,
        "kwargs": _plain(kwargs),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "role": role,
    }


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    from kdkit.models import create_model

    kwargs = dict(spec.get("kwargs") or {})
    shape = spec["input_shape"]
    if len(shape) == 3:  # an image (C, H, W); text models take no image options
        c, h, w = shape
        kwargs.update(in_channels=int(c), image_size=(int(h), int(w)))
    return create_model(spec["name"], num_classes=int(spec["num_classes"]), **kwargs)


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: Mapping[str, Any],
    *,
    adapters: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{spec, state_dict[, adapters]}`` atomically to ``path``; returns the path."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": dict(spec),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "adapters": (
            {k: v.detach().cpu() for k, v in adapters.state_dict().items()}
            if adapters is not None and len(adapters.state_dict())
            else None
        ),
        "metadata": dict(metadata or {}),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_model_file(path: str | os.PathLike[str], *, what: str = "model file") -> dict[str, Any]:
    """Read a model file or a pipeline Lightning checkpoint as ``{spec, state_dict, ...}``."""
    p = Path(path)
    if not p.is_file():
        hint = "" if p.suffix else " (a model file is a .pt or .ckpt file)"
        raise FileNotFoundError(
            f"{what} {str(p)!r} does not exist{hint}; pass the model.pt (or checkpoints/last.ckpt)"
            " that `kdkit train` / `kdkit run` wrote under runs/<experiment>/<time>/<stage>/."
        )
    try:
        # Our own files hold only tensors and plain containers: weights_only is enough.
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        # torch's own text advises weights_only=False, which is unsafe for a file of unknown
        # origin: keep it out of the message (and out of the traceback chain).
        raise ValueError(
            f"{what} {str(p)!r} cannot be read: it is truncated or not a kdkit/torch model file; "
            "pass the model.pt (or checkpoints/last.ckpt) that `kdkit train` / `kdkit run` "
            "wrote, or re-create it with `kdkit train`."
        ) from None
    if isinstance(data, Mapping) and data.get("format") == FORMAT:
        return dict(data)
    if isinstance(data, Mapping) and "kdkit_model" in data and "state_dict" in data:
        state = {}
        adapters = {}
        for key, value in data["state_dict"].items():
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = value
                    break
            else:
                if key.startswith("distiller.adapters."):
                    adapters[key[len("distiller.adapters.") :]] = value
        return {
            "format": FORMAT,
            "spec": dict(data["kdkit_model"]),
            "state_dict": state,
            "adapters": adapters or None,
            "metadata": {"epoch": data.get("epoch"), "global_step": data.get("global_step")},
        }
    keys = sorted(data)[:8] if isinstance(data, Mapping) else type(data).__name__
    raise ValueError(
        f"{what} {str(p)!r} is not a kdkit model file (found {keys}); kdkit reads the model.pt "
        "and checkpoints/*.ckpt files that its pipeline writes, which store the model spec "
        "beside the weights."
    )


def load_model(path: str | os.PathLike[str], *, what: str = "model file") -> nn.Module:
    """Rebuild the model saved at ``path`` (model.pt or a pipeline .ckpt) as its own class.

    The result is in eval mode, on the CPU; the spec is on ``model.kdkit_spec``.
    """
    data = load_model_file(path, what=what)
    model = build_from_spec(data["spec"])
    missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{what} {str(path)!r} does not match model {data['spec']['name']!r}: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}; the file was written for another "
            "architecture."
        )
    model.kdkit_spec = dict(data["spec"])  # type: ignore[assignment]
    return model.eval()


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (it has ``save_pretrained``)."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def save_hf_model(
    directory: str | os.PathLike[str], model: nn.Module, tokenizer: Any = None
) -> Path:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` (when given) into
    ``directory``, which appears whole or not at all: both are written into a temporary folder
    beside it, which then replaces ``directory`` (:func:`kdkit.atomic.replace_dir`).
    ``AutoModel*.from_pretrained(directory)`` and ``AutoTokenizer.from_pretrained(directory)``
    read it back."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
