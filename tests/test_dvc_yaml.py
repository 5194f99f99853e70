"""dvc.yaml declares exactly the code each stage runs: no missing module (stale outputs after
an edit) and no extra one (needless reruns). Computed from the stage scripts' imports."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """imgclf modules imported anywhere in a file, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("imgclf"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgclf"):
            found.add(node.module)
            # `from imgclf import tracking` imports the submodule imgclf.tracking
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return found


def code_closure(script: Path) -> set[str]:
    files = {script, ROOT / "stages" / "_bootstrap.py"}
    todo = [script]
    while todo:
        for module in _imports(todo.pop()):
            parts = module.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            for i in range(1, len(parts) + 1):
                path = _module_file(".".join(parts[:i]))
                if path is not None and path not in files:
                    files.add(path)
                    todo.append(path)
    return {str(p.relative_to(ROOT)) for p in files}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_exactly_the_code_it_imports(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    script = ROOT / spec["cmd"].split()[1]
    declared = {d for d in spec["deps"] if d.endswith(".py")}
    assert declared == code_closure(script), (
        f"missing: {sorted(code_closure(script) - declared)}, extra: {sorted(declared - code_closure(script))}"
    )
