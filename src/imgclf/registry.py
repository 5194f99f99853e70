"""The MLflow model registry: evaluated models become versions; the best one is `champion`.

The evaluate stage of the model named by `mlflow.register_model` registers its run's logged
model as a version of `mlflow.registered_name` and tags it with its test accuracy; whether the
alias `champion` moves to it is decided by imgclf.champion on the same test images (`register`
alone keeps its older rule: a strictly higher recorded accuracy). Consumers load
`models:/<registered_name>@champion` and never need a run id or a version number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgclf.errors import ConfigError, TrackingError

if TYPE_CHECKING:  # mlflow takes seconds to import: only stages that log pay for it
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
MODEL_KEY_TAG = "model_key"
DATASET_TAG = "dataset"


@dataclass(frozen=True)
class Registration:
    """What `register` did: the version it used and where the champion alias points now."""

    name: str
    version: str
    test_accuracy: float
    champion: str
    previous_champion: str | None
    previous_accuracy: float | None
    reused: bool  # this logged model was already a version (evaluate ran again on the same model)
    dataset: str | None = None
    previous_dataset: str | None = None

    @property
    def promoted(self) -> bool:
        return self.champion == self.version and self.previous_champion != self.version

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"


def check_target(register_model: str | None, model_names: list[str]) -> None:
    """`mlflow.register_model` must be null or a key under `models` (a typo would otherwise
    register nothing, silently)."""
    if register_model is not None and register_model not in model_names:
        allowed = ", ".join(repr(n) for n in model_names)
        raise ConfigError(f"mlflow.register_model: got {register_model!r}: must be null or one of {allowed}")


def logged_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the model the run logged (the newest, should there be several), or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def _parse_accuracy(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def version_accuracy(client: MlflowClient, version: ModelVersion) -> float | None:
    """A version's test accuracy: its tag, else the `test/accuracy` metric of its run (for a
    version someone registered by hand), else None."""
    accuracy = _parse_accuracy(version.tags.get(ACCURACY_TAG))
    if accuracy is None and version.run_id:
        accuracy = client.get_run(version.run_id).data.metrics.get("test/accuracy")
    return accuracy


def version_dataset(client: MlflowClient, version: ModelVersion) -> str | None:
    """The data set a version was trained and tested on: its tag, else its run's `data.dataset`."""
    dataset = version.tags.get(DATASET_TAG)
    if dataset is None and version.run_id:
        dataset = client.get_run(version.run_id).data.params.get("data.dataset")
    return dataset


def _existing_version(client: MlflowClient, name: str, run_id: str, model_id: str) -> ModelVersion | None:
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        # Some stores leave ModelVersion.model_id empty; the source URI names the model too.
        if version.model_id == model_id or version.source == f"models:/{model_id}":
            return version
    return None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Image classifiers from the imgclf pipeline, each version "
                                                          "tagged with the data set it learned; "
                                                          f"alias '{CHAMPION}' marks the best test accuracy.")
    except MlflowException as exc:
        # Another pipeline (or a queued experiment next to this one) may have created it first.
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def register(run_id: str, model_key: str, name: str, test_accuracy: float,
             client: MlflowClient | None = None, dataset: str | None = None,
             move_alias: bool = True) -> Registration | None:
    """Register the run's logged model as a version of `name` and crown it if it is better.

    The alias moves only on a strictly higher test accuracy than the current champion's, so a
    tie keeps the version that got there first, and only between models of the same data set:
    97% on MNIST does not beat 92% on Fashion-MNIST, it answers another question. Returns None
    (with a warning) when the run has no logged model to register.

    `move_alias=False` registers and tags only, leaving the alias (and the log line) to the
    caller: the evaluate stage decides by imgclf.champion, on the same images.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        model_id = logged_model_id(client, run_id)
        if model_id is None:
            log.warning("%s: run %s has no logged model; nothing registered", model_key, run_id)
            return None
        _ensure_registered_model(client, name)
        tags = {ACCURACY_TAG: repr(float(test_accuracy)), MODEL_KEY_TAG: model_key}
        if dataset is not None:
            tags[DATASET_TAG] = dataset
        version = _existing_version(client, name, run_id, model_id)
        reused = version is not None
        if version is None:
            version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                                  tags=tags, model_id=model_id)
        else:
            for key, value in tags.items():
                client.set_model_version_tag(name, version.version, key, value)
        aliases = client.get_registered_model(name).aliases
        # Stores disagree on whether an alias maps to an int or a str version: use str.
        previous = str(aliases[CHAMPION]) if CHAMPION in aliases else None
        previous_accuracy = previous_dataset = None
        if previous is not None:
            champion = client.get_model_version(name, previous)
            previous_accuracy = version_accuracy(client, champion)
            previous_dataset = version_dataset(client, champion)
        comparable = previous_dataset is None or dataset is None or previous_dataset == dataset
        better = move_alias and (previous is None or (comparable and previous_accuracy is not None
                                                      and test_accuracy > previous_accuracy))
        if better and previous != str(version.version):
            client.set_registered_model_alias(name, CHAMPION, version.version)
    except MlflowException as exc:
        raise TrackingError(f"could not register {model_key} as {name!r}: {exc.message}") from None
    result = Registration(
        name=name, version=str(version.version), test_accuracy=float(test_accuracy),
        champion=str(version.version) if better else (previous or ""), previous_champion=previous,
        previous_accuracy=previous_accuracy, reused=reused, dataset=dataset, previous_dataset=previous_dataset,
    )
    if move_alias:
        log.info("%s", describe(model_key, result))
    return result


def describe(model_key: str, r: Registration) -> str:
    """The one log line that says what registering did."""
    what = "is already" if r.reused else "registered as"
    head = f"{model_key} {what} {r.name} version {r.version} (test/accuracy {r.test_accuracy:.4f})"
    if r.previous_champion is None:
        return f"{head}; it is the first {CHAMPION}"
    if r.champion == r.version and not r.promoted:
        return f"{head}; it stays {CHAMPION}"
    if r.previous_dataset and r.dataset and r.previous_dataset != r.dataset and r.champion != r.version:
        return (f"{head}; {CHAMPION} stays version {r.previous_champion}, a {r.previous_dataset} model: "
                f"accuracies on different data sets do not compare (give {r.dataset} its own "
                "mlflow.registered_name)")
    if r.previous_accuracy is None:
        return (f"{head}; {CHAMPION} stays version {r.previous_champion}, whose test accuracy is unknown "
                f"(move the alias by hand if this one should replace it)")
    before = f"version {r.previous_champion} ({r.previous_accuracy:.4f})"
    if r.promoted:
        return f"{head}; {CHAMPION} moved from {before} to version {r.version}"
    return f"{head}; {CHAMPION} stays {before}, not beaten"
