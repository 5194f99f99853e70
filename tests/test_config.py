"""params.yaml validation: every mistake is one line naming the key, the value and the rule."""

from pathlib import Path

import pytest
import yaml

from imgclf import config
from imgclf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    """The shipped params, with `models.cnn.train` moved into `train`: the tests below check the
    shared `train` section through the cnn, so no per-model override may hide a value they set."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped["train"].update(shipped["models"]["cnn"].pop("train", {}))
    return shipped


def test_shipped_params_are_valid():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # as shipped, overrides included
    assert config.load_section("download", config.DownloadConfig, params).dataset == "fashion_mnist"
    for name in params["datasets"]:
        ds = config.load_dataset(name, params)
        assert ds.mirrors or ds.folder
    assert config.validate_all(params) == config.model_names(params)
    assert config.load_section("preprocess", config.PreprocessConfig, params).val_fraction == 0.1
    for name in config.model_names(params):
        assert config.load_train(name, params).epochs > 0
        assert config.load_model(name, params).arch in config.ARCHITECTURES
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


# Every registered architecture, as the error lists them ('mlp', 'cnn', ... in definition order).
ALLOWED_ARCHS = ", ".join(map(repr, config.ARCHITECTURES))


def test_unknown_architecture_lists_the_allowed_ones(params):
    params["models"]["cnn"]["arch"] = "transformer"
    assert {"mlp", "cnn"} <= set(config.ARCHITECTURES)
    assert _error(config.load_model, "cnn", params) == (
        f"models.cnn.arch: got 'transformer': must be one of {ALLOWED_ARCHS}"
    )


def test_an_architecture_given_as_a_list_is_a_one_line_error(params):
    params["models"]["cnn"]["arch"] = ["cnn"]  # unhashable: the lookup must not crash
    assert _error(config.load_model, "cnn", params) == (
        f"models.cnn.arch: got ['cnn']: must be one of {ALLOWED_ARCHS}"
    )


def test_architecture_specific_unknown_key(params):
    params["models"]["mlp"]["channels"] = [8]
    msg = _error(config.load_model, "mlp", params)
    assert msg.startswith("models.mlp.channels: unknown key")


def test_missing_section_suggests_the_typo(params):
    params["evalute"] = params.pop("evaluate")
    msg = _error(config.load_section, "evaluate", config.EvaluateConfig, params)
    assert "missing section 'evaluate'" in msg and "did you mean 'evalute'" in msg


def test_empty_mirror_list_and_bad_scheme(params):
    params["datasets"]["mnist"]["mirrors"] = []
    assert _error(config.load_dataset, "mnist", params).startswith("datasets.mnist.mirrors: got []")
    params["datasets"]["mnist"]["mirrors"] = ["ftp://example.org/"]
    assert "must start with file://" in _error(config.load_dataset, "mnist", params)


@pytest.mark.parametrize("checksum", ["md5:F68B3C2DCBEAAA9FBDD348BBDEB94873", "md5:f68b3c", "sha1:" + "0" * 40,
                                      "0" * 63, "md5:" + "0" * 64])
def test_bad_checksum_names_key_value_and_both_forms(params, checksum):
    params["datasets"]["cifar10"]["files"]["cifar-10-binary.tar.gz"] = checksum
    msg = _error(config.load_dataset, "cifar10", params)
    assert msg.startswith(f"datasets.cifar10.files.cifar-10-binary.tar.gz: got {checksum!r}: ")
    assert "64 lowercase hex digits" in msg and "md5:<32 lowercase hex digits>" in msg


def test_both_checksum_forms_are_accepted(params):
    files = config.load_dataset("fashion_mnist", params).files
    assert all(len(c) == 64 for c in files.values())
    assert config.load_dataset("cifar10", params).files == {"cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530"}


@pytest.mark.parametrize(("name", "problem"), [("../x.gz", "is not a plain file name"),
                                               (".hidden", "is not a plain file name")])
def test_file_names_are_checked_in_params(params, name, problem):
    params["datasets"]["mnist"]["files"][name] = "md5:" + "0" * 32
    msg = _error(config.load_dataset, "mnist", params)
    assert msg.startswith("datasets.mnist: files: ") and problem in msg


def test_two_files_stored_under_one_name_are_refused(params):
    params["datasets"]["mnist"]["files"]["t10k-labels-idx1-ubyte"] = "0" * 64
    msg = _error(config.load_dataset, "mnist", params)
    assert msg == ("datasets.mnist: files: 't10k-labels-idx1-ubyte.gz' and 't10k-labels-idx1-ubyte' would both "
                   "be stored as 't10k-labels-idx1-ubyte'")


def test_mirror_credentials_are_refused_and_masked(params):
    params["datasets"]["mnist"]["mirrors"].append("https://deploy:" + "hunter2-pw" + "@example.org/mnist/")
    msg = _error(config.load_dataset, "mnist", params)
    assert msg == ("datasets.mnist: mirrors[2] 'https://***@example.org/mnist/' contains a user name or "
                   "password; mirrors must not need credentials")


def test_validate_all_checks_every_data_set_entry_not_only_the_chosen_one(params):
    assert params["download"]["dataset"] == "fashion_mnist"
    params["datasets"]["cifar10"]["files"]["cifar-10-binary.tar.gz"] = "c32a1d4ab5d03f1284b67883e8d87530"
    assert _error(config.validate_all, params).startswith("datasets.cifar10.files.cifar-10-binary.tar.gz: got ")


def test_validate_all_names_an_unusable_or_missing_data_set_entry(params):
    params["datasets"]["my photos"] = params["datasets"]["fashion_png"]
    assert _error(config.validate_all, params).startswith("datasets.my photos: not a usable data set name")
    del params["datasets"]["my photos"]
    params["download"]["dataset"] = "mnist"
    del params["datasets"]["mnist"]
    assert _error(config.validate_all, params) == (
        "download.dataset: got 'mnist': must be a key of datasets (fashion_mnist, cifar10, fashion_png)")


def test_old_download_layout_points_to_datasets(params):
    params["download"]["mirrors"] = ["https://example.org/"]
    assert _error(config.load_section, "download", config.DownloadConfig, params) == (
        "download: mirrors moved to datasets.<name>, one entry per data set (see docs/datasets.md)")
    del params["download"]["mirrors"]
    params["download"]["colour"] = "red"
    assert _error(config.load_section, "download", config.DownloadConfig, params) == (
        "download.colour: unknown key (allowed: dataset, retries, timeout_s)")


def test_old_eval_batch_size_points_to_evaluate_batch_size(params):
    moved = ("eval_batch_size moved to evaluate.batch_size (one batch size for the validation after each "
             "epoch and for the evaluate stage)")
    params["train"]["eval_batch_size"] = 500
    assert _error(config.load_train, "mlp", params) == f"train: {moved}"
    del params["train"]["eval_batch_size"]
    params["models"]["mlp"]["train"] = {"eval_batch_size": 500}
    assert _error(config.load_train, "mlp", params) == f"models.mlp.train: {moved}"
    assert config.load_train("cnn", params).batch_size > 0  # the other model is unaffected


def test_params_file_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    assert _error(config.read_params, bad) == "params.yaml: expected a mapping of sections, got list"
    bad.write_text("train: {lr: [unclosed\n")
    assert _error(config.read_params, bad).startswith("params.yaml: not valid YAML at line")


def test_unknown_dataset(params):
    params["download"]["dataset"] = "imagenet"
    assert _error(config.load_dataset_name, params) == (
        "download.dataset: got 'imagenet': must be a key of datasets (fashion_mnist, mnist, cifar10, fashion_png)")
    params["download"]["dataset"] = "../imagenet"
    assert _error(config.load_section, "download", config.DownloadConfig, params).startswith(
        "download.dataset: got '../imagenet': must be a key of `datasets`")
