"""Where a champion-and-challenger decision is kept in MLflow, and reading it back.

imgclf.champion writes it (the evaluate stage); the report stage reads it here without
importing the scoring code. The decision lives on the model version (tags `promotion.*`) and
its run (`champion/comparison.json` and `.md`): MLflow state, never a DVC output (dvc.yaml says why).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from imgclf.errors import TrackingError
from imgclf.promotion import TAG_PREFIX

if TYPE_CHECKING:
    from mlflow import MlflowClient

COMPARISON_DIR = "champion"  # run artifacts: comparison.json, comparison.md
# Per version, one line each time it became or stopped being champion, with when and why: the
# registry keeps only an alias's current target, so this is its history (imgclf-trace shows it).
HISTORY_TAG = "champion.history"


def recorded(name: str, run_id: str, client: MlflowClient | None = None) -> dict[str, Any] | None:
    """What evaluate recorded for the version registered from `run_id` (for the report): its
    number, its `promotion.*` tags and the comparison artifact, or None when it is no version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is the stage's log
    client = client or MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as exc:
        raise TrackingError(f"{name}: cannot read its versions ({exc.message})") from None
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    tags = {k: v for k, v in version.tags.items() if k.startswith(TAG_PREFIX)}
    try:
        record = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{COMPARISON_DIR}/comparison.json"))
    except (MlflowException, OSError, ValueError):
        record = None  # no comparison: the first champion, or one of another data set
    # Only the comparison the tags speak of (a later evaluation may have met another champion).
    if record is not None and record.get("champion") != tags.get(f"{TAG_PREFIX}compared_against"):
        record = None
    return {"version": str(version.version), "tags": tags, "record": record}
