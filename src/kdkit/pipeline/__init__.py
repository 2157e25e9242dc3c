"""The end-to-end pipeline behind the `kdkit` command (config in, run folder out).

``kdkit.pipeline.load_model(path)`` rebuilds a model saved by the pipeline (``model.pt`` or a
Lightning ``.ckpt``) as its own class, without the config that trained it.
"""

from kdkit.pipeline import resolvers  # noqa: F401  (registers the configs' ${kdkit.*} resolvers)
from kdkit.pipeline.checkpoint import AtomicCheckpointIO, load_model, save_model

__all__ = ["AtomicCheckpointIO", "load_model", "save_model"]
