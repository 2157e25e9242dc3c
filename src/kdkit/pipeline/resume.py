"""Resuming a stage: which checkpoint ``ckpt_path`` names, whether it belongs to this run, and
the command that resumes an interrupted one.

Every pipeline checkpoint stores the model spec (``checkpoint["kdkit_model"]``) and the
fingerprint of its run (:func:`run_info`, ``checkpoint["kdkit_run"]``); a checkpoint resumes
only the run it belongs to: same model, same fingerprint. ``ckpt_path=last`` reads this run
folder's ``last.ckpt``, never another folder's.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig

from kdkit.pipeline.build import output_dir, to_container
from kdkit.pipeline.log import get_logger

log = get_logger(__name__)

Resume = bool | Literal["optional"]
"""False: start afresh; True: ``ckpt_path`` must match; ``"optional"``: use it if one matches."""


def resume_mode(cfg: DictConfig, *, run_command: bool = False) -> Resume:
    """How the stages of this command resume, from ``ckpt_path``.

    ``kdkit run`` (``run_command``) takes ``ckpt_path=last`` only, and each of its stages
    resumes from its checkpoint in this run folder if it has one.
    """
    value = cfg.ckpt_path
    if value in (None, ""):
        return False
    if not run_command:
        return True
    if str(value) != "last":
        raise ValueError(
            f"`kdkit run` takes ckpt_path=last only (got ckpt_path={value!r}): each of its stages "
            "resumes from its checkpoint in the run folder (hydra.run.dir). To resume one stage "
            "from a file, "
            "use `kdkit train model=... ckpt_path=<file>` or `kdkit distill ... ckpt_path=<file>`."
        )
    return "optional"


# Data options that change how fast a run goes, not what it computes.
_DATA_RUNTIME = ("_target_", "num_workers", "pin_memory", "eval_batch_size", "download")
# A model node's options that do not make the stage's run (the file to load, the epoch budget:
# a longer budget continues the same run).
_MODEL_RUNTIME = ("checkpoint", "max_epochs")
# Trainer options that change the numbers (the others: devices, logging, progress, limits of
# validation and test).
_TRAINER_KEYS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
)


def run_info(
    cfg: DictConfig,
    stage: str,
    role: str,
    *,
    mixup_alpha: float = 0.0,
    teacher: Any = None,
) -> dict[str, Any]:
    """The fingerprint of a stage's run: what a checkpoint must share with a run to be resumed.

    Stored in every checkpoint (``checkpoint["kdkit_run"]``): the seed, the data options, the
    model's options (``role``: teacher | student), optimizer and scheduler, the trainer options
    that change the numbers, and the distillation: the resolved ``distill`` block and
    ``teacher``'s weight hash (a module or an opened teacher cache) for the distilled stage,
    ``mixup_alpha`` for the supervised ones. The epoch budget is not part of it: a longer one
    continues the same run.
    """
    fingerprint: dict[str, Any] = {
        "seed": int(cfg.seed),
        "data": _without(cfg.data, _DATA_RUNTIME),
        role: _without(cfg[role], _MODEL_RUNTIME),
        "optimizer": to_container(cfg.optimizer) if cfg.optimizer else None,
        "scheduler": to_container(cfg.scheduler) if cfg.scheduler else None,
        "trainer": {k: cfg.trainer.get(k) for k in _TRAINER_KEYS},
    }
    if stage == "distilled":
        fingerprint["distill"] = to_container(cfg.distill)
        fingerprint["teacher_weights"] = _teacher_hash(teacher)
    else:
        fingerprint["distill"] = {"mixup_alpha": float(mixup_alpha)}
    return {"stage": stage, "fingerprint": _normal(fingerprint)}


def _without(node: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in to_container(node).items() if k not in keys}


def _teacher_hash(teacher: Any) -> str | None:
    from kdkit.cache import TeacherCache
    from kdkit.cache.fingerprint import fingerprint_teacher

    if teacher is None:
        return None
    if isinstance(teacher, TeacherCache):  # built from the teacher whose weights it names
        return str(teacher.fingerprint["teacher"])
    return fingerprint_teacher(teacher)


def _normal(value: Any) -> Any:
    # Compare configs as JSON: tuples/lists and key order do not matter.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _spec_key(spec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("name", "kwargs", "num_classes", "input_shape")
    return _normal({k: spec.get(k) for k in keys})


def describe_spec(spec: Mapping[str, Any]) -> str:
    kwargs = spec.get("kwargs") or {}
    return f"{spec.get('name')}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, Mapping) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _show(value: Any, absent: bool) -> str:
    text = "absent" if absent else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_difference(theirs: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, one line per setting."""
    a, b = _flat(theirs), _flat(mine)
    lines = []
    method_a, method_b = a.get("distill.method"), b.get("distill.method")
    if method_a != method_b and method_a is not None and method_b is not None:
        # the method's own terms and weights differ along with it: name the cause once
        lines.append(f"it was trained with distill={method_a}, this run uses distill={method_b}")
        a = {k: v for k, v in a.items() if not k.startswith("distill.")}
        b = {k: v for k, v in b.items() if not k.startswith("distill.")}
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, _ABSENT) == b.get(key, _ABSENT):
            continue
        if key == "teacher_weights":
            lines.append(
                f"teacher: other weights (sha256 {str(a.get(key))[:12]} in the checkpoint, "
                f"{str(b.get(key))[:12]} in this run)"
            )
            continue
        lines.append(
            f"{key}: {_show(a.get(key), key not in a)} in the checkpoint, "
            f"{_show(b.get(key), key not in b)} in this run"
        )
    return lines


_ABSENT = object()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ValueError("it cannot be read (truncated or not a torch file)") from exc
    if not isinstance(data, Mapping) or "kdkit_model" not in data:
        raise ValueError("it is not a kdkit checkpoint (no model spec stored in it)")
    return dict(data)


def checkpoint_mismatch(
    path: Path, stage: str, spec: Mapping[str, Any], info: Mapping[str, Any]
) -> tuple[str | None, int | None]:
    """(why ``path`` cannot resume the stage whose model is ``spec`` and whose run is ``info``
    (:func:`run_info`), or None; its completed epochs)."""
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
    saved = data.get("kdkit_run") or {}
    if saved.get("stage", stage) != stage:
        return f"it is a {saved.get('stage')!r} checkpoint, not {stage!r}", epochs
    if "fingerprint" not in saved:
        return (
            "it was written before kdkit stored the run's fingerprint in its checkpoints, so "
            "nothing says it belongs to this run",
            epochs,
        )
    differences = fingerprint_difference(saved["fingerprint"], info["fingerprint"])
    if differences:
        return "it belongs to another run:\n    " + "\n    ".join(differences), epochs
    return None, epochs


def stage_epochs(cfg: DictConfig, stage: str) -> int:
    """The epochs a stage trains for: ``teacher.max_epochs`` (if set) for the teacher."""
    if stage == "teacher" and cfg.teacher.max_epochs:
        return int(cfg.teacher.max_epochs)
    return int(cfg.trainer.max_epochs)


def _announce(path: Path, epochs: int | None, cfg: DictConfig, stage: str) -> None:
    done = "; already complete, reusing it" if epochs and epochs >= stage_epochs(cfg, stage) else ""
    log.info("resuming from %s (epoch %s%s)", _shown(path), epochs, done)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (as the user typed it)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


FRESH = (
    "To start afresh, drop ckpt_path (and hydra.run.dir, so that a new run folder is made); "
    "to resume that run, pass the settings it was trained with (the values 'in the "
    "checkpoint')."
)


def resolve_ckpt_path(
    cfg: DictConfig,
    stage: str,
    spec: Mapping[str, Any],
    info: Mapping[str, Any],
    *,
    required: bool = True,
) -> Path | None:
    """``ckpt_path``: None, a file, or ``last``: the ``<stage>/checkpoints/last.ckpt`` of this
    run folder, never another folder's (the resume command names the folder:
    ``hydra.run.dir=...``).

    The checkpoint must hold this model (``spec``) and belong to this run (``info``, the
    fingerprint of :func:`run_info`), else a ValueError says what differs and how to start
    afresh. With ``required=False`` (``kdkit run``: a stage that never started) a missing
    ``last.ckpt`` means None; else a FileNotFoundError names the run folders whose checkpoint
    would match.
    """
    value = cfg.ckpt_path
    if value in (None, ""):
        return None
    if str(value) == "last":
        path = output_dir(cfg) / stage / "checkpoints" / "last.ckpt"
        if not path.is_file():
            if not required:
                return None
            raise FileNotFoundError(_nothing_here(cfg, stage, spec, info))
    else:
        path = Path(str(value))
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={value!r} does not exist; pass a .ckpt file, or ckpt_path=last with "
                "hydra.run.dir=<the run folder> to resume an interrupted run."
            )
    why, epochs = checkpoint_mismatch(path, stage, spec, info)
    if why is not None:
        raise ValueError(
            f"ckpt_path={value}: {_shown(path)} cannot resume stage {stage!r}: {why}\n{FRESH}"
        )
    _announce(path, epochs, cfg, stage)
    return path


def _nothing_here(
    cfg: DictConfig, stage: str, spec: Mapping[str, Any], info: Mapping[str, Any]
) -> str:
    tail = Path(stage) / "checkpoints" / "last.ckpt"
    here = output_dir(cfg)
    others = sorted(
        glob.glob(os.path.join("runs", str(cfg.experiment_name), "*", str(tail))),
        key=os.path.getmtime,
        reverse=True,
    )
    matching = [
        Path(f).parents[2]
        for f in others
        if checkpoint_mismatch(Path(f), stage, spec, info)[0] is None
    ]
    text = (
        f"ckpt_path=last: no {tail} in this run folder {_shown(here)}, nothing to resume. "
        "ckpt_path=last resumes the run folder named by hydra.run.dir (the command printed on "
        "Ctrl-C names it)"
    )
    if matching:
        folders = ", ".join(f"hydra.run.dir={_shown(p)}" for p in matching[:3])
        return f"{text}; these run folders hold a matching checkpoint: {folders}."
    return f"{text}; drop ckpt_path to start afresh."


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run: its overrides and its run folder
    (``hydra.run.dir=...``, where its checkpoints are), to be followed by ``ckpt_path=last``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # outside a Hydra app there are no recorded overrides
        overrides = []
    kept = [o for o in overrides if not o.startswith(("command=", "ckpt_path="))]
    kept.append(f"hydra.run.dir={output_dir(cfg)}")
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
