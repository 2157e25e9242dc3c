"""Rank-aware logging for the pipeline: ``get_logger(__name__)`` logs from process 0 only.

A DDP run starts one process per device; without this, every message would appear once per
process (lightning-hydra-template's ``RankedLogger``). Where messages go is configured once, in
``configs/hydra/job_logging/kdkit.yaml``: the console (stderr) and ``<run dir>/cli.log``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only


class RankZeroLogger(logging.LoggerAdapter):
    """A logger whose records are emitted by the process of global rank 0 only."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if getattr(rank_zero_only, "rank", 0) == 0:
            super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


def get_logger(name: str, extra: Mapping[str, object] | None = None) -> RankZeroLogger:
    return RankZeroLogger(logging.getLogger(name), extra or {})


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO; ``warning: message`` (``error: ...``) for higher levels."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text
