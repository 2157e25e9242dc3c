"""README's Layout section matches the tree: every path it names exists, every module is named."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_readme_layout_names_every_module_and_only_existing_paths() -> None:
    block = _layout_block()
    named = set()
    for line in block.splitlines():
        if not line.startswith("src/"):
            continue
        first, second = (line.split() + [""])[:2]
        named.add(first.rstrip("/"))
        if second.endswith(("/", ".py")):  # "data/ models/", "cli.py configs/"
            named.add(f"src/kdkit/{second}".rstrip("/"))
    for path in named:
        assert (ROOT / path).exists(), f"README's Layout names {path}, which does not exist"
    package = ROOT / "src" / "kdkit"
    top_level = {
        f"src/kdkit/{p.name}"
        for p in package.iterdir()
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists() or p.name == "configs")
    }
    top_level -= {"src/kdkit/__init__.py"}
    missing = sorted(top_level - named)
    assert not missing, f"README's Layout does not mention {missing}"
