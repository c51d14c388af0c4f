"""Imports point down: ``tokenizer``, ``kernels`` <- ``model`` <- ``train`` <- ``bench``.

Every module of every package is parsed (not imported) and each import of a project package, at
module level or inside a function, must name the package itself or one below it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import those of a lower rank; tokenizer and kernels share the bottom and are
# independent of each other.
RANK = {"tokenizer": 0, "kernels": 0, "model": 1, "train": 2, "bench": 3}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project package in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in RANK]
    return found


def allowed(importer: str, imported: str) -> bool:
    return imported == importer or RANK[imported] < RANK[importer]


def test_rule_itself():
    assert allowed("train", "model") and allowed("bench", "train") and allowed("model", "kernels")
    assert not allowed("train", "bench") and not allowed("model", "train") and not allowed("kernels", "tokenizer")


@pytest.mark.parametrize("package", sorted(RANK))
def test_imports_point_down(package):
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, target in project_imports(path)
        if not allowed(package, target)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_sys_path_edits():
    edits = [
        str(p.relative_to(ROOT))
        for d in [*RANK, "tests"]
        for p in (ROOT / d).rglob("*.py")
        if p.name != Path(__file__).name and any(f"sys.path.{op}" in p.read_text() for op in ("insert", "append"))
    ]
    assert not edits, edits
