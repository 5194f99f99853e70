"""MLflow: where runs go, how they are tagged, and how later stages find them again.

Run ids never enter DVC-tracked outputs (they differ on every run and would make identical
results look changed). A run is found by the SHA-256 of the model file it produced, which is
a pure function of code, params and data, so evaluate and report can attach to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from imgclf.errors import TrackingError
from imgclf.paths import ROOT, home_root

if TYPE_CHECKING:  # mlflow takes seconds to import: only stages that log pay for it
    from mlflow.entities import Run

log = logging.getLogger(__name__)

# No usage data leaves the machine; set before mlflow is imported anywhere in the process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store (an absolute path, so queued
    `dvc exp run`s executing in a temporary copy still write to the one database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home_root() / 'mlflow.db'}"


def _check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
        ) from None


def setup(experiment: str) -> str:
    """Point MLflow at the store, check it answers, and return the experiment id."""
    import mlflow

    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # Keep artifacts next to the database rather than relative to whatever the CWD is.
        location = (home_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def data_version(output: str = "data/processed") -> str:
    """The DVC hash of an output as dvc.lock records it (what `dvc pull` would fetch)."""
    lock = ROOT / "dvc.lock"
    try:
        stages = yaml.safe_load(lock.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return "unknown"
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == output:
                return str(out.get("md5", "unknown"))
    return "unknown"


def provenance_tags(model_name: str, stage: str) -> dict[str, str]:
    tags = {
        "model_name": model_name,
        "dvc_stage": stage,
        "git_commit": git_commit(),
        "data_version": data_version(),
    }
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc_exp_name"] = exp
    return tags


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists become their string form."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), value))
        return out
    return {prefix: obj}


def file_sha256(path: Path) -> str:
    """The key that links a model file to its MLflow run (tag `model_sha256`)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_run(experiment_id: str, model_sha256: str) -> Run | None:
    """The newest run whose model file has this hash, or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.model_sha256 = '{model_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


@contextmanager
def resume_run(experiment_id: str, model_sha256: str, model_name: str, stage: str) -> Iterator[str]:
    """Reopen the run that trained this model file; start a tagged one if there is none
    (the model came from DVC's cache or a teammate's remote, so no local run exists)."""
    import mlflow

    run = find_run(experiment_id, model_sha256)
    if run is None:
        log.warning("no MLflow run has model_sha256=%s; starting a new run for %s", model_sha256[:12], model_name)
        tags = {**provenance_tags(model_name, stage), "model_sha256": model_sha256}
        with mlflow.start_run(experiment_id=experiment_id, run_name=model_name, tags=tags) as active:
            yield active.info.run_id
        return
    with mlflow.start_run(run_id=run.info.run_id) as active:
        yield active.info.run_id


def log_model(classifier: Any, example: Any, src_dir: Path) -> None:
    """Log the servable model (normalization inside) with its signature and an input example."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        probs = classifier(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, probs)
    mlflow.pytorch.log_model(
        classifier,
        name="model",
        signature=signature,
        input_example=example,
        # Pinned explicitly: inferring requirements would import-scan the environment (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        code_paths=[str(src_dir)],
    )
