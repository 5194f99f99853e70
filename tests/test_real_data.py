"""One end-to-end run on the real Fashion-MNIST, shrunk to seconds of training.

The data comes through the configured mirrors (Debian's local copy first, as in `make repro`),
and the accuracy floors are far above chance (10%) but reachable in one or two epochs.
"""

import json

import pytest

from fixtures import make_project, set_params

pytestmark = pytest.mark.slow

FLOORS = {"mlp": 0.82, "cnn": 0.85}


def test_real_fashion_mnist_reduced_config(tmp_path):
    def reduce(params):
        params["train"].update(epochs=1, batch_size=128, lr=0.1)
        params["models"] = {
            "mlp": {"arch": "mlp", "hidden": [128], "train": {"epochs": 2, "augment": False, "lr": 0.05}},
            "cnn": {"arch": "cnn", "channels": [16, 32], "hidden": 64, "dropout": 0.1},
        }

    project = make_project(tmp_path, reduce)
    assert project.repro() == {"validate", "download", "preprocess", "train@mlp", "train@cnn",
                               "evaluate@mlp", "evaluate@cnn", "report"}
    meta = json.loads((project.path / "data/processed/meta.json").read_text())
    assert meta["counts"] == {"train": 54000, "val": 6000, "test": 10000}
    assert meta["classes"][0] == "T-shirt/top" and meta["shape"] == [1, 28, 28]
    for name, floor in FLOORS.items():
        test = json.loads((project.path / f"metrics/{name}/test.json").read_text())
        assert test["test/images"] == 10000
        assert test["test/accuracy"] >= floor, (name, test["test/accuracy"])

    # The same images as an image folder (PNG files in class folders, written from the local
    # copy): the folder path reaches the IDX path's accuracy, here for the MLP, whose result
    # moves least with the split (the folder's validation split is drawn by content hash).
    idx_mlp = json.loads((project.path / "metrics/mlp/test.json").read_text())["test/accuracy"]
    project.run("python", "-m", "imgclf.data.sample", "--all")
    def folder_mlp_only(params):
        params["download"].update(dataset="fashion_png")
        del params["models"]["cnn"]
        # The same effective config; with one model left, its overrides must live in `train`.
        params["train"].update(params["models"]["mlp"].pop("train"))
        params["mlflow"].update(register_model=None)

    set_params(project.path, folder_mlp_only)
    assert project.repro() == {"validate", "download", "preprocess", "train@mlp", "evaluate@mlp", "report"}
    meta = json.loads((project.path / "data/processed/meta.json").read_text())
    assert meta["counts"]["test"] == 10000 and meta["counts"]["train"] + meta["counts"]["val"] == 60000
    folder_mlp = json.loads((project.path / "metrics/mlp/test.json").read_text())["test/accuracy"]
    assert abs(folder_mlp - idx_mlp) < 0.01, (folder_mlp, idx_mlp)
