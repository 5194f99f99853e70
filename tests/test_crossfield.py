"""Cross-field params checks in the validate stage, before DVC deletes anything: every model
must build for the chosen data set's images, and no integer that reaches a library is beyond
what it takes."""

from __future__ import annotations

import copy

import pytest
import yaml

from fixtures import ROOT, make_project
from imgclf.config import validate_all
from imgclf.crossfield import check_models_fit
from imgclf.errors import ConfigError

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _folder(params: dict, size: list[int]) -> None:
    params["download"]["dataset"] = "pets"
    params["datasets"]["pets"] = {"format": "folder", "folder": "data/images/pets", "image_size": size,
                                  "channels": 3}
    params["models"]["cnn"]["channels"] = [8, 8, 8, 8]


def test_the_validate_stage_refuses_a_cnn_too_deep_for_the_images_leaving_outputs(tmp_path):
    project = make_project(tmp_path, lambda p: _folder(p, [8, 8]))
    model = project.path / "models" / "cnn" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"the previous model")
    proc = project.run("python", "stages/validate.py", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: models.cnn: cannot be built for datasets.pets's 8x8 images (4 pooling blocks shrink a 8x8 image "
        "to nothing); use fewer blocks in its channels or a larger image_size"]
    assert model.read_bytes() == b"the previous model"


@pytest.mark.parametrize("size, fits", [([8, 8], False), ([15, 64], False), ([16, 16], True), ([16, 9], False)])
def test_each_cnn_block_halves_the_image(size, fits):
    params = copy.deepcopy(PARAMS)
    _folder(params, size)
    if fits:
        check_models_fit(params)
    else:
        with pytest.raises(ConfigError, match=r"^models.cnn: cannot be built for datasets.pets's "):
            check_models_fit(params)


def test_cifar_shape_is_known_from_its_format():
    params = copy.deepcopy(PARAMS)
    params["download"]["dataset"] = "cifar10"
    params["models"]["cnn"]["channels"] = [8] * 4  # 32 -> 16 -> 8 -> 4 -> 2: fits
    check_models_fit(params)


@pytest.mark.parametrize("key, value", [
    ("train.seed", 2**64), ("preprocess.seed", 2**32), ("train.batch_size", 2**31), ("evaluate.top_misclassified", 2**63),
    ("train.threads", 10**6), ("evaluate.batch_size", 2**40),
])
def test_integers_that_reach_a_library_have_an_upper_bound(key, value):
    params = copy.deepcopy(PARAMS)
    section, field = key.split(".")
    params[section][field] = value
    with pytest.raises(ConfigError) as info:
        validate_all(params)
    assert str(info.value).startswith(f"{key}: got {value}: input should be less than or equal to ")
