"""The code reads like the codebases we hold up (STYLE.md): no function in the packages runs past
about a screen without a reason written beside it (a ``# long: ...`` comment on one of the three
lines above its ``def`` or its decorators), and ruff's lint and format checks pass."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizer", "kernels", "model", "train", "bench")
MAX_LINES = 60


def long_functions_without_a_reason(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[max(0, first - 4) : first - 1]
        if length > MAX_LINES and not any(line.strip().startswith("# long:") for line in above):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_rule_itself(tmp_path):
    body = "\n".join(f"    x = {i}" for i in range(MAX_LINES))
    (tmp_path / "a.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "b.py").write_text(f"# long: one Triton program\ndef f():\n{body}\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert long_functions_without_a_reason(tmp_path / "a.py") == ["a.py:1 f (61 lines)"]
        assert long_functions_without_a_reason(tmp_path / "b.py") == []
    finally:
        ROOT = root


def test_no_long_function_without_a_reason():
    found = [
        f for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for f in long_functions_without_a_reason(p)
    ]
    assert not found, "functions over a screen with no '# long:' reason:\n" + "\n".join(found)


@pytest.mark.parametrize("check", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(check):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run([ruff, *check], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
