"""The data flow runs one way (DESIGN.md): a package imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_export"

# module (file or package under vlm_export/) -> packages it must never import, at any depth
FORBIDDEN = {
    "artifacts.py": ("export", "runtime", "targets", "quantize", "diff", "benchmark", "cli"),
    "onnx_wire.py": ("spec", "model", "export", "runtime", "targets", "quantize", "diff", "benchmark", "cli"),
    "spec": ("model", "export", "runtime", "targets", "quantize", "diff", "benchmark", "cli"),
    "export": ("runtime", "targets", "quantize", "diff", "benchmark", "cli"),
    "runtime": ("export", "targets", "quantize", "diff", "benchmark", "cli"),
}


def imported_modules(path: Path) -> set[str]:
    """Every vlm_export module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("vlm_export.")}


def upward_imports() -> list[str]:
    wrong = []
    for owner, banned in FORBIDDEN.items():
        root = PACKAGE / owner
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            for module in imported_modules(path):
                if module.split(".")[1] in banned:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    return wrong


def test_no_import_runs_against_the_data_flow():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "vlm_export"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "loop.py").write_text("def f():\n    from vlm_export.export.pipeline import export_model\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert upward_imports() == ["runtime/loop.py imports vlm_export.export.pipeline"]
