"""`imgclf-trace`: where a model came from, and which models came from a data version.

    imgclf-trace HANDLE [--json]
    imgclf-trace --data VERSION [--json]

HANDLE is `models:/<name>@<alias>`, `models:/<name>/<version>`, a bare version number of
`mlflow.registered_name`, an MLflow run id, or a model file (`models/<name>/model.pt`, found
by its SHA-256, the tag every training run carries). The answer is the model's lineage from
what its MLflow run recorded: data set and data version (the source's DVC hash or checksums,
and the processed data's DVC hash), git commit and whether the code and params were committed,
the params, test metrics, its registered versions (aliases, tags, when registered), and the
commands that restore that state in a fresh clone.

VERSION is a DVC hash (of a data folder or of `data/processed`), or a git revision
(`REV`, or `REV:path/to/folder.dvc`): the data folder's `.dvc` file and `dvc.lock` at that
revision name the hashes. The answer lists every run trained or evaluated on that data, with
its registered versions.

Nothing is written. Bad input (an unknown handle, a revision without the data, a tracking
store that cannot be reached, a run logged before lineage was recorded) stops with one line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from imgclf import cli, tracking
from imgclf.champion_record import HISTORY_TAG
from imgclf.config import MlflowConfig, load_section, read_params
from imgclf.errors import ConfigError, DataError
from imgclf.paths import ROOT

RUN_ID = re.compile(r"[0-9a-f]{32}")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
# A DVC md5 (a folder's ends in .dir) or a SHA-256 (built-in sets' checksums, folder contents).
DATA_HASH = re.compile(r"[0-9a-f]{32}(\.dir)?|[0-9a-f]{64}")
# The run tags that say which data a run saw (imgclf.runlog.log_data); a run without them
# was logged before lineage was recorded.
DATA_TAGS = ("data_source_version", "data_version")
METRIC_PREFIXES = ("test/", "best/")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"imgclf-trace: {message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="imgclf-trace", description=__doc__.splitlines()[0])
    parser.add_argument("handle", nargs="?", help="models:/<name>@<alias>, models:/<name>/<version>, a version "
                        "number, a run id, or a model file such as models/cnn/model.pt")
    parser.add_argument("--data", metavar="VERSION", help="list the runs and versions made from this data version "
                        "(a DVC hash, or a git revision REV[:path.dvc])")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    if (args.handle is None) == (args.data is None):
        parser.error("give either a model handle or --data VERSION")
    return args


# --- the tracking store --------------------------------------------------------------------------

def _client() -> Any:
    """An MlflowClient of the configured store, after checking it can be used (read only)."""
    store = tracking.tracking_uri()
    tracking.check_store(store, "the runs")
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.MlflowClient()


def _experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _search_runs(client: Any, filter_string: str) -> list[Any]:
    ids = _experiment_ids(client)
    runs: list[Any] = []
    token = None
    while ids:
        page = client.search_runs(ids, filter_string, order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


# --- model handle -> run -----------------------------------------------------------------------

def _registered_name() -> str:
    try:
        return load_section("mlflow", MlflowConfig, read_params()).registered_name
    except ConfigError as exc:
        raise ConfigError(f"a bare version number needs mlflow.registered_name from params.yaml ({exc})") from None


def resolve(client: Any, handle: str) -> tuple[Any, str]:
    """(the MLflow run that made the model `handle` names, how it was found)."""
    from mlflow.exceptions import MlflowException

    if handle.isdigit():
        handle = f"models:/{_registered_name()}/{handle}"
    match = MODEL_URI.fullmatch(handle)
    if match:
        name, alias, number = match["name"], match["alias"], match["version"]
        try:
            version = (client.get_model_version_by_alias(name, alias) if alias
                       else client.get_model_version(name, number))
        except MlflowException:
            known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
            what = f"alias {alias!r}" if alias else f"version {number}"
            raise DataError(f"{handle}: the registry has no {what} of model {name!r} (registered models: {known})") \
                from None
        if not version.run_id:
            raise DataError(f"{handle}: version {version.version} names no MLflow run, so nothing records its lineage")
        return _run(client, version.run_id, handle), f"{name} version {version.version}"
    if RUN_ID.fullmatch(handle):
        return _run(client, handle, handle), f"run {handle}"
    path = Path(handle)
    if path.is_file():
        sha = tracking.file_sha256(path)
        runs = _search_runs(client, f"tags.model_sha256 = '{sha}'")
        if not runs:
            raise DataError(f"{handle}: no MLflow run in {tracking.masked(tracking.tracking_uri())} trained a model with "
                            f"this file's SHA-256 ({sha[:12]}...); it was trained elsewhere or before runs were tagged "
                            "with it: set MLFLOW_TRACKING_URI to the store of the run that trained it")
        return runs[0], f"model file {handle} (SHA-256 {sha[:12]}...)"
    if handle.endswith(".pt") or "/" in handle:
        raise DataError(f"{handle}: no such file (give models/<name>/model.pt after `dvc pull`, or a models:/ URI)")
    raise DataError(f"{handle}: not a model handle (give models:/<name>@<alias>, models:/<name>/<version>, a version "
                    "number, a 32-hex-digit run id, or a model file such as models/cnn/model.pt)")


def _run(client: Any, run_id: str, handle: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise DataError(f"{handle}: no run with id {run_id} in {tracking.masked(tracking.tracking_uri())}") from None


# --- lineage ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lineage:
    found_by: str
    run_id: str
    run_name: str
    experiment: str
    model: str
    model_sha256: str | None
    dataset: dict[str, Any]
    data_source_version: str
    data_version: str
    git_commit: str
    git_clean: str
    dvc_exp_name: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    versions: list[dict[str, Any]]
    restore: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lineage(client: Any, run: Any, found_by: str) -> Lineage:
    tags = run.data.tags
    missing = [t for t in DATA_TAGS if t not in tags]
    if missing:
        raise DataError(f"run {run.info.run_id} records no {' or '.join(missing)}: it was logged before imgclf "
                        "recorded lineage, so its data is unknown; retrain it (`dvc repro`) to trace it")
    model = tags.get("model_name", run.info.run_name or "")
    datasets = [d.dataset for d in (run.inputs.dataset_inputs if run.inputs else [])]
    dataset = {}
    if datasets:
        d = datasets[0]
        dataset = {"name": d.name, "digest": d.digest, "source_type": d.source_type,
                   "source": _json(d.source), "profile": _json(d.profile)}
    sha = tags.get("model_sha256")
    return Lineage(
        found_by=found_by, run_id=run.info.run_id, run_name=run.info.run_name or "",
        experiment=client.get_experiment(run.info.experiment_id).name, model=model, model_sha256=sha,
        dataset=dataset, data_source_version=tags["data_source_version"], data_version=tags["data_version"],
        git_commit=tags.get("git_commit", "unknown"), git_clean=tags.get("git_clean", "not recorded"),
        dvc_exp_name=tags.get("dvc_exp_name"), params=dict(sorted(run.data.params.items())),
        metrics={k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(METRIC_PREFIXES)},
        versions=registered_versions(client, run.info.run_id),
        restore=restore_commands(tags.get("git_commit", "unknown"), tags.get("dvc_exp_name"), model, sha,
                                 tags.get("model_md5")),
    )


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def registered_versions(client: Any, run_id: str) -> list[dict[str, Any]]:
    """Every registered version made from the run, with its aliases now and its tags (the
    registry keeps aliases, not their history: a tag a promotion writes is its record)."""
    out = []
    for v in client.search_model_versions(f"run_id = '{run_id}'"):
        aliases = client.get_registered_model(v.name).aliases
        out.append({"name": v.name, "version": str(v.version), "registered_ms": v.creation_timestamp,
                    "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
                    "tags": dict(sorted(v.tags.items())), "description": v.description or ""})
    return sorted(out, key=lambda v: (v["name"], int(v["version"])))


def restore_commands(commit: str, exp_name: str | None, model: str, sha: str | None, md5: str | None,
                     repo: Path = ROOT) -> list[str]:
    """What brings the model's state back in a fresh clone of the repository.

    The run's own commit is the code it ran, but its dvc.lock predates the results: the commit
    whose dvc.lock records this model file (by its MD5, tag model_md5) is the one `dvc pull`
    restores it from. Without one (results never committed, or a run tagged before model_md5),
    the run's commit and `dvc repro` rebuild it: training is deterministic on the same platform.
    """
    if commit == "unknown":
        return []
    holder = _commit_recording(f"models/{model}/model.pt", md5, repo) if model and md5 else None
    if exp_name and holder is None:
        # An experiment's results live in its git ref until applied.
        steps = [f"git checkout {commit}", f"dvc exp pull origin {exp_name}  # unless it is already in this clone",
                 f"dvc exp apply {exp_name}", "dvc pull"]
    elif holder is not None:
        steps = [f"git checkout {holder}  # its dvc.lock records this model; the code ran at {commit}",
                 "dvc pull  # data, processed data and models (or `dvc checkout` from a local cache)"]
    else:
        steps = [f"git checkout {commit}",
                 "dvc pull  # the data and processed data of that commit",
                 f"dvc repro train@{model}  # no commit records this model file: rebuild it (deterministic)"]
    if model and sha:
        steps += [f"sha256sum models/{model}/model.pt  # expect {sha}"]
    return steps


def _commit_recording(output: str, md5: str, repo: Path) -> str | None:
    """The oldest commit whose dvc.lock records `output` with this MD5, or None."""
    listed = subprocess.run(["git", "log", "--reverse", "--format=%H", "--", "dvc.lock"], cwd=repo,
                            capture_output=True, text=True)
    for commit in listed.stdout.split() if listed.returncode == 0 else []:
        lock = yaml.safe_load(_show(repo, commit, "dvc.lock") or "") or {}
        for stage in (lock.get("stages") or {}).values():
            for out in (stage or {}).get("outs") or []:
                if out.get("path") == output and out.get("md5") == md5:
                    return commit
    return None


# --- data version -> runs ----------------------------------------------------------------------

def hashes_at(revision: str, repo: Path = ROOT) -> dict[str, str]:
    """The data hashes a git revision records: {'data_source_version': the data folder's DVC
    hash, 'data_version': data/processed's}; REV:path.dvc names the .dvc file."""
    rev, _, dvc_file = revision.partition(":")
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                           capture_output=True, text=True)
    if known.returncode != 0:
        raise DataError(f"{revision}: not a git revision of this repository, nor a data hash "
                        "(32 hex digits, optionally .dir, or 64)")
    found: dict[str, str] = {}
    if not dvc_file:
        params = yaml.safe_load(_show(repo, rev, "params.yaml") or "") or {}
        chosen = (params.get("download") or {}).get("dataset")
        folder = ((params.get("datasets") or {}).get(chosen) or {}).get("folder")
        dvc_file = f"{folder}.dvc" if folder else ""
    if dvc_file:
        text = _show(repo, rev, dvc_file)
        if text is None:
            raise DataError(f"{revision}: {dvc_file} is not in that revision (was the folder tracked with `dvc add` then?)")
        try:
            found["data_source_version"] = str(yaml.safe_load(text)["outs"][0]["md5"])
        except (yaml.YAMLError, KeyError, IndexError, TypeError):
            raise DataError(f"{revision}:{dvc_file}: not a readable .dvc file") from None
    lock = yaml.safe_load(_show(repo, rev, "dvc.lock") or "") or {}
    for out in ((lock.get("stages") or {}).get("preprocess") or {}).get("outs") or []:
        if out.get("path") == "data/processed":
            found["data_version"] = str(out.get("md5"))
    if not found:
        raise DataError(f"{revision}: records no data version (no DVC-tracked data folder and no preprocess "
                        "output in its dvc.lock); give a DVC hash, or a revision after `dvc repro` was committed")
    return found


def _show(repo: Path, rev: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def runs_on(client: Any, version: str, repo: Path = ROOT) -> dict[str, Any]:
    """Every run whose data (source or processed) is `version` (a hash, or a git revision of
    `repo`), with its registered versions."""
    if DATA_HASH.fullmatch(version):
        wanted = {tag: [version, version.removesuffix(".dir") if version.endswith(".dir") else f"{version}.dir"]
                  for tag in DATA_TAGS}
    else:
        wanted = {tag: [value] for tag, value in hashes_at(version, repo).items()}
    runs: dict[str, Any] = {}
    for tag, values in wanted.items():
        for value in values:
            for run in _search_runs(client, f"tags.{tag} = '{value}'"):
                runs.setdefault(run.info.run_id, run)
    listed = []
    for run in sorted(runs.values(), key=lambda r: r.info.start_time):
        tags = run.data.tags
        listed.append({
            "run_id": run.info.run_id, "model": tags.get("model_name", run.info.run_name),
            "stage": tags.get("dvc_stage"), "started_ms": run.info.start_time,
            "data_source_version": tags.get("data_source_version"), "data_version": tags.get("data_version"),
            "git_commit": tags.get("git_commit"), "test/accuracy": run.data.metrics.get("test/accuracy"),
            "versions": [f"{v['name']}/{v['version']}" + (f" @{','.join(v['aliases'])}" if v["aliases"] else "")
                         for v in registered_versions(client, run.info.run_id)],
        })
    return {"data": version, "matched": {tag: values for tag, values in wanted.items()}, "runs": listed}


# --- output -------------------------------------------------------------------------------------

def format_lineage(x: Lineage) -> str:
    clean = {"true": "yes", "false": "NO (uncommitted changes to code or params)"}.get(x.git_clean, x.git_clean)
    profile = x.dataset.get("profile") or {}
    counts = profile.get("counts") if isinstance(profile, dict) else None
    lines = [
        f"{x.found_by}: model {x.model}, run {x.run_id} ({x.run_name}) in experiment {x.experiment}",
        f"  data set:        {x.dataset.get('name', 'unknown')}"
        + (f" ({', '.join(f'{k} {v}' for k, v in counts.items())} images)" if counts else ""),
        f"  data version:    {x.data_source_version}  (the data set's own: DVC hash or checksums)",
        f"  processed data:  {x.data_version}  (DVC hash of data/processed)",
        f"  git commit:      {x.git_commit}  clean: {clean}",
    ]
    if x.dvc_exp_name:
        lines.append(f"  DVC experiment:  {x.dvc_exp_name}")
    if x.model_sha256:
        lines.append(f"  model file:      SHA-256 {x.model_sha256}")
    # Per-class accuracies (test/accuracy/<class>) are in --json; the text keeps the headline figures.
    headline = {k: v for k, v in x.metrics.items() if k.count("/") == 1}
    lines.append("  test metrics:    " + (", ".join(f"{k} {v:.4f}" for k, v in headline.items()) or "none recorded"))
    lines.append("  params:          " + (", ".join(f"{k}={v}" for k, v in x.params.items()) or "none recorded"))
    if x.versions:
        lines.append("  registry:")
        for v in x.versions:
            when = _time(v["registered_ms"])
            aliases = f", alias {', '.join(v['aliases'])} now" if v["aliases"] else ", no alias now"
            tags = ", ".join(f"{k}={val}" for k, val in v["tags"].items() if k != HISTORY_TAG)
            lines.append(f"    {v['name']} version {v['version']}: registered {when}{aliases}" + (f"; tags {tags}" if tags else ""))
            lines += [f"      {entry}" for entry in v["tags"].get(HISTORY_TAG, "").splitlines()]
    else:
        lines.append("  registry:        not registered")
    if x.restore:
        lines.append("  restore (in a fresh clone):")
        lines += [f"    {step}" for step in x.restore]
    return "\n".join(lines)


def format_runs(result: dict[str, Any]) -> str:
    matched = "; ".join(f"{tag} {' or '.join(values)}" for tag, values in result["matched"].items())
    lines = [f"data {result['data']}: {len(result['runs'])} run(s) with {matched}"]
    for r in result["runs"]:
        acc = f"test/accuracy {r['test/accuracy']:.4f}" if r["test/accuracy"] is not None else "not evaluated"
        versions = f"; registered {', '.join(r['versions'])}" if r["versions"] else ""
        lines.append(f"  {r['run_id']}  {r['model']}  {_time(r['started_ms'])}  {acc}  commit "
                     f"{(r['git_commit'] or 'unknown')[:12]}{versions}")
    return "\n".join(lines)


def _time(ms: int | None) -> str:
    import datetime

    if not ms:
        return "unknown"
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    client = _client()
    if args.data is not None:
        result = runs_on(client, args.data)
        text = json.dumps(result, indent=2) if args.json else format_runs(result)
    else:
        run, found_by = resolve(client, args.handle)
        traced = lineage(client, run, found_by)
        text = json.dumps(traced.to_dict(), indent=2) if args.json else format_lineage(traced)
    sys.stdout.write(text + "\n")


def entry_point() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry_point()
