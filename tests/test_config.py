"""params.yaml validation: every mistake is one line naming the key, the value and the rule."""

from pathlib import Path

import pytest
import yaml

from imgclf import config
from imgclf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid(params):
    assert config.load_section("download", config.DownloadConfig, params).dataset == "fashion_mnist"
    assert config.load_section("preprocess", config.PreprocessConfig, params).val_fraction == 0.1
    for name in config.model_names(params):
        assert config.load_train(name, params).epochs > 0
        assert config.load_model(name, params).arch in ("mlp", "cnn")
    config.load_section("evaluate", config.EvaluateConfig, params)
    config.load_section("report", config.ReportConfig, params)
    config.load_section("mlflow", config.MlflowConfig, params)


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_closest_valid_one(params):
    params["train"]["weight_decy"] = 0.1
    msg = _error(config.load_train, "cnn", params)
    assert msg.startswith("train.weight_decy: unknown key")
    assert "did you mean 'weight_decay'" in msg


def test_wrong_type_is_rejected_not_coerced(params):
    params["train"]["lr"] = "0.1"  # what a quoted `-S train.lr='0.1'` would give
    msg = _error(config.load_train, "cnn", params)
    assert msg.startswith("train.lr: got '0.1'")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("preprocess", "val_fraction", 1.5),
        ("preprocess", "val_fraction", 0.0),
        ("train", "epochs", 0),
        ("train", "lr", -0.01),
        ("train", "batch_size", 2.5),
        ("train", "optimizer", "rmsprop"),
        ("train", "loss", "hinge"),
        ("train", "lr", float("nan")),
    ],
)
def test_out_of_range_values_name_key_and_value(params, section, key, value):
    params[section][key] = value
    if section == "train":
        msg = _error(config.load_train, "cnn", params)
    else:
        msg = _error(config.load_section, section, config.PreprocessConfig, params)
    assert msg.startswith(f"{section}.{key}: got ")


def test_per_model_train_override_applies_to_that_model_only(params):
    params["models"]["mlp"]["train"] = {"epochs": 3}
    assert config.load_train("mlp", params).epochs == 3
    assert config.load_train("cnn", params).epochs == params["train"]["epochs"]


def test_bad_per_model_override_is_reported_under_the_model(params):
    params["models"]["mlp"]["train"] = {"epochs": -1}
    assert _error(config.load_train, "mlp", params).startswith("models.mlp.train.epochs: got -1")


def test_unknown_architecture_lists_the_allowed_ones(params):
    params["models"]["cnn"]["arch"] = "transformer"
    assert _error(config.load_model, "cnn", params) == (
        "models.cnn.arch: got 'transformer': must be one of 'mlp', 'cnn'"
    )


def test_architecture_specific_unknown_key(params):
    params["models"]["mlp"]["channels"] = [8]
    msg = _error(config.load_model, "mlp", params)
    assert msg.startswith("models.mlp.channels: unknown key")


def test_missing_section_suggests_the_typo(params):
    params["evalute"] = params.pop("evaluate")
    msg = _error(config.load_section, "evaluate", config.EvaluateConfig, params)
    assert "missing section 'evaluate'" in msg and "did you mean 'evalute'" in msg


def test_empty_mirror_list_and_bad_checksum(params):
    params["download"]["mirrors"] = []
    assert _error(config.load_section, "download", config.DownloadConfig, params).startswith("download.mirrors: got []")
    params["download"]["mirrors"] = ["ftp://example.org/"]
    assert "must start with file://" in _error(config.load_section, "download", config.DownloadConfig, params)


def test_params_file_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    assert _error(config.read_params, bad) == "params.yaml: expected a mapping of sections, got list"
    bad.write_text("train: {lr: [unclosed\n")
    assert _error(config.read_params, bad).startswith("params.yaml: not valid YAML at line")


def test_unknown_dataset(params):
    params["download"]["dataset"] = "imagenet"
    assert _error(config.load_dataset_name, params) == "download.dataset: got 'imagenet': must be one of 'fashion_mnist'"
