"""What README.md shows a newcomer exists: every `make` target, console command, `python -m`
module and linked page it names (the `dvc exp run -S` examples are checked for their effect
in test_readme_params.py; the workflows themselves by the end-to-end tests docs/testing.md lists)."""

import importlib
import importlib.util
import re

from fixtures import ROOT

README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
# [project.scripts]: name = "module:function"
SCRIPTS = dict(re.findall(r'^(imgclf-[a-z-]+) = "([\w.:]+)"', (ROOT / "pyproject.toml").read_text(), re.M))


def test_every_make_target_readme_names_exists():
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    defined = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
    assert {"repro", "test", "test-fast", "lint", "mlflow-ui"} <= named  # the page is what we think it is
    assert named <= defined, named - defined


def test_every_command_and_module_readme_names_is_installed():
    commands = set(re.findall(r"\b(imgclf-[a-z-]+)", README))
    assert {"imgclf-predict", "imgclf-champion", "imgclf-trace", "imgclf-data-diff"} <= commands
    assert commands <= set(SCRIPTS), commands - set(SCRIPTS)
    for target in SCRIPTS.values():
        module, function = target.split(":")
        assert hasattr(importlib.import_module(module), function), target
    modules = set(re.findall(r"python -m (imgclf[\w.]*)", README))
    assert all(importlib.util.find_spec(m) for m in modules), modules


def test_every_page_readme_links_exists():
    links = set(re.findall(r"\]\(((?:docs/)[^)#]+)", README))
    assert "docs/champion.md" in links
    assert all((ROOT / link).is_file() for link in links), [link for link in links if not (ROOT / link).is_file()]
