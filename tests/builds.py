"""Costly test inputs built once per test session, by whichever test file asks first.

A session fixture alone is built once per pytest-xdist worker. `build_once` builds under a
file lock in the directory the session's workers share (the pattern pytest-xdist documents
for session-scoped fixtures); the other workers wait for it, then reuse it. Only files can be
shared so, never a server (it dies with the worker that started it), and what a test changes
must be its own copy (`copy_built_project`), since another file may read the same build at
the same time. A build must not ask for another build (two workers could wait on each other).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from fixtures import TINY, Project, project_env, tiny_project
from imgclf.atomic import write_json
from remotes import lock_outs

DONE = "built.json"  # written last: a build without it failed part-way and is built again


def shared_temp(tmp_path_factory) -> Path:
    """The temporary directory of this test session, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    # A worker's basetemp is <session's>/popen-gw<N>; without xdist it is the session's own.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, config: object, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Run `build(directory)` once per session for this `config` (any JSON value) and return
    (directory, what `build` returned). Never change anything in the directory."""
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    directory = shared_temp(tmp_path_factory) / f"{name}-{key}"
    with FileLock(f"{directory}.lock"):
        if not (directory / DONE).is_file():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            write_json(directory / DONE, build(directory))
    return directory, json.loads((directory / DONE).read_text())


@dataclass(frozen=True)
class TinyPipeline:
    """The tiny pipeline's first `dvc repro` from scratch, and what it left."""
    base: Path  # base/repo: the project; base/mlflow.db: its MLflow store
    ran: frozenset[str]  # the stages that ran
    outs: dict[str, str]  # dvc.lock's output hashes
    threads: dict[str, int]  # {model: the thread count it trained with}


def tiny_pipeline(tmp_path_factory, models: tuple[str, ...] = tuple(TINY["models"])) -> TinyPipeline:
    """The tiny pipeline (TINY params for `models`) run once from scratch in this session."""
    def build(base: Path) -> dict:
        with tiny_project(base, models=models) as proj:
            ran = proj.repro()
            threads = {m: json.loads((proj.path / f"metrics/{m}/timing.json").read_text())["threads"] for m in models}
            return {"ran": sorted(ran), "outs": lock_outs(proj.path), "threads": threads}

    base, built = build_once(tmp_path_factory, "tiny-pipeline", {"tiny": TINY, "models": models}, build)
    return TinyPipeline(base, frozenset(built["ran"]), built["outs"], built["threads"])


def copy_built_project(built: Path, dest: Path) -> Project:
    """A project of its own made from a built one (`tiny_project`'s layout: built/repo with git,
    outputs, DVC cache and MLflow artifacts; built/mlflow.db). The MLflow store names its
    artifacts by absolute path: the copy's names its own. The data mirror is not served: a
    stage that downloads again fails."""
    shutil.copytree(built, dest, symlinks=True, ignore=shutil.ignore_patterns(DONE))
    with closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?1, ?2) '
                           f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?1) > 0', (str(built), str(dest)))
    return Project(dest / "repo", project_env(dest))
