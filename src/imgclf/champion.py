"""The champion and its challengers in the MLflow registry: a newly registered version replaces
the served one (alias `champion`) only on evidence, measured on the same images.

The evaluate stage of the registered model calls `challenge`: the current champion is loaded
as serving loads it (`models:/<name>/<version>`, its own resizing and normalization) and scored
on exactly today's test images; where the champion trained on some of them (its training
manifest, recorded with every version, says so), those are left out. imgclf.promotion compares
and decides; the decision goes on the version (tags `promotion.*`), onto the run
(`champion/comparison.json` and `.md`) and into one log line. The alias moves under a lock and
only if it still points where it pointed when the comparison began. Then `record_card` writes
the version's model card (imgclf.modelcard), decision included, keyed the same way.

The champion is state outside the DVC graph, so nothing here is a DVC output: the decision is
an MLflow record keyed by (version, champion version, test images), never a file DVC's run
cache could restore after the champion has changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf import modelcard, promotion, registry, tracking
from imgclf.champion_record import COMPARISON_DIR, HISTORY_TAG
from imgclf.config import PromotionConfig
from imgclf.data.dataset import load_split
from imgclf.errors import DataError, TrackingError
from imgclf.paths import home_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from imgclf.evaluation import Evaluation
    from imgclf.predict import Predictor

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"  # written by preprocess for image folders (imgclf.data.prepare)
MANIFEST_ARTIFACT = "data/manifest.csv"  # where each registered version's run keeps it
MANIFEST_TAG = "training_manifest"  # version tag: the run's artifact path, or why there is none
BUILTIN_MANIFEST = "none: built-in data set (its official test split is never trained on)"
# Version tag: the champion compared against and the test images the version's model card was
# written for. Evaluating the same pair again leaves that card as it is.
CARD_TAG = "model_card"
LOCK_WAIT_S = 600  # another evaluation comparing against the same champion: wait for it, this long at most
BATCH = 256


# --- today's test images ------------------------------------------------------------------------

@dataclass(frozen=True)
class TestImages:
    """Today's test split as the challenger saw it, each image with its class name and (image
    folders) its content hash and path from the manifest."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: list[str]
    sha256: list[str] | None  # None: a built-in data set (no manifest)
    paths: list[str] | None
    digest: str  # identifies exactly these images and labels
    resize: str | None
    manifest: str | None = None  # today's whole manifest (image folders), for what changed in the data


def _test_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test" and not r["note"]]
    # The test split's arrays hold its images in path order (imgclf.data.folder._assemble).
    return sorted(rows, key=lambda r: r["path"])


def test_digest(processed_dir: Path) -> str:
    """Identifies exactly today's test images and labels (the decision's and the card's key)."""
    digest = hashlib.sha256()
    for part in ("test_images.npy", "test_labels.npy"):
        digest.update(tracking.file_sha256(processed_dir / part).encode())
    return digest.hexdigest()


def test_images(processed_dir: Path, meta: dict[str, Any]) -> TestImages:
    """Today's test split, checked against the manifest where there is one."""
    test = load_split(processed_dir, "test", meta, mmap=True)
    classes = list(meta["classes"])
    labels = [classes[int(i)] for i in test.labels]
    manifest = processed_dir / MANIFEST_FILE
    sha = paths = None
    if manifest.is_file():
        rows = _test_rows(manifest)
        if [r["class"] for r in rows] != labels:
            raise DataError(f"{manifest}: its test rows ({len(rows)}) do not match the test split "
                            f"({len(labels)} images); run `dvc repro preprocess`")
        sha, paths = [r["sha256"] for r in rows], [r["path"] for r in rows]
    return TestImages(np.asarray(test.images), labels, sha, paths, test_digest(processed_dir), meta.get("resize"),
                      manifest.read_text(encoding="utf-8") if manifest.is_file() else None)


# --- the training manifest of every version ---------------------------------------------------------

def record_manifest(client: MlflowClient, run_id: str, name: str, version: str, processed_dir: Path) -> None:
    """Keep the images this version trained on with it: the manifest on its run, a tag saying where."""
    manifest = processed_dir / MANIFEST_FILE
    if manifest.is_file():
        client.log_artifact(run_id, str(manifest), artifact_path=MANIFEST_ARTIFACT.rsplit("/", 1)[0])
        client.set_model_version_tag(name, version, MANIFEST_TAG, MANIFEST_ARTIFACT)
    else:
        client.set_model_version_tag(name, version, MANIFEST_TAG, BUILTIN_MANIFEST)


def _trained_on(manifest: str) -> set[str]:
    # Every train and val row, duplicates and left-out near-duplicates too: the safe side.
    return {r["sha256"] for r in csv.DictReader(io.StringIO(manifest)) if r["split"] in ("train", "val") and r["sha256"]}


def training_manifest(client: MlflowClient, version: Any) -> str | None:
    """The manifest a version recorded (its data's every image, class and split), or None."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is the stage's log
    where = version.tags.get(MANIFEST_TAG)
    if where is None and version.run_id:  # a hand-registered version of a pipeline run
        found = {a.path for a in client.list_artifacts(version.run_id, MANIFEST_ARTIFACT.rsplit("/", 1)[0])}
        where = MANIFEST_ARTIFACT if MANIFEST_ARTIFACT in found else None
    if where != MANIFEST_ARTIFACT or not version.run_id:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=where)).read_text("utf-8")


def data_change(champion_manifest: str, today_manifest: str) -> dict[str, Any]:
    """What changed between the data the champion learned and today's (imgclf.datadiff): per
    class added, removed, relabelled and moved; the class counts of both; a few examples."""
    from imgclf.datadiff import diff, parse_manifest

    change = diff(parse_manifest(champion_manifest, "the champion's manifest"),
                  parse_manifest(today_manifest, "today's manifest"))
    return {"changes": change["changes"], "counts": change["counts"], "relabelled": change["relabelled"][:10],
            "moved_split": len(change["moved_split"])}


# --- the model card of every version (imgclf.modelcard) ----------------------------------------------

def record_card(name: str, version: str, run_id: str, model_key: str, classes: list[str],
                confusion: list[list[int]], meta: dict[str, Any], test_data: str,
                client: MlflowClient | None = None) -> bool:
    """Write the model card of version `version` of `name`, after the champion decision (which it
    reports from the version's tags): the whole card as an artifact of its run, and as the
    version's description (what the MLflow UI shows on the version's page), cut to fit the
    stores' limit. `test_data`: `test_digest` of today's test images. Returns False when the
    card written for this champion and these test images stands (the same pair, evaluated again).

    A description someone wrote by hand stays: only an empty one or an earlier card is replaced.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prefix = promotion.TAG_PREFIX
    client = client or MlflowClient()
    try:
        found = client.get_model_version(name, version)
        # The decision evaluate recorded; a move by hand (promotion.manual.*) came later.
        decision = {k.removeprefix(prefix): v for k, v in found.tags.items()
                    if k.startswith(prefix) and not k.startswith(f"{prefix}manual.")}
        key = f"{decision.get('compared_against', 'none')} {test_data}"
        if found.tags.get(CARD_TAG) == key:
            log.info("%s version %s: its model card (compared against %s, these test images) stands", name,
                     version, decision.get("compared_against", "none"))
            return False
        run = client.get_run(run_id)
        facts = modelcard.Facts(
            name=name, version=str(version), model_key=model_key, run_id=run_id, classes=list(classes),
            confusion=[list(map(int, row)) for row in confusion], meta=meta, params=dict(run.data.params),
            run_tags={k: run.data.tags[k] for k in ("git_commit", "data_version", "data_source_version", "best_epoch")
                      if k in run.data.tags},
            decision=decision)
        client.log_text(run_id, modelcard.build(facts), modelcard.ARTIFACT)
        described = not found.description or found.description.startswith(modelcard.TITLE)
        if described:
            client.update_model_version(name, version, description=modelcard.description(facts))
        else:
            log.warning("%s version %s: its description was written by hand and stays; the model card is "
                        "%s on run %s", name, version, modelcard.ARTIFACT, run_id)
        # The tag last: a version says it has its card only once the card is there.
        client.set_model_version_tag(name, version, CARD_TAG, key)
    except MlflowException as exc:
        raise TrackingError(f"{model_key}: writing the model card of version {version} of {name!r} failed: "
                            f"{exc.message}") from None
    log.info("%s version %s: model card written (%s on run %s%s)", name, version, modelcard.ARTIFACT, run_id,
             ", and as the version's description" if described else "")
    return True


# --- scoring the champion ---------------------------------------------------------------------------

def _pixels_for(predictor: Predictor, today: TestImages, root: Path, meta: dict[str, Any]) -> np.ndarray:
    """Today's test images as the champion takes them: the processed arrays when its input shape
    and resizing are today's, else each file decoded again its way (image folders on disk)."""
    from imgclf.data import images

    if tuple(today.images.shape[1:]) == predictor.in_shape and (today.resize or predictor.resize) == predictor.resize:
        return today.images
    folder = (meta.get("source") or {}).get("path")
    if today.paths is None or not folder:
        raise DataError(f"{predictor.source} takes {predictor.in_shape} images resized by {predictor.resize!r}, "
                        f"today's are {tuple(today.images.shape[1:])}: only an image folder's files can be "
                        "read again its way")
    return np.stack([images.decode(root / folder / p, predictor.in_shape, False, predictor.resize)
                     for p in today.paths])


def score(predictor: Predictor, pixels: np.ndarray) -> list[str]:
    """The predicted class name of each image."""
    probs = np.concatenate([predictor.probabilities(pixels[i : i + BATCH]) for i in range(0, len(pixels), BATCH)])
    classes = predictor.classes or [str(i) for i in range(probs.shape[1])]
    if probs.shape != (len(pixels), len(classes)):
        raise DataError(f"{predictor.source}: returned shape {probs.shape} for {len(pixels)} images "
                        f"and {len(classes)} classes")
    # Stable argmax: ties go to the first class, as in every run.
    return [classes[i] for i in np.argmax(probs, axis=1)]


# --- the alias ----------------------------------------------------------------------------------

def _lock_path(name: str) -> Path:
    """One lock per registered model and store on this machine: next to a SQLite store (queued
    experiments share it), else in the project's home."""
    uri = tracking.tracking_uri()
    database = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    base = Path(database).parent if database and database != ":memory:" else home_root()
    key = hashlib.sha256(f"{tracking.masked(uri)}\n{name}".encode()).hexdigest()[:16]
    return base / f".champion-{key}.lock"


@contextmanager
def champion_lock(name: str) -> Iterator[None]:
    """Hold while reading, comparing and moving the alias: two evaluations at once take turns, so
    the second compares against the champion the first may have crowned."""
    from filelock import FileLock, Timeout

    path = _lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(path, timeout=LOCK_WAIT_S):
            yield
    except Timeout:
        raise TrackingError(f"another process has held the champion lock {path} for {LOCK_WAIT_S} s; "
                            "nothing was moved (remove the file if no evaluation is running)") from None


def current_champion(client: MlflowClient, name: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    # Stores disagree on whether an alias maps to an int or a str version: use str.
    return str(aliases[registry.CHAMPION]) if registry.CHAMPION in aliases else None


HISTORY_LIMIT = 4000  # characters kept (the newest lines): under the stores' tag-value limit of 5,000


def move_alias(client: MlflowClient, name: str, expected: str | None, version: str, why: str) -> None:
    """Point `champion` at `version` if it still points at `expected` (compare and set: across
    machines, the lock alone does not serialize, and a person may have moved it meanwhile), and
    add the move to both versions' history."""
    import time

    now = current_champion(client, name)
    if now != expected:
        raise TrackingError(f"{name}: {registry.CHAMPION} moved from version {expected} to {now} while this "
                            f"comparison ran; version {version} was not promoted (evaluate it again)")
    client.set_registered_model_alias(name, registry.CHAMPION, version)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    replacing = f" (replacing version {expected})" if expected else ""
    _add_history(client, name, version, f"{when}: became {registry.CHAMPION}{replacing}: {why}")
    if expected is not None:
        _add_history(client, name, expected,
                     f"{when}: stopped being {registry.CHAMPION} (replaced by version {version}): {why}")


def _add_history(client: MlflowClient, name: str, version: str, line: str) -> None:
    lines = [*client.get_model_version(name, version).tags.get(HISTORY_TAG, "").splitlines(), " ".join(line.split())]
    while len("\n".join(lines)) > HISTORY_LIMIT and len(lines) > 1:
        lines.pop(0)
    client.set_model_version_tag(name, version, HISTORY_TAG, "\n".join(lines)[-HISTORY_LIMIT:])


# --- the evaluate stage's step ------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    """What `challenge` decided, as recorded."""

    version: str
    champion: str | None  # compared against (None: there was no champion)
    outcome: str
    reason: str
    record: dict[str, Any] | None  # the comparison artifact; None without a comparison
    repeated: bool = False  # this pair was decided before: the earlier record stands


def _recorded(version: Any, champion: str, test_digest: str, policy: PromotionConfig) -> bool:
    t = version.tags
    return (t.get(f"{promotion.TAG_PREFIX}compared_against") == champion
            and t.get(f"{promotion.TAG_PREFIX}test_data") == test_digest
            and t.get(f"{promotion.TAG_PREFIX}policy") == promotion.describe_policy(policy))


def _set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def challenge(reg: registry.Registration, run_id: str, model_key: str, evaluation: Evaluation,
              meta: dict[str, Any], policy: PromotionConfig, processed_dir: Path, root: Path,
              client: MlflowClient | None = None) -> Challenge:
    """Compare the newly registered version `reg` with the champion on today's test images,
    record the decision and move the alias if the policy says so."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    name, version = reg.name, reg.version
    try:
        record_manifest(client, run_id, name, version, processed_dir)
        today = test_images(processed_dir, meta)
        with champion_lock(name):
            return _challenge(client, name, version, run_id, model_key, evaluation, meta, policy, today, root)
    except MlflowException as exc:
        raise TrackingError(f"{model_key}: comparing version {version} of {name!r} with its {registry.CHAMPION} "
                            f"failed: {exc.message}") from None


def _challenge(client: MlflowClient, name: str, version: str, run_id: str, model_key: str, evaluation: Evaluation,
               meta: dict[str, Any], policy: PromotionConfig, today: TestImages, root: Path) -> Challenge:
    from imgclf.predict import from_mlflow

    head = f"{model_key} version {version} of {name}"
    champion = current_champion(client, name)
    if champion is None:
        reason = "there was no champion"
        move_alias(client, name, None, version, f"{reason} (evaluate@{model_key})")
        _set_tags(client, name, version, {f"{promotion.TAG_PREFIX}outcome": "first",
                                          f"{promotion.TAG_PREFIX}reason": reason,
                                          f"{promotion.TAG_PREFIX}compared_against": "none"})
        log.info("%s (test/accuracy %.4f) is the first %s", head, evaluation.metrics["test/accuracy"],
                 registry.CHAMPION)
        return Challenge(version, None, "first", reason, None)
    if champion == version:
        log.info("%s is the %s already; nothing to compare", head, registry.CHAMPION)
        return Challenge(version, champion, "same", "it is the champion already", None)
    mine = client.get_model_version(name, version)
    if _recorded(mine, champion, today.digest, policy):
        outcome = mine.tags.get(f"{promotion.TAG_PREFIX}outcome", "")
        reason = mine.tags.get(f"{promotion.TAG_PREFIX}reason", "")
        log.info("%s was compared with %s version %s on these test images before: %s (%s); the record "
                 "stands and the alias is not moved again", head, registry.CHAMPION, champion, outcome, reason)
        return Challenge(version, champion, outcome, reason, None, repeated=True)
    theirs = client.get_model_version(name, champion)
    their_dataset = registry.version_dataset(client, theirs)
    if their_dataset is not None and their_dataset != meta["dataset"]:
        reason = (f"the champion is a {their_dataset} model: accuracies on different data sets do not compare "
                  f"(give {meta['dataset']} its own mlflow.registered_name)")
        _set_tags(client, name, version, {f"{promotion.TAG_PREFIX}outcome": "manual",
                                          f"{promotion.TAG_PREFIX}reason": reason,
                                          f"{promotion.TAG_PREFIX}compared_against": champion})
        log.info("%s: %s stays version %s: %s", head, registry.CHAMPION, champion, reason)
        return Challenge(version, champion, "manual", reason, None)

    notes = []
    exclude = None
    overlap_unknown = False
    learned = training_manifest(client, theirs)
    trained_on = None if learned is None else _trained_on(learned)
    if today.sha256 is None:
        notes.append("built-in data set: its official test split is never in any version's training data")
    elif trained_on is None:
        overlap_unknown = True
        notes.append(f"version {champion} records no training manifest: whether it trained on today's test "
                     "images cannot be checked")
    else:
        exclude = np.array([s in trained_on for s in today.sha256], dtype=bool)
        if exclude.any():
            notes.append(f"{int(exclude.sum())} of today's {len(exclude)} test images were in version {champion}'s "
                         "training data (a changed preprocess.seed?): left out of the comparison")
    if overlap_unknown or (exclude is not None and exclude.any()):
        log.warning("%s: %s", head, notes[-1])  # the one line that says the exams overlap

    predictor = from_mlflow(f"models:/{name}/{champion}")
    champion_pred = score(predictor, _pixels_for(predictor, today, root, meta))
    challenger_pred = [evaluation.classes[int(i)] for i in evaluation.result["predicted"]]
    comparison = promotion.compare(today.labels, challenger_pred, champion_pred, evaluation.classes,
                                   predictor.classes or sorted(set(champion_pred)), exclude, 1 - policy.alpha)
    decision = promotion.decide(comparison, policy, overlap_unknown)
    rec = promotion.record(model_key, version, champion, comparison, decision, policy, today.digest, notes)
    if learned is not None and today.manifest is not None:
        rec["data_change"] = data_change(learned, today.manifest)
    client.log_text(run_id, json.dumps(rec, indent=2) + "\n", f"{COMPARISON_DIR}/comparison.json")
    client.log_text(run_id, promotion.markdown(rec), f"{COMPARISON_DIR}/comparison.md")
    if decision.promote:
        move_alias(client, name, champion, version, f"{decision.reason} (evaluate@{model_key}, policy)")
    # The tags last: a version carries a decision only once everything it says has happened.
    _set_tags(client, name, version, promotion.tags(champion, comparison, decision, policy, today.digest))
    log.info("%s", promotion.summary(model_key, version, champion, comparison, decision))
    return Challenge(version, champion, decision.outcome, decision.reason, rec)
