"""Refuse a ``+key=value`` override that no code reads (``+distill.temprature=2``).

Hydra refuses ``key=value`` for a key the config does not have and suggests ``+key=value``;
the ``+`` form is then accepted whatever the key, so a typo trains with the default silently.
After composing, a key added with ``+`` (or ``++``) counts as read when

* it lies inside a node that is instantiated (the node or an ancestor has ``_target_``: the
  constructor takes every key and refuses the ones it does not know),
* it lies under a free-form mapping passed on whole (``teacher.kwargs``, ``student.kwargs``,
  ``distill.terms``),
* or an interpolation somewhere in the config refers to it (``weight: ${distill.my_weight}``).

Anything else is refused, naming the closest existing key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FREE_FORM = ("teacher.kwargs", "student.kwargs", "distill.terms")
_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")


def _leaves(node: DictConfig | ListConfig, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every ``(dotted key, raw value)`` of ``node``, interpolations left unresolved."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for key, _ in items:
        path = f"{prefix}{key}"
        child = node._get_node(key)  # type: ignore[union-attr]
        if isinstance(child, DictConfig | ListConfig) and not child._is_none():
            if child._is_interpolation():
                yield path, child._value()
            else:
                yield from _leaves(child, path + ".")
        else:
            yield path, child._value()  # type: ignore[union-attr]


def _instantiated(cfg: DictConfig, key: str) -> bool:
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        node = OmegaConf.select(cfg, ".".join(parts[:depth]), throw_on_resolution_failure=False)
        if isinstance(node, DictConfig) and "_target_" in node:
            return True
    return False


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _is_group(key: str) -> bool:
    return key.startswith("hydra") or (CONFIG_DIR / key.replace(".", "/")).is_dir()


def unread_keys(cfg: DictConfig, overrides: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(override, closest existing key or None)`` for each added key that nothing reads."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    added = [
        (o.input_line, o.key_or_group)
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if (o.is_add() or o.is_force_add()) and o.package is None and not _is_group(o.key_or_group)
    ]
    if not added:
        return []
    leaves = dict(_leaves(cfg))
    references = {ref for value in leaves.values() if isinstance(value, str)
                  for ref in _REFERENCE.findall(value)}  # fmt: skip
    new_keys = {key for _, key in added}
    known = [k for k in leaves if not any(_under(k, new) for new in new_keys)]
    unread = []
    for line, key in added:
        if (
            _instantiated(cfg, key)
            or any(_under(key, free) for free in FREE_FORM)
            or any(_under(ref, key) or _under(key, ref) for ref in references)
        ):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        unread.append((line, close[0] if close else None))
    return unread


def check_overrides_are_read(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise ``ValueError`` for the first ``+key=value`` that no code reads."""
    unread = unread_keys(cfg, overrides)
    if not unread:
        return
    line, close = unread[0]
    key, _, value = line.lstrip("+").partition("=")
    fix = (
        f"Did you mean {close}? Set it without the '+': {close}={value}."
        if close
        else "Check the spelling against `kdkit <command> --cfg job`."
    )
    raise ValueError(
        f"override {line!r}: no part of kdkit reads {key!r}, so it would be ignored. {fix} "
        "(New keys are read inside a _target_ node, under teacher/student.kwargs or "
        "distill.terms, or where an interpolation such as ${...} refers to them.)"
    )
