"""Resuming a stage: which checkpoint ``ckpt_path`` names, whether it belongs to this run, and
the command that resumes an interrupted one.

Every pipeline checkpoint stores the model spec (``checkpoint["kdkit_model"]``) and what the
run must share with it (:func:`run_info`, ``checkpoint["kdkit_run"]``); ``ckpt_path=last``
takes the newest ``last.ckpt`` of the stage that matches both.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from kdkit.pipeline.build import output_dir, to_container
from kdkit.pipeline.log import get_logger

log = get_logger(__name__)

Resume = bool | Literal["optional"]
"""False: start afresh; True: ``ckpt_path`` must match; ``"optional"``: use it if one matches."""


def resume_mode(cfg: DictConfig, *, run_command: bool = False) -> Resume:
    """How the stages of this command resume, from ``ckpt_path``.

    ``kdkit run`` (``run_command``) takes ``ckpt_path=last`` only, and each of its stages
    resumes from its own newest matching checkpoint if there is one.
    """
    value = cfg.ckpt_path
    if value in (None, ""):
        return False
    if not run_command:
        return True
    if str(value) != "last":
        raise ValueError(
            f"`kdkit run` takes ckpt_path=last only (got ckpt_path={value!r}): each of its stages "
            "resumes from its own newest matching checkpoint. To resume one stage from a file, "
            "use `kdkit train model=... ckpt_path=<file>` or `kdkit distill ... ckpt_path=<file>`."
        )
    return "optional"


def run_info(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """What a stage's checkpoint must share with this run to be resumed by it.

    Stored in every checkpoint (``checkpoint["kdkit_run"]``); the distilled stage adds the
    method and its resolved terms, because a kd checkpoint resumed as dkd would silently be
    reported as dkd.
    """
    info: dict[str, Any] = {"stage": stage}
    if stage == "distilled":
        info["method"] = str(cfg.distill.method)
        info["terms"] = _normal(to_container(cfg.distill.terms))
    return info


def _normal(value: Any) -> Any:
    # Compare configs as JSON: tuples/lists and key order do not matter.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _spec_key(spec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("name", "kwargs", "num_classes", "input_shape")
    return _normal({k: spec.get(k) for k in keys})


def describe_spec(spec: Mapping[str, Any]) -> str:
    kwargs = spec.get("kwargs") or {}
    return f"{spec.get('name')}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def _saved_run_info(path: Path, stage: str) -> dict[str, Any] | None:
    """Run info of a checkpoint written before it was stored: its run folder's config.yaml."""
    config = path.parent.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        saved = OmegaConf.load(config)
        assert isinstance(saved, DictConfig)
        return run_info(saved, stage)
    except Exception:
        return None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError("it cannot be read (truncated or not a torch file)") from exc
    if not isinstance(data, Mapping) or "kdkit_model" not in data:
        raise ValueError("it is not a kdkit checkpoint (no model spec stored in it)")
    return dict(data)


def checkpoint_mismatch(
    path: Path, cfg: DictConfig, stage: str, spec: Mapping[str, Any]
) -> tuple[str | None, int | None]:
    """(why ``path`` cannot resume this stage, or None; its completed epochs)."""
    try:
        data = _read_checkpoint(path)
    except ValueError as exc:
        return str(exc), None
    epochs = int(data.get("epoch", -1)) + 1
    theirs = data["kdkit_model"]
    if _spec_key(theirs) != _spec_key(spec):
        return (
            f"it holds model {describe_spec(theirs)} with {theirs.get('num_classes')} classes and "
            f"input {theirs.get('input_shape')}, this run builds {describe_spec(spec)} with "
            f"{spec.get('num_classes')} classes and input {spec.get('input_shape')}",
            epochs,
        )
    info = data.get("kdkit_run") or _saved_run_info(path, stage)
    mine = run_info(cfg, stage)
    if info is None:
        if stage == "distilled":
            return "neither it nor its run folder says which distill method trained it", epochs
        return None, epochs
    if info.get("stage", stage) != stage:
        return f"it is a {info.get('stage')!r} checkpoint, not {stage!r}", epochs
    if stage == "distilled":
        if info.get("method") != mine["method"]:
            return (
                f"it was trained with distill={info.get('method')}, this run uses "
                f"distill={mine['method']}",
                epochs,
            )
        if _normal(info.get("terms")) != mine["terms"]:
            return (
                f"its distill.terms differ from this run's (same method {mine['method']}, other "
                "weights, layers or losses)",
                epochs,
            )
    return None, epochs


def stage_epochs(cfg: DictConfig, stage: str) -> int:
    """The epochs a stage trains for: ``teacher.max_epochs`` (if set) for the teacher."""
    if stage == "teacher" and cfg.teacher.max_epochs:
        return int(cfg.teacher.max_epochs)
    return int(cfg.trainer.max_epochs)


def _announce(path: Path, epochs: int | None, cfg: DictConfig, stage: str) -> None:
    done = "; already complete, reusing it" if epochs and epochs >= stage_epochs(cfg, stage) else ""
    log.info("resuming from %s (epoch %s%s)", path, epochs, done)


def resolve_ckpt_path(
    cfg: DictConfig,
    stage: str,
    spec: Mapping[str, Any],
    *,
    required: bool = True,
    prefer: Path | None = None,
) -> Path | None:
    """``ckpt_path``: None, a file, or ``last``.

    ``last`` takes the newest ``<stage>/checkpoints/last.ckpt`` of this run dir, of ``prefer``
    (a run dir), or of ``runs/<experiment>/*/`` whose model spec (and, for the distilled stage,
    method and terms) match this run; others are skipped, and if none matches the ValueError
    lists each one and why. With ``required=False`` (``kdkit run``: a stage that never started)
    no match means None.
    """
    value = cfg.ckpt_path
    if value in (None, ""):
        return None
    if str(value) != "last":
        path = Path(str(value))
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={value!r} does not exist; pass a .ckpt file or ckpt_path=last to "
                "resume the newest matching run of this experiment."
            )
        why, epochs = checkpoint_mismatch(path, cfg, stage, spec)
        if why is not None and (why.startswith("it holds model") or epochs is None):
            raise ValueError(
                f"ckpt_path={value!r} cannot resume stage {stage!r}: {why}. Pass a checkpoint "
                "of this model (or change the student=/teacher= options to the ones it was "
                "trained with)."
            )
        if why is not None:
            log.warning("ckpt_path=%s: %s; resuming it anyway.", value, why)
        _announce(path, epochs, cfg, stage)
        return path
    tail = Path(stage) / "checkpoints" / "last.ckpt"
    here = output_dir(cfg) / tail
    root = Path("runs") / str(cfg.experiment_name)
    found = sorted(
        glob.glob(os.path.join(root, "*", str(tail))), key=os.path.getmtime, reverse=True
    )
    candidates: list[Path] = [here] if here.is_file() else []
    if prefer is not None and (prefer / tail).is_file():
        candidates.append(prefer / tail)
    for f in found:
        if Path(f).resolve() not in {c.resolve() for c in candidates}:
            candidates.append(Path(f))
    rejected = []
    for path in candidates:
        why, epochs = checkpoint_mismatch(path, cfg, stage, spec)
        if why is None:
            _announce(path, epochs, cfg, stage)
            return path
        rejected.append(f"  {path}: {why}")
    if not required:
        if rejected:
            log.info(
                "ckpt_path=last: no matching checkpoint for stage %r, training it from the "
                "start; skipped:\n%s",
                stage,
                "\n".join(rejected),
            )
        return None
    if not rejected:
        raise FileNotFoundError(
            f"ckpt_path=last: no {tail} in this run dir nor under {root}/*/; nothing to "
            "resume. Drop ckpt_path, or pass ckpt_path=<path to a .ckpt file>."
        )
    raise ValueError(
        f"ckpt_path=last: none of the {len(rejected)} {tail} files found matches this run "
        f"(stage {stage!r}, model {describe_spec(spec)}"
        + (f", distill={cfg.distill.method}" if stage == "distilled" else "")
        + "):\n"
        + "\n".join(rejected)
        + "\nDrop ckpt_path to start afresh, or pass ckpt_path=<path to a .ckpt file> "
        "explicitly."
    )


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run: its overrides plus ``ckpt_path=last``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        recorded = HydraConfig.get().overrides
        # The run dir, if the user chose it, is where the checkpoint to resume lives.
        run_dir = [str(o) for o in recorded.hydra if str(o).startswith("hydra.run.dir=")]
        overrides = [str(o) for o in recorded.task] + run_dir
    except Exception:  # outside a Hydra app there are no recorded overrides
        overrides = []
    kept = [o for o in overrides if not o.startswith(("command=", "ckpt_path="))]
    return " ".join(["kdkit", str(cfg.command), *map(shlex.quote, kept)])


def interrupted_message(cfg: DictConfig, stage: str, stage_dir: Path, epoch: int) -> str:
    command = resume_command(cfg)
    if (stage_dir / "checkpoints" / "last.ckpt").is_file():
        return (
            f"interrupted; resume with: {command} ckpt_path=last\n(stage {stage!r} stopped in "
            f"epoch {epoch + 1}; its last complete checkpoint {stage_dir}/checkpoints/last.ckpt "
            "is kept, no model file or report was written)"
        )
    return (
        f"interrupted; stage {stage!r} stopped before its first epoch ended, so there is no "
        f"checkpoint to resume yet: run {command} again (with ckpt_path=last to reuse earlier "
        "stages of `kdkit run`). No model file or report was written."
    )
