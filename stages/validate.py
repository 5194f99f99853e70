"""Stage `validate`: check all of params.yaml before any other stage runs.

DVC deletes a stage's outputs just before running it, so a typo found by the train stage
would already have cost the previous model. This stage runs first (download depends on its
output) and stops `dvc repro` with one line while every output is still in place. Its output
never changes, so passing it reruns nothing downstream.
"""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

from imgclf import cli
from imgclf.atomic import write_text
from imgclf.config import MlflowConfig, load_section, read_params, validate_all
from imgclf.crossfield import check_models_fit
from imgclf.paths import PARAMS_CHECKED
from imgclf.registry import check_target


def main() -> None:
    params = read_params()
    names = validate_all(params)
    check_models_fit(params)
    check_target(load_section("mlflow", MlflowConfig, params).register_model, names)
    write_text(PARAMS_CHECKED, "params.yaml passed validation\n")


if __name__ == "__main__":
    cli.run(main)
