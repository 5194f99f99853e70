"""What each stage writes into its MLflow run: params, per-epoch metrics, the model (with its
signature and input example), the data version, test metrics and the report.

imgclf.tracking says where runs live and how a stage finds its run again; this module says
what goes into them. Stages call one function each (train: `training_run`, `log_epoch`,
`log_trained`; evaluate: `log_evaluation`; report: `attach_report`), so the three stages
read alike. mlflow is imported inside the functions: it takes seconds to import.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf import metric_keys, tracking
from imgclf.data.dataset import source_version

if TYPE_CHECKING:
    from mlflow.entities import Run

# An imgclf.engine.EpochRecord; not imported, so the report stage does not depend on the engine.
EpochRecord = Any

log = logging.getLogger(__name__)

# Logged at every epoch: metric name in MLflow -> (part of the EpochRecord, key in it).
EPOCH_METRICS = {
    "train/loss": ("train", "loss"), "train/accuracy": ("train", "accuracy"),
    "val/loss": ("val", "loss"), "val/accuracy": ("val", "accuracy"),
    "train/epoch_seconds": ("train", "seconds"), "train/images_per_s": ("train", "images_per_s"),
}


@dataclass(frozen=True)
class Servable:
    """A trained model as MLflow logs it: the classifier (normalization inside), a few raw
    images as its input example, the code it needs, and what its outputs mean."""

    classifier: Any
    example: Any
    src_dir: Path
    classes: list[str]
    resize: str | None = None
    transparency: str | None = None

    def log(self) -> None:
        log_model(self.classifier, self.example, self.src_dir, self.classes, self.resize, self.transparency)


@contextmanager
def training_run(experiment_id: str, name: str, params: dict[str, Any], meta: dict[str, Any]) -> Iterator[None]:
    """The run of train@<name>: tagged with its provenance, its params and data logged first."""
    import mlflow

    tags = tracking.provenance_tags(name, f"train@{name}")
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags):
        mlflow.log_params(params)
        log_data(meta, "training")
        yield


def log_epoch(record: EpochRecord) -> None:
    import mlflow

    metrics = {key: getattr(record, part)[field] for key, (part, field) in EPOCH_METRICS.items()}
    mlflow.log_metrics({**metrics, "lr": record.lr}, step=record.epoch)


def log_trained(checkpoint_path: Path, model: Servable, record: EpochRecord, train_seconds: float) -> None:
    """The best checkpoint's hash, figures and servable model, into the active training run.

    A failure here is logged, not raised: the model and metrics are already written, and
    losing minutes of training to a tracking hiccup helps nobody. The evaluate stage
    re-attaches the model to a run (`ensure_model_logged`).
    """
    import mlflow

    try:
        # model_md5 is the hash dvc.lock records: it finds the commit that holds this model (imgclf.lineage).
        mlflow.set_tags({"model_sha256": tracking.file_sha256(checkpoint_path), "best_epoch": str(record.epoch),
                         "model_md5": tracking.file_md5(checkpoint_path)})
        mlflow.log_metrics({"best/val_loss": record.val["loss"], "best/val_accuracy": record.val["accuracy"],
                            "train/seconds": train_seconds})
        model.log()
    except Exception as exc:  # noqa: BLE001 - any tracking failure (HTTP, SQL, disk) is handled alike
        log.error("%s: the model is saved at %s, but logging it to MLflow failed (%s); "
                  "`dvc repro` continues and the evaluate stage logs it again",
                  checkpoint_path.parent.name, checkpoint_path, exc)


def log_evaluation(experiment_id: str, name: str, checkpoint_path: Path, model: Servable, meta: dict[str, Any],
                   metrics: dict[str, Any], files: list[Path]) -> str:
    """Test metrics and files into the run that trained this checkpoint (or a new run when the
    model came from DVC's cache); the model too, if that run lacks it. Returns the run id.

    The training run is not reopened when it has its model: its metrics and files are added
    to it as it is, so its duration in the MLflow UI stays the training's own, not training
    plus the wait for the other models and this stage.
    """
    import mlflow

    run = tracking.find_run(experiment_id, tracking.file_sha256(checkpoint_path))
    if run is not None and has_logged_model(experiment_id, run.info.run_id):
        run_id = run.info.run_id
    else:
        with tracking.resume_run(experiment_id, tracking.file_sha256(checkpoint_path), name,
                                 f"evaluate@{name}") as run_id:
            ensure_model_logged(experiment_id, run_id, model)
            # The data this run is judged on (the run that trained the model recorded it already).
            log_data(meta, "evaluation")
    client = mlflow.MlflowClient()
    logged, keys = test_metrics(metrics)
    log_metrics_to(client, run_id, logged)
    client.log_dict(run_id, keys, "evaluation/class_keys.json")
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    return run_id


def test_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The evaluation's MLflow metrics, and the key -> class name mapping the run keeps.

    Class names are folder names: MLflow refuses most punctuation in a key, so each per-class
    key is derived reversibly (imgclf.metric_keys); files a person reads keep the names."""
    per_class = metrics["test/per_class_accuracy"]
    keys = metric_keys.class_keys("test/accuracy", list(per_class))
    logged = {"test/loss": metrics["test/loss"], "test/accuracy": metrics["test/accuracy"],
              **{key: per_class[name] for key, name in keys.items()}}
    return logged, keys


def log_metrics_to(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    """Metrics (step 0) into a run by id, whether it is active or finished."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def runs_of(experiment_id: str, checkpoints: dict[str, Path]) -> dict[str, Run | None]:
    """The run that trained each model file, or None where no run has its hash."""
    return {name: tracking.find_run(experiment_id, tracking.file_sha256(path)) for name, path in checkpoints.items()}


def attach_report(runs: dict[str, Run | None], reports_dir: Path) -> None:
    """The report belongs to every run it compares: attach it to each model's run (by id: the
    runs stay finished, with their own durations)."""
    import mlflow

    client = mlflow.MlflowClient()
    for name, run in runs.items():
        if run is None:
            log.warning("%s: no MLflow run found for its model file; report not attached", name)
            continue
        run_id = run.info.run_id
        client.log_artifact(run_id, str(reports_dir / "report.html"), artifact_path="report")
        client.log_artifact(run_id, str(reports_dir / "report.md"), artifact_path="report")
        client.log_artifacts(run_id, str(reports_dir / "figures"), artifact_path="report/figures")


def _dvc_source(info: dict[str, Any]) -> Any:
    """MLflow's DatasetSource for data that DVC versions: it records where the data came from;
    fetching is DVC's job (`dvc pull`, `dvc import`), not MLflow's."""
    from mlflow.data.dataset_source import DatasetSource

    class Source(DatasetSource):
        def __init__(self, info: dict[str, Any]):
            self._info = info

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, **kwargs: Any) -> Any:
            raise NotImplementedError("fetch the data with `dvc pull` or `dvc import`")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> Source:
            return cls(raw_source)

        def to_dict(self) -> dict[str, Any]:
            return self._info

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> Source:
            return cls(source_dict)

    return Source(info)


def log_data(meta: dict[str, Any], context: str) -> None:
    """Record the run's data with MLflow's dataset tracking (the run's Datasets panel): name,
    digest (the source's version and the processed data's DVC hash), source, and a profile of
    images per class and split."""
    import mlflow
    from mlflow.data.dataset import Dataset

    processed = tracking.data_version()
    profile = {"version": meta.get("version", {}), "processed_dvc_md5": processed,
               "counts": meta.get("counts", {}), "counts_per_class": meta.get("counts_per_class", {}),
               "duplicates": meta.get("duplicates", 0), "skipped": len(meta.get("skipped", [])),
               "blank_images": (meta.get("blank_images") or {}).get("count", 0),
               "near_duplicate_groups_across_splits": (meta.get("near_duplicates") or {}).get("groups_across_splits", 0),
               "near_duplicates_left_out": (meta.get("near_duplicates") or {}).get("left_out", 0)}

    class Data(Dataset):
        def _compute_digest(self) -> str:
            return ""

        @property
        def profile(self) -> dict[str, Any]:
            return profile

        @property
        def schema(self) -> None:
            return None

        def to_dict(self) -> dict[str, str]:
            import json

            return {**super().to_dict(), "profile": json.dumps(profile)}

    # MLflow stores at most 36 characters of digest: both versions, shortened.
    digest = f"{source_version(meta)[1][:17]}-{processed[:18]}"
    data = Data(_dvc_source(meta.get("source", {})), name=str(meta["dataset"]), digest=digest)
    mlflow.log_input(data, context=context)
    mlflow.set_tags({"data_source_version": source_version(meta)[1], "data_version": processed})
    if meta.get("format") == "folder":  # the image-quality counts: searchable across runs
        mlflow.log_metrics({f"data/{key}": float(profile[key]) for key in
                            ("blank_images", "near_duplicate_groups_across_splits", "near_duplicates_left_out")})


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists become their string form."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), value))
        return out
    return {prefix: obj}




def input_example(images: Any) -> Any:
    """A few raw images as MLflow's input example: uint8 (N, C, H, W), what a client sends."""
    import numpy as np

    return np.ascontiguousarray(images[:4])


def log_model(classifier: Any, example: Any, src_dir: Path, classes: list[str] | None = None,
              resize: str | None = None, transparency: str | None = None) -> None:
    """Log the servable model (normalization inside) with its signature and an input example.

    The class names travel in the model's metadata, so a client of `models:/<name>@champion`
    can name what the probability columns mean without the project's files.
    """
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
        metadata={"classes": list(classes or []), "input_shape": list(example.shape[1:]),
                  **({"resize": resize} if resize else {}),
                  **({"transparency": transparency} if transparency else {})},
    )


def has_logged_model(experiment_id: str, run_id: str) -> bool:
    import mlflow

    return bool(mlflow.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    ))


def ensure_model_logged(experiment_id: str, run_id: str, model: Servable) -> None:
    """Log the model to the active run unless that run already has one (it lacks one when the
    model came from DVC's cache or a remote, or when logging failed after training)."""
    if not has_logged_model(experiment_id, run_id):
        log.info("run %s has no logged model yet: logging it", run_id)
        model.log()
