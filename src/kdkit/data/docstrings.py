"""A labelled text set every Python install has: the standard library's docstrings, labelled by
the package they come from.

:data:`PACKAGES` is a fixed list of eight standard library packages that every CPython from
3.10 to 3.14 ships and that no distribution splits off (unlike ``tkinter``, ``idlelib`` or
``test``); their modules are parsed with :mod:`ast` (never imported) and every module, class and
function docstring of at least :data:`MIN_CHARS` characters is one sample, its label the package
(``asyncio``, ``email``, ...). Tests inside a package (a ``test``/``tests`` folder) are left out.
A docstring text found in two packages is dropped (it would be a sample with two labels); one
found twice in a package is kept once.

The split is a pure function of the text (:func:`split_of`: a hash, 70/15/15 train/val/test),
so identical texts never straddle splits and adding a docstring never moves another. The texts
differ between Python versions, so the set is identified by the sha256 of its samples and the
Python version: record :meth:`DocstringSet.describe` with a result.

    docs = load_docstrings()
    len(docs.train), docs.train[0].label, docs.describe()["sha256"]
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MIN_CHARS",
    "PACKAGES",
    "Docstring",
    "DocstringSet",
    "documented_nodes",
    "load_docstrings",
    "split_of",
]

PACKAGES: tuple[str, ...] = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
)
MIN_CHARS = 20
SPLITS = ("train", "val", "test")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Docstring:
    """One sample: the docstring's text (as :func:`ast.get_docstring` cleans it), the index of
    its package in the set's ``packages`` and where it was found."""

    text: str
    label: int
    source: str


@dataclass(frozen=True)
class DocstringSet:
    """The samples of each split (sorted by text) and what identifies them."""

    train: tuple[Docstring, ...]
    val: tuple[Docstring, ...]
    test: tuple[Docstring, ...]
    packages: tuple[str, ...]
    sha256: str
    python_version: str

    def split(self, name: str) -> tuple[Docstring, ...]:
        if name not in SPLITS:
            raise ValueError(f"DocstringSet: split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def describe(self) -> dict:
        """What to record with a result: sha256, Python version, samples per split and class."""
        return {
            "dataset": "python-stdlib-docstrings",
            "packages": list(self.packages),
            "sha256": self.sha256,
            "python_version": self.python_version,
            "samples": {s: len(self.split(s)) for s in SPLITS},
            "note": "docstrings differ between Python versions; compare results only at the "
            "same sha256",
        }


def split_of(text: str) -> str:
    """``train`` (70%), ``val`` (15%) or ``test`` (15%): the first 8 hex digits of the text's
    sha256, modulo 20."""
    bucket = int(hashlib.sha256(f"kdkit-docstrings:{text}".encode()).hexdigest()[:8], 16) % 20
    return "val" if bucket < 3 else "test" if bucket < 6 else "train"


def _package_docstrings(directory: Path, root: Path) -> dict[str, str]:
    """``{text: source}`` of one package's docstrings (first source of a repeated text)."""
    found: dict[str, str] = {}
    for file in sorted(directory.rglob("*.py")):
        relative = file.relative_to(root)
        if {"test", "tests"} & set(relative.parts[1:-1]):
            continue
        source = file.read_bytes().replace(b"\r\n", b"\n").decode("utf-8")
        for node in documented_nodes(ast.parse(source, filename=str(relative))):
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_CHARS:
                where = f"{relative.as_posix()}:{getattr(node, 'name', '<module>')}"
                found.setdefault(text, where)
    return found


def documented_nodes(tree: ast.Module) -> list[ast.AST]:
    """The module and every class and function of a parsed file, at any depth (also those
    defined under ``if``, ``try`` / ``except`` or a ``match`` case), in the order of the file."""
    nodes = [node for node in ast.walk(tree) if isinstance(node, _DOCUMENTED)]
    return sorted(nodes, key=lambda node: getattr(node, "lineno", 0))  # the module has none


def load_docstrings(
    stdlib_dir: str | Path | None = None, packages: tuple[str, ...] = PACKAGES
) -> DocstringSet:
    """Parse the docstrings of ``packages`` under ``stdlib_dir`` (default: this Python's
    standard library).

    Raises FileNotFoundError naming the missing packages (a stripped Python installation):
    point ``stdlib_dir`` at a complete CPython ``Lib/`` directory.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    missing = [p for p in packages if not (root / p / "__init__.py").is_file()]
    if missing:
        raise FileNotFoundError(
            f"load_docstrings: standard library package(s) {missing} not found under {root} "
            f"(Python {platform.python_version()}); this installation lacks part of the "
            "standard library: pass stdlib_dir= pointing at a complete CPython Lib/ directory"
        )
    per_package = [_package_docstrings(root / p, root) for p in packages]
    owners: dict[str, int] = {}
    for label, texts in enumerate(per_package):
        for text in texts:
            owners[text] = -1 if text in owners else label
    samples = sorted(
        (Docstring(text, label, per_package[label][text]) for text, label in owners.items()
         if label >= 0),
        key=lambda d: d.text,
    )  # fmt: skip
    digest = hashlib.sha256()
    for d in samples:
        digest.update(f"{d.label}\0{len(d.text)}\0{d.text}".encode())
    splits: dict[str, list[Docstring]] = {s: [] for s in SPLITS}
    for d in samples:
        splits[split_of(d.text)].append(d)
    return DocstringSet(
        train=tuple(splits["train"]),
        val=tuple(splits["val"]),
        test=tuple(splits["test"]),
        packages=tuple(packages),
        sha256=digest.hexdigest(),
        python_version=platform.python_version(),
    )
