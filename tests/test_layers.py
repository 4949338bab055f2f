"""The layering the README and docs/development.md describe is true: import-linter checks the contracts in
pyproject.toml ([tool.importlinter]) over the installed package, and a planted upward import breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the package under ``src`` with the contracts of ``cwd/pyproject.toml``."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold():
    r = lint(SRC, ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: the data layer importing the quantizer (an arrow up the house) is refused."""
    shutil.copytree(SRC / "outlierfree", tmp_path / "src" / "outlierfree",
                    ignore=shutil.ignore_patterns("released", "__pycache__", "*.cpp"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "src" / "outlierfree" / "data" / "defaults.py"
    planted.write_text(planted.read_text() + "\nfrom ..quant import config as _upward  # noqa: E402,F401\n")
    r = lint(tmp_path / "src", tmp_path)
    assert r.returncode != 0
    assert "outlierfree.data.defaults -> outlierfree.quant.config" in r.stdout


def test_no_module_imports_itself_back():
    """No import cycle anywhere in the package, inside one package included (onnx <-> ort, estimators <->
    quantizer and sites core <-> ops were such): for every direct import a -> b, b has no chain back to a.
    grimp is the graph library import-linter itself uses; imports inside functions count."""
    code = ("import sys, grimp\n"
            "g = grimp.build_graph('outlierfree', cache_dir=None)\n"
            "cycles = sorted({tuple(sorted((a, b))) for a in g.modules for b in g.find_modules_directly_imported_by(a)\n"
            "                 if a != b and g.chain_exists(importer=b, imported=a)})\n"
            "print(cycles)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"import cycles: {r.stdout.strip()}"
