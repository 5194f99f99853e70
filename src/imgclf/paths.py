"""Every path the pipeline uses, derived from the project root, never from the CWD.

The files inside models/<name>/ and metrics/<name>/ are named in imgclf.schema (ModelFiles).
"""

from __future__ import annotations

import os
from pathlib import Path

# src/imgclf/paths.py -> project root. Stages import the library from their own checkout
# (see stages/_bootstrap.py), so under `dvc exp run --temp` this is the temporary copy.
ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / "params.yaml"
# The library itself: logged with every model (MLflow code_paths), so it loads without this repo.
SRC_DIR = ROOT / "src" / "imgclf"

# Written by the validate stage; constant content, so it reruns nothing downstream.
PARAMS_CHECKED = ROOT / "data" / "params-checked"
RAW_DIR = ROOT / "data" / "raw"
PROCESSED_DIR = ROOT / "data" / "processed"
MODELS_DIR = ROOT / "models"
METRICS_DIR = ROOT / "metrics"
REPORTS_DIR = ROOT / "reports"


def home_root() -> Path:
    """The user's checkout, also when DVC runs a queued experiment in a temporary copy.

    `dvc exp run --queue/--temp` copies the repo to <repo>/.dvc/tmp/exps/<tmp>/ and runs there;
    MLflow runs must still land in the project's one store, so we climb out of that copy.
    """
    override = os.environ.get("IMGCLF_HOME")
    if override:
        return Path(override).resolve()
    parts = ROOT.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return ROOT
