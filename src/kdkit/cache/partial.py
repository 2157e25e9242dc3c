"""An unfinished cache build on disk, and what a resumed build may trust of it.

The build writes rows (one per sample and view) into the final arrays in ``.<name>.partial/``
in blocks of ``block_rows`` samples of one view (or in blocks with explicit row bounds: the
token cache's rows are tokens, its blocks whole groups of sequences). When a block is complete
its rows are flushed and the sha256 of each array's rows is recorded in ``meta.json.partial``
(written atomically), so a crash at any point leaves only recorded blocks that were fully on
disk. A resumed build re-hashes every recorded block and keeps only those that match: a
truncated, zeroed or altered block, and any block without a recorded checksum, is computed
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdkit.atomic import atomic_write_text

__all__ = ["PARTIAL_META", "PartialBuild"]

PARTIAL_META = "meta.json.partial"

logger = logging.getLogger(__name__)

Checksums = dict[str, str]
_ARRAY_KEYS = {"file", "dtype", "shape", "bytes"}


class PartialBuild:
    """The arrays of a build in progress and the checksum of each completed block.

    ``blocks[view][j]`` is ``{array name: sha256}`` of rows ``block_range(j)`` of ``view``, or
    None while that block is not (trustably) written. Blocks are ``block_rows`` rows each out of
    ``settings["num_samples"]``, unless ``bounds`` (the first row of each block, then the number
    of rows) sets them. ``who`` names the cache and ``unit`` its rows in messages.
    """

    def __init__(
        self,
        tmp: Path,
        settings: dict,
        block_rows: int,
        bounds: Sequence[int] | None = None,
        who: str = "TeacherCache",
        unit: str = "sample",
    ) -> None:
        self.tmp = tmp
        self.settings = settings
        self.block_rows = block_rows
        self.who = who
        self.unit = unit
        if bounds is None:
            n = int(settings["num_samples"])
            bounds = [*range(0, n, block_rows), n] if n else [0]
        self.bounds = list(bounds)
        self.num_samples = self.bounds[-1]
        self.blocks: list[list[Checksums | None]] = [
            [None] * (len(self.bounds) - 1) for _ in range(settings["num_views"])
        ]
        self.meta: dict = {}
        self.arrays: dict[str, np.memmap] = {}

    # ---- layout ----------------------------------------------------------------------------

    def block_range(self, j: int) -> tuple[int, int]:
        return self.bounds[j], self.bounds[j + 1]

    @property
    def rows_done(self) -> int:
        """Rows (sample x view) in recorded blocks."""
        return sum(
            stop - start
            for sums in self.blocks
            for j, s in enumerate(sums)
            if s is not None
            for start, stop in [self.block_range(j)]
        )

    def todo(self, view: int) -> list[tuple[int, int]]:
        """Sample ranges of ``view`` still to compute: runs of consecutive unrecorded blocks."""
        runs: list[tuple[int, int]] = []
        for j, sums in enumerate(self.blocks[view]):
            if sums is not None:
                continue
            start, stop = self.block_range(j)
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        return runs

    # ---- writing -----------------------------------------------------------------------------

    def allocate(self, meta: dict) -> None:
        """Create the arrays ``meta["arrays"]`` describes (zero-filled) and record their size."""
        self.meta = meta
        for name, info in meta["arrays"].items():
            self.arrays[name] = self._create(info)

    def _create(self, info: dict) -> np.memmap:
        file = self.tmp / info["file"]
        arr = np.lib.format.open_memmap(
            file, mode="w+", dtype=np.dtype(info["dtype"]), shape=tuple(info["shape"])
        )
        info["bytes"] = file.stat().st_size
        return arr

    def write(self, view: int, pos: int, outputs: dict[str, np.ndarray]) -> None:
        """Store one batch of outputs at samples ``pos, pos + 1, ...`` of ``view``."""
        for name, value in outputs.items():
            arr = self.arrays[name]
            if value.shape[1:] != arr.shape[2:] or value.dtype != arr.dtype:
                raise ValueError(
                    f"{self.who}.build: output {name!r} has per-sample shape "
                    f"{list(value.shape[1:])} at sample {pos}, but {list(arr.shape[2:])} "
                    "earlier; the cache needs a fixed shape per sample (pad variable-length "
                    "inputs to one length)"
                )
            arr[view, pos : pos + len(value)] = value

    def complete(self, view: int, j: int) -> None:
        """Block ``j`` of ``view`` is written: flush it, then record its checksums atomically."""
        for arr in self.arrays.values():
            arr.flush()
        self.blocks[view][j] = self._checksums(view, j)
        self.save()

    def save(self) -> None:
        state = {
            "settings": self.settings,
            "meta": self.meta,
            "block_rows": self.block_rows,
            "blocks": self.blocks,
            "rows_done": self.rows_done,
        }
        atomic_write_text(self.tmp / PARTIAL_META, json.dumps(state, indent=2, sort_keys=True))

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()

    def _checksums(self, view: int, j: int) -> Checksums:
        start, stop = self.block_range(j)
        return {
            name: hashlib.sha256(np.ascontiguousarray(arr[view, start:stop])).hexdigest()
            for name, arr in self.arrays.items()
        }

    # ---- resuming ----------------------------------------------------------------------------

    @classmethod
    def resume_or_start(
        cls,
        tmp: Path,
        settings: dict,
        block_rows: int,
        bounds: Sequence[int] | None = None,
        who: str = "TeacherCache",
        unit: str = "sample",
    ) -> PartialBuild:
        """The unfinished build in ``tmp`` with its verified blocks, or a fresh one.

        ``bounds``, ``who`` and ``unit`` as in :class:`PartialBuild`; they must follow from
        ``settings``.

        A build started with other settings, or whose progress record cannot be read, is
        discarded (with a warning); a recorded block whose rows no longer match its checksum is
        dropped and computed again (logged).
        """
        state = _read_state(tmp / PARTIAL_META)
        build = None
        if state is not None and "settings" in state and state["settings"] != settings:
            warnings.warn(
                f"{who}.build: discarding the unfinished build in {tmp}: it was "
                "started with a different teacher, dataset, transform or settings",
                stacklevel=3,
            )
        elif state is not None:
            build = cls._from_state(tmp, settings, state, bounds, who, unit)
            if build is None:
                warnings.warn(
                    f"{who}.build: discarding the unfinished build in {tmp}: its "
                    f"progress record {PARTIAL_META} is unreadable (corrupted or written by "
                    "another kdkit version)",
                    stacklevel=3,
                )
        if build is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            build = cls(tmp, settings, block_rows, bounds, who, unit)
        return build

    @classmethod
    def _from_state(
        cls,
        tmp: Path,
        settings: dict,
        state: dict,
        bounds: Sequence[int] | None,
        who: str,
        unit: str,
    ) -> PartialBuild | None:
        block_rows, blocks = state.get("block_rows"), state.get("blocks")
        if not isinstance(block_rows, int) or block_rows < 1 or not isinstance(blocks, list):
            return None
        build = cls(tmp, settings, block_rows, bounds, who, unit)
        if [len(b) if isinstance(b, list) else -1 for b in blocks] != [
            len(b) for b in build.blocks
        ]:
            return None
        meta = state.get("meta")
        arrays = meta.get("arrays") if isinstance(meta, dict) else None
        if not arrays:
            return build  # stopped before the first batch was stored: nothing to trust
        if not isinstance(arrays, dict) or not all(
            isinstance(info, dict) and _ARRAY_KEYS <= info.keys() for info in arrays.values()
        ):
            return None
        build.meta = meta
        build.arrays = {name: build._reopen(info) for name, info in arrays.items()}
        failed = []
        for view, sums in enumerate(blocks):
            for j, recorded in enumerate(sums):
                if recorded is None:
                    continue
                if recorded == build._checksums(view, j):
                    build.blocks[view][j] = recorded
                else:
                    failed.append((view, j))
        build._log_resume(failed)
        return build

    def _reopen(self, info: dict) -> np.memmap:
        """The array file at its recorded size (a truncated file is zero-extended, so its lost
        rows fail their checksums); a missing or unreadable file is created anew."""
        file = self.tmp / info["file"]
        try:
            if file.stat().st_size != info["bytes"]:
                os.truncate(file, info["bytes"])
            arr = np.lib.format.open_memmap(file, mode="r+")
            if arr.shape == tuple(info["shape"]) and arr.dtype == np.dtype(info["dtype"]):
                return arr
        except Exception:  # a damaged header fails in many ways (OSError, tokenize, eval)
            pass  # nothing in it is trusted: it is created anew and every block re-computed
        return self._create(info)

    def _log_resume(self, failed: list[tuple[int, int]]) -> None:
        total = self.num_samples * len(self.blocks)
        todo = [(view, runs[0][0]) for view in range(len(self.blocks)) if (runs := self.todo(view))]
        where = (
            f"continuing at view {todo[0][0]}, {self.unit} {todo[0][1]} (block "
            f"{bisect_right(self.bounds, todo[0][1]) - 1} of {len(self.bounds) - 1})"
            if todo
            else "every block is done; finishing"
        )
        logger.info(
            "%s.build: resuming the unfinished build in %s: %d of %d rows verified; %s",
            self.who,
            self.tmp,
            self.rows_done,
            total,
            where,
        )
        if failed:
            spans = ", ".join(
                f"view {view} {self.unit}s {start}..{stop - 1}"
                for view, j in failed
                for start, stop in [self.block_range(j)]
            )
            logger.warning(
                "%s.build: %d block(s) failed verification (truncated or corrupted "
                "since they were written) and are re-computed: %s",
                self.who,
                len(failed),
                spans,
            )


def _read_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}
