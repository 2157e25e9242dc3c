"""Distillation terms from config: the same `_target_: kdkit.Term` files `kdkit distill` reads.

A distill config is a mapping with a ``terms`` mapping (name -> Term config) and any keys its
terms interpolate, e.g. ``${distill.temperature}``; the shipped ones live in
``kdkit/configs/distill/<method>.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from kdkit.capture import pair_layers
from kdkit.term import Term

METHODS_DIR = Path(__file__).resolve().parent / "configs" / "distill"


def shipped_methods() -> list[str]:
    """Names of the distill configs shipped with kdkit (``kd``, ``dkd``, ``at``, ...)."""
    return sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))


def load_distill_config(
    config: str | os.PathLike | Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> DictConfig:
    """A distill config as a node named ``distill`` under a root holding ``context``.

    ``config`` is a shipped method name (``"kd"``), a YAML path, or a mapping. ``context``
    supplies what the terms interpolate outside ``distill``, e.g. the feature methods'
    ``{"student": {"feature_layers": [...]}, "teacher": {"feature_layers": [...]}}``.
    """
    if isinstance(config, Mapping):
        node = OmegaConf.create(dict(config))
    else:
        path = Path(config)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            if str(config) not in shipped_methods():
                raise ValueError(
                    f"distill config {str(config)!r} is neither a YAML file nor a shipped "
                    f"method; shipped methods: {', '.join(shipped_methods())}."
                )
            path = METHODS_DIR / f"{config}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"distill config file {path.resolve()} does not exist.")
        node = _with_defaults(OmegaConf.load(path))
    root = OmegaConf.create({**dict(context or {}), "distill": node})
    return root.distill


def _with_defaults(node: Any) -> Any:
    """Merge what a method file lists in its Hydra ``defaults`` (``/_distill_base@_here_``, the
    block every shipped method shares), which plain OmegaConf does not read."""
    if not isinstance(node, DictConfig) or "defaults" not in node:
        return node
    parts, has_self = [], False
    for entry in node.pop("defaults"):
        if entry == "_self_":
            parts.append(node)
            has_self = True
        else:
            name = str(entry).split("@", 1)[0].lstrip("/")
            parts.append(OmegaConf.load(METHODS_DIR.parent / f"{name}.yaml"))
    return OmegaConf.merge(*parts, *([] if has_self else [node]))


def terms_from_config(distill: DictConfig) -> dict[str, Term]:
    """``distill.terms`` -> ``{name: Term}``, the mapping ``Distiller(terms=...)`` takes.

    Feature terms whose student and teacher are lists of layers are paired with
    :func:`kdkit.capture.pair_layers` (``distill.exclude_first_and_last`` drops the ends).
    A term set to null is left out (``~distill.terms.ce`` or ``distill.terms.ce=null``).
    """
    terms_cfg = distill.get("terms")
    if not isinstance(terms_cfg, DictConfig) or not terms_cfg:
        raise ValueError(
            f"distill={distill.get('method')!r} has no terms; a distill config maps term "
            "names to kdkit.Term configs (see the files in kdkit/configs/distill/)."
        )
    terms: dict[str, Term] = {}
    for name, node in terms_cfg.items():
        if node is None:
            continue
        try:
            term = instantiate(node, _convert_="all")
        except InterpolationKeyError as err:
            raise ValueError(
                f"distill.terms.{name} interpolates a key that is not set "
                f"({str(err).splitlines()[0]}); pass what it needs as context, e.g. "
                "Distiller.from_config(student, teacher, method, context={'student': "
                "{'feature_layers': [...]}, 'teacher': {'feature_layers': [...]}}) (kdkit "
                "distill: student.feature_layers=[...] teacher.feature_layers=[...])."
            ) from None
        if not isinstance(term, Term):
            raise TypeError(
                f"distill.terms.{name} built a {type(term).__name__}; each term needs "
                "_target_: kdkit.Term."
            )
        if isinstance(term.student, list) and isinstance(term.teacher, list):
            if not term.student or not term.teacher:
                raise ValueError(
                    f"distill.terms.{name} reads feature layers but student.feature_layers="
                    f"{term.student} / teacher.feature_layers={term.teacher} is empty; set both "
                    "lists of module paths (kdkit.list_modules(model) lists them)."
                )
            term.student, term.teacher = pair_layers(
                term.student,
                term.teacher,
                exclude_first_and_last=bool(distill.get("exclude_first_and_last", False)),
            )
        terms[str(name)] = term
    return terms
