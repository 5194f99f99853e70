"""dvc.yaml declares exactly the code each stage runs: no missing module (stale outputs after
an edit) and no extra one (needless reruns). Computed from the stage scripts' imports."""

import ast
from pathlib import Path

import pytest
import yaml

from imgclf.schema import HISTORY, HISTORY_COLUMNS, OUTPUTS, PREDICTION_COLUMNS, dvc_plots

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


# --- each model's files: dvc.yaml declares what imgclf.schema names ----------------------------

def _declared_paths(entries: list) -> list[str]:
    # An entry is a path, or a one-key mapping of a path to its flags (cache: false, ...).
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_per_model_stage_declares_exactly_the_files_the_schema_names(stage):
    spec = STAGES[stage]["do"]
    for kind in ("outs", "metrics", "plots"):
        expected = [o.dvc_path() for o in OUTPUTS if o.stage == stage and o.declared == kind]
        assert sorted(_declared_paths(spec.get(kind, []))) == sorted(expected), f"{stage} {kind}"
    # Metrics and plots are git-tracked, so `dvc metrics diff` needs no pull.
    for entry in spec.get("metrics", []) + spec.get("plots", []):
        assert isinstance(entry, dict) and next(iter(entry.values())) == {"cache": False}, entry


def test_every_schema_file_is_declared_by_a_stage_that_exists():
    assert {o.stage for o in OUTPUTS} <= set(STAGES)
    assert len({(o.under_models, o.file) for o in OUTPUTS}) == len(OUTPUTS)  # no file named twice


# --- `dvc plots`: the curves and confusion matrix of every model under `models` -----------------

def test_top_level_plots_follow_the_models_keys():
    models = list(yaml.safe_load((ROOT / "params.yaml").read_text())["models"])
    expected = dvc_plots(models)
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] == expected, (
        "dvc.yaml's top-level plots must draw exactly the models under `models`:\n"
        + yaml.safe_dump({"plots": expected}, sort_keys=False))


def test_plots_draw_columns_the_files_have():
    for entry in dvc_plots(["m"]):
        (spec,) = entry.values()
        (path, y), = spec["y"].items()
        columns = HISTORY_COLUMNS if path.endswith(HISTORY) else PREDICTION_COLUMNS
        assert {spec["x"], *([y] if isinstance(y, str) else y)} <= set(columns), entry
