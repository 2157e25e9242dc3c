"""`kdkit <command> [hydra overrides]`: the whole distillation pipeline from the shell.

Every command composes the same Hydra config tree (shipped in ``kdkit/configs``), so Hydra's
overrides, ``-m`` sweeps, ``--cfg job``, ``--info`` and ``<command> --help`` work as usual::

    kdkit run                                     # digits: teacher, scratch, distilled, report
    kdkit run distill=dkd trainer.max_epochs=5
    kdkit distill -m distill=kd,dkd teacher.checkpoint=runs/digits/<time>/teacher/model.pt

The command travels to Hydra as the override ``command=<name>``; DDP worker processes, which
Lightning starts by re-running this program with its arguments, therefore run the same command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kdkit.pipeline import resolvers  # the configs' ${kdkit.*} resolvers

_SWITCHES = {"-m", "--multirun", "--run", "-r", "--resolve", "--hydra-help", "--version"}
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def _commands() -> dict[str, str]:
    from kdkit.pipeline.run import COMMANDS

    return {name: doc for name, (_, doc) in COMMANDS.items()}


def usage() -> str:
    lines = [
        "usage: kdkit <command> [OVERRIDES...] [-m] [--cfg job] [--help]",
        "",
        "Knowledge distillation for PyTorch: train a teacher, distil a student, compare them.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {doc}" for name, doc in _commands().items()]
    lines += [
        "",
        "`kdkit <command> --help` shows the config groups (data, teacher, student, distill,",
        "trainer, logger, experiment) and every option. Overrides are Hydra's: key=value,",
        "group=option, +new_key=value; -m sweeps comma-separated values.",
        "",
        "example: kdkit run                      (digits, about 20 s on 2 CPU cores)",
    ]
    return "\n".join(lines)


def _task(cfg) -> None:  # noqa: ANN001  (Hydra passes a DictConfig)
    from hydra.errors import InstantiationException

    from kdkit.pipeline.log import get_logger
    from kdkit.pipeline.run import dispatch
    from kdkit.pipeline.stage import StageInterrupted

    log = get_logger("kdkit.cli")
    try:
        dispatch(cfg)
    except StageInterrupted as exc:
        # Ctrl-C: the message is the resume command; 130 is the shell's code for SIGINT.
        log.error("kdkit %s: %s", cfg.command, exc)
        raise SystemExit(130) from exc
    except KeyboardInterrupt as exc:  # outside a fit (data loading, evaluation): no checkpoint
        log.error("kdkit %s: interrupted", cfg.command)
        raise SystemExit(130) from exc
    except (ValueError, FileNotFoundError, InstantiationException) as exc:
        # Our errors name the value and the fix; a traceback would bury that. Hydra wraps the
        # errors of the objects it builds from config (data=, optimizer=): report the cause.
        cause = exc.__cause__ if isinstance(exc, InstantiationException) else exc
        if not isinstance(cause, ValueError | FileNotFoundError):
            raise
        log.error("kdkit %s: %s", cfg.command, cause)
        raise SystemExit(2) from exc


def _quiet_lightning() -> None:
    """Keep Lightning's warnings but drop its start-up chatter (accelerator lines, tips)."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ...but a DDP run still says which processes joined ("MEMBER: 1/2").
    logging.getLogger("lightning.fabric.utilities.distributed").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdkit` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    first, rest = args[0], args[1:]
    command = first.split("=", 1)[1] if first.startswith("command=") else first
    commands = _commands()
    if command not in commands:
        import difflib

        close = difflib.get_close_matches(command, list(commands), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(
            f"kdkit: unknown command {command!r}.{hint} Commands: {', '.join(commands)}. "
            "See `kdkit --help`.",
            file=sys.stderr,
        )
        return 2

    import hydra
    import torch
    from hydra.core.global_hydra import GlobalHydra

    _quiet_lightning()
    resolvers.forget_run_dirs()  # this invocation makes its own run folder
    os.environ["KDKIT_COMMAND_HELP"] = commands[command]
    GlobalHydra.instance().clear()
    saved = sys.argv
    # Lightning's deterministic=True flips a process-wide switch; callers get theirs back.
    deterministic = torch.are_deterministic_algorithms_enabled()
    # argparse cannot take switches between overrides (`kdkit distill a=1 -m b=2,3`): hoist them.
    switches = [a for a in rest if a in _SWITCHES]
    overrides = [a for a in rest if a not in _SWITCHES]
    sys.argv = [saved[0] if saved else "kdkit", *switches, f"command={command}", *overrides]
    try:
        hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_task)()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        torch.use_deterministic_algorithms(deterministic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
