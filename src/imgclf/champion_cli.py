"""`imgclf-champion`: move the served model by hand, and score it on newly arrived images.

    imgclf-champion promote VERSION --reason TEXT [--name NAME]
    imgclf-champion rollback VERSION --reason TEXT [--name NAME]
    imgclf-champion score FOLDER [--version VERSION] [--name NAME] [--experiment NAME]

(or `python -m imgclf.champion_cli ...`). NAME defaults to params.yaml's `mlflow.registered_name`.

`promote` and `rollback` point the alias `champion` at VERSION, refusing a version of another
data set than the champion's, and record on the version who asked (the tracking server's user
name, else the login name) and why. On a team server a user without EDIT on the registered model
is refused in one line before anything moves.

`score` answers "is the model we serve still good on this week's images?": FOLDER is laid out
like a data set folder (one subfolder per class, PNG or JPEG files). It prints overall and
per-class accuracy with exact 95% intervals and the classes confused most, and logs an
evaluation run (experiment `mlflow.experiment`) tagged with the model version and the images'
digest. Every image is read and checked before the model runs; a bad one stops it in one line.
docs/champion.md shows the loop a team runs with it.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from imgclf import champion, cli, registry, tracking
from imgclf.config import MlflowConfig, load_section, read_params
from imgclf.data.folder import is_clutter
from imgclf.errors import ConfigError, DataError, TrackingError

log = logging.getLogger(__name__)

PROG = "imgclf-champion"
FORMATS = ("PNG", "JPEG")
CONFIDENCE = 0.95
TOP_CONFUSIONS = 5
MANUAL = f"{champion.promotion.TAG_PREFIX}manual."  # version tags of a move by hand


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Move the champion alias by hand, or score the champion on new images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb, what in (("promote", "make VERSION the champion"), ("rollback", "make an earlier VERSION the champion again")):
        p = sub.add_parser(verb, help=what, description=what)
        p.add_argument("version", metavar="VERSION", help="a version number of the registered model")
        p.add_argument("--reason", required=True, help="why (recorded on the version)")
        p.add_argument("--name", help="the registered model (default: params.yaml mlflow.registered_name)")
    p = sub.add_parser("score", help="score the champion (or a version) on a labelled folder of images")
    p.add_argument("folder", type=Path, metavar="FOLDER", help="one subfolder per class, PNG or JPEG files")
    p.add_argument("--version", help="a version number (default: the champion)")
    p.add_argument("--name", help="the registered model (default: params.yaml mlflow.registered_name)")
    p.add_argument("--experiment", help="where the evaluation run goes (default: params.yaml mlflow.experiment)")
    return parser.parse_args(argv)


def _mlflow_params(args: argparse.Namespace) -> tuple[str, str | None]:
    """The registered model's name and (for `score`) the experiment, from the arguments, else
    params.yaml (read only when an argument is missing)."""
    wants_experiment = args.command == "score"
    if args.name and (args.experiment if wants_experiment else True):
        return args.name, args.experiment if wants_experiment else None
    cfg = load_section("mlflow", MlflowConfig, read_params())
    return args.name or cfg.registered_name, (args.experiment or cfg.experiment) if wants_experiment else None


def _client(registered_model: str | None = None, experiment: str | None = None) -> Any:
    """An MLflow client of the project's store, after checking that it answers and, for a team
    server, that this user may write what the command writes (one line otherwise)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    tracking.check_store(uri, "the registered model")
    tracking.check_reachable(uri, experiment, registered_model)
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


def who() -> str:
    """Who asked: the tracking server's user name when one is set, else the login name."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        username = tracking._credentials(uri)[2]
        if username:
            return username
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not version.isdigit():
        raise ConfigError(f"version {version!r}: give a version number of {name!r}, e.g. 3")
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
    try:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        known = []
    have = f"versions: {', '.join(map(str, known))}" if known else "it has no versions"
    raise ConfigError(f"version {version} of {name!r} does not exist ({have}); nothing moved")


def move(name: str, version: str, reason: str, action: str) -> str | None:
    """Point `champion` at `version` by hand and record who asked and why; return the champion before."""
    from mlflow.exceptions import MlflowException

    if not reason.strip():
        raise ConfigError("--reason: say why (it is recorded on the version)")
    client = _client(registered_model=name)
    try:
        with champion.champion_lock(name):
            target = _version(client, name, version)
            before = champion.current_champion(client, name)
            if before == version:
                log.info("%s version %s is the %s already; nothing moved", name, version, registry.CHAMPION)
                return before
            if before is not None:
                theirs, mine = (registry.version_dataset(client, client.get_model_version(name, before)),
                                registry.version_dataset(client, target))
                if theirs and mine and theirs != mine:
                    raise ConfigError(f"version {version} is a {mine} model and the {registry.CHAMPION} (version "
                                      f"{before}) a {theirs} one: a model of another data set cannot serve in its "
                                      "place; nothing moved")
            tags = {"action": action, "by": who(), "reason": reason.strip(), "replaced": before or "none"}
            champion.move_alias(client, name, before, version, f"{action} by hand by {tags['by']}: {tags['reason']}")
            for key, value in tags.items():
                client.set_model_version_tag(name, version, f"{MANUAL}{key}", value)
    except MlflowException as exc:
        raise TrackingError(f"{action} {name} version {version}: the store refused ({exc.message.splitlines()[0]}); "
                            "nothing moved") from None
    log.info("%s: %s moved from version %s to version %s by %s (%s by hand: %s)", name, registry.CHAMPION,
             before or "none", version, tags["by"], action, tags["reason"])
    return before


# --- scoring a folder of new images -------------------------------------------------------------------

@dataclass(frozen=True)
class Labelled:
    paths: list[Path]
    labels: list[str]
    digest: str  # of the files' paths, classes and contents


def read_folder(folder: Path, classes: Sequence[str]) -> Labelled:
    """The image files of a folder laid out like a data set (one subfolder per class), refusing
    unknown classes and stray files."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give a folder with one subfolder per class)")
    paths, labels, stray = [], [], []
    for entry in sorted(folder.iterdir()):
        if is_clutter(entry.name):
            continue
        if not entry.is_dir():
            stray.append(entry.name)
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file() and not any(is_clutter(q) for q in p.parts)):
            paths.append(path)
            labels.append(entry.name)
    if stray:
        raise DataError(f"{folder}: {len(stray)} file(s) outside any class folder ({', '.join(stray[:3])}); "
                        "put each image in the subfolder named by its class")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} unknown to the model (it knows "
                        f"{', '.join(classes)}); score only classes it was trained on")
    if not paths:
        raise DataError(f"{folder}: no image files in its class folders")
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        digest.update(f"{path.relative_to(folder).as_posix()}\t{label}\t{tracking.file_sha256(path)}\n".encode())
    return Labelled(paths, labels, digest.hexdigest())


def _decode_all(images: Labelled, predictor: Any) -> np.ndarray:
    from imgclf.data import images as decoding

    pixels, bad = [], []
    for path in images.paths:
        try:
            pixels.append(decoding.decode(path, predictor.in_shape, False, predictor.resize, formats=FORMATS))
        except (decoding.ImageError, OSError) as exc:
            bad.append(f"{path}: {exc}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:3])}{more}; fix or remove them")
    return np.stack(pixels)


def _interval(right: int, n: int) -> tuple[float, float]:
    return champion.promotion.exact_interval(right, n, CONFIDENCE)


def summarize(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Overall and per-class accuracy with exact intervals, and the most frequent confusions."""
    right = [a == p for a, p in zip(actual, predicted)]
    per_class = {}
    for cls in classes:
        hits = [r for a, r in zip(actual, right) if a == cls]
        if hits:
            per_class[cls] = {"images": len(hits), "accuracy": sum(hits) / len(hits),
                              "interval": list(_interval(sum(hits), len(hits)))}
    confused = Counter((a, p) for a, p in zip(actual, predicted) if a != p)
    # Most frequent first; ties by names, so the list repeats.
    top = sorted(confused.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONFUSIONS]
    return {"images": len(actual), "accuracy": sum(right) / len(right), "interval": list(_interval(sum(right), len(right))),
            "per_class": per_class,
            "confused": [{"actual": a, "predicted": p, "images": n} for (a, p), n in top]}


def render(source: str, folder: Path, result: dict[str, Any]) -> str:
    low, high = result["interval"]
    width = max(len("class"), *(len(c) for c in result["per_class"]))
    lines = [f"{source} on {result['images']} images of {len(result['per_class'])} classes in {folder}:",
             f"accuracy {100 * result['accuracy']:.2f}% ({100 * CONFIDENCE:g}% interval {100 * low:.1f}% to "
             f"{100 * high:.1f}%)", "",
             f"{'class':<{width}}  images  accuracy  {100 * CONFIDENCE:g}% interval"]
    for cls, f in result["per_class"].items():
        lo, hi = f["interval"]
        lines.append(f"{cls:<{width}}  {f['images']:>6}  {100 * f['accuracy']:>7.2f}%  {100 * lo:.1f}% to {100 * hi:.1f}%")
    if result["confused"]:
        pairs = ", ".join(f"{c['actual']} as {c['predicted']} {c['images']}" for c in result["confused"])
        lines += ["", f"most confused (actual as predicted, images): {pairs}"]
    else:
        lines += ["", "no image misclassified"]
    return "\n".join(lines) + "\n"


def score_folder(folder: Path, name: str, version: str | None, experiment: str) -> dict[str, Any]:
    """Score a version (default: the champion) on a labelled folder; log an evaluation run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from imgclf.predict import from_mlflow

    client = _client(experiment=experiment)
    try:
        if version is None:
            try:
                version = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
            except MlflowException:
                raise ConfigError(f"{name!r} has no {registry.CHAMPION} (give --version, or run `dvc repro` "
                                  "to register one)") from None
        else:
            _version(client, name, version)
    except MlflowException as exc:
        raise TrackingError(f"{name}: the store refused ({exc.message.splitlines()[0]})") from None
    uri = f"models:/{name}/{version}"
    predictor = from_mlflow(uri)
    if not predictor.classes:
        raise DataError(f"{uri} names no classes (no metadata 'classes'): a labelled folder cannot be scored")
    images = read_folder(folder, predictor.classes)
    predicted = champion.score(predictor, _decode_all(images, predictor))
    result = summarize(images.labels, predicted, predictor.classes)
    result.update(model=uri, version=version, folder=str(folder), digest=images.digest)
    experiment_id = tracking.setup(experiment)
    tags = {"imgclf.kind": "score", "model_name": name, "model_version": version, "evaluated_model": uri,
            "data_folder": str(folder.resolve()), "data_digest": images.digest}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"score {name} v{version}", tags=tags) as run:
        mlflow.log_metrics({"new/accuracy": result["accuracy"], "new/images": result["images"],
                            **{f"new/accuracy/{c}": f["accuracy"] for c, f in result["per_class"].items()}})
        mlflow.log_text(json.dumps(result, indent=2) + "\n", "score/score.json")
    result["run_id"] = run.info.run_id
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    name, experiment = _mlflow_params(args)
    if args.command in ("promote", "rollback"):
        move(name, args.version, args.reason, "promoted" if args.command == "promote" else "rolled back")
        return
    assert experiment is not None  # _mlflow_params gives `score` its experiment
    result = score_folder(args.folder, name, args.version, experiment)
    label = f"models:/{name}@{registry.CHAMPION} (version {result['version']})" if args.version is None else result["model"]
    sys.stdout.write(render(label, args.folder, result))
    sys.stdout.flush()
    log.info("scored %s on %d images of %s: accuracy %.4f; logged as run %s in experiment %r", result["model"],
             result["images"], args.folder, result["accuracy"], result["run_id"], experiment)


def entry_point() -> None:
    """The `imgclf-champion` console script."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
