"""Every `dvc exp run -S key=value` that README.md (or docs/) shows changes what it says it changes: some
model's effective config (or the data set), and nothing that the comment beside it excludes;
and the key README shows as refused is refused, with the message README quotes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from imgclf import config
from imgclf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
SHIPPED = config.read_params(ROOT / "params.yaml")
# `dvc exp run [...] -S key=value [...]  # comment`, in README's code blocks.
COMMANDS = sorted({(m.group(1), m.group(2), m.group(3) or "") for m in re.finditer(
    r"dvc exp run[^\n]*?-S ([\w.]+)=([^\s`,]+)[^\n#]*(?:#([^\n]*))?", DOCS)})


def _apply(params: dict, key: str, value: str) -> dict:
    out = copy.deepcopy(params)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)  # how DVC parses -S values
    return out


def _effective(params: dict) -> dict:
    """What each stage would see: every model's merged train config and architecture, the data set."""
    names = config.model_names(params)
    return {"dataset": config.load_dataset_name(params),
            **{n: (config.load_train(n, params).model_dump(), config.load_model(n, params).model_dump(exclude={"train"}))
               for n in names}}


def test_readme_shows_experiments():
    assert len(COMMANDS) >= 4, COMMANDS


@pytest.mark.parametrize(("key", "value", "comment"), COMMANDS)
def test_each_readme_experiment_changes_an_effective_config(key, value, comment):
    params = _apply(SHIPPED, key, value)
    config.validate_all(params)  # the validate stage would pass
    before, after = _effective(SHIPPED), _effective(params)
    changed = {k for k in after if after[k] != before[k]}
    assert changed, f"-S {key}={value} changes no model's effective config"
    only = re.search(r"only (\w+) retrains", comment)
    if only:
        assert changed == {only.group(1)}, changed
    if "every model retrains" in comment:
        assert changed == set(config.model_names(params))


def test_a_shared_key_every_model_overrides_is_refused_as_readme_says():
    quoted = re.search(r"^error: (train\.lr: every model overrides it .*)$", README, re.M).group(1)
    params = _apply(SHIPPED, "train.lr", "0.05")
    with pytest.raises(ConfigError) as info:
        config.validate_all(params)
    assert str(info.value) == quoted
    # Wherever it is written: a bad value in an override fails too, naming where it is.
    bad = _apply(SHIPPED, "models.cnn.train.lr", "-1")
    with pytest.raises(ConfigError, match=r"^models\.cnn\.train\.lr: got -1: input should be greater than 0$"):
        config.validate_all(bad)
