"""Layout rules of DESIGN.md: no underscore name imported across subpackages, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lipnets"
SHARED_PRIVATE = {
    "lipnets._checks",
    "lipnets._state",
    "lipnets._modes",
    "lipnets._progress",
    "lipnets._version",
}
"""Top-level private helpers that every subpackage may import (DESIGN.md, Layout)."""
MAX_LINES = 560
"""'No module holds more than one idea (a guide: about 500 lines)'."""


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if not node.module.startswith("lipnets"):
                    continue
                names = [a.name for a in node.names]
                found += [(module, node.module, n) for n in names]
    return found


def test_no_underscore_name_is_imported_across_subpackages() -> None:
    bad = []
    for importer, source, name in _imports():
        full = f"{source}.{name}"
        if source in SHARED_PRIVATE or full in SHARED_PRIVATE:
            continue
        private = name.startswith("_") or any(p.startswith("_") for p in source.split("."))
        if private and _package(importer) != _package(source):
            bad.append(f"{importer}: from {source} import {name}")
    assert not bad, "\n".join(bad)


def test_no_module_is_a_god_file() -> None:
    sizes = {
        str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")
    }
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, big


TESTS = Path(__file__).resolve().parent
CROSS_CUTTING = {"soundness", "docs"}
"""Test folders that span every subpackage instead of mirroring one (docs: the examples of
README.md and docs/, and the built site)."""


def test_test_folders_mirror_the_packages() -> None:
    # The tests of lipnets/X live in tests/X/ (the zoo's in tests/zoo/); the package-wide ones
    # (public surface, layout, conformance, the top-level modules) stay in tests/.
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    stray = folders - subpackages - CROSS_CUTTING - {"zoo"}
    assert not stray, f"tests/ folders named after no lipnets subpackage: {sorted(stray)}"
