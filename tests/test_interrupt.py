"""Interrupted runs: a stage killed outright (SIGKILL, as by the OOM killer or a lost machine)
or stopped with Ctrl-C leaves every output either absent or whole, no temporary file behind,
and the next `dvc repro` finishes the work and leaves the pipeline up to date."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fixtures import set_params, tiny_project
from imgclf import checkpoint
from imgclf.training import HISTORY_COLUMNS

pytestmark = pytest.mark.slow

# 3,000 training images and a small CNN: half a second an epoch on one thread, so after the
# first epoch's log line there is well over a second of training left to interrupt, and the
# three pipeline runs this file needs stay quick (process start-up and MLflow dominate them).
TRAIN = {"epochs": 4, "batch_size": 32, "lr": 0.05, "threads": 1}
MODELS = {"cnn": {"arch": "cnn", "channels": [16, 32], "hidden": 64, "dropout": 0.1}}
OUTPUT_DIRS = ("data", "models", "metrics", "reports")
INTERRUPTED = "error: interrupted; outputs of this stage were left as they were"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    def interruptible(params):
        params["train"].update(TRAIN)
        params["models"] = MODELS
        params["evaluate"].update(batch_size=500, top_misclassified=2)
        params["report"].update(samples_per_class=1, prediction_grid=4)

    with tiny_project(tmp_path_factory.mktemp("interrupt"), interruptible, train_per_class=300) as proj:
        proj.run("dvc", "repro")
        yield proj


class Watched:
    """A child process in its own process group, its merged output read as it comes."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._seen = threading.Event()
        self._wanted = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._wanted and self._wanted in line:
                self._seen.set()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        self._wanted = text
        if any(text in line for line in self.lines):
            return
        if not self._seen.wait(timeout):
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"{text!r} never appeared; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 120) -> int:
        returncode = self.proc.wait(timeout)
        self._reader.join(10)
        return returncode


def _group_alive(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies do not count)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


def assert_outputs_absent_or_whole(repo: Path) -> None:
    leftovers = [str(p.relative_to(repo)) for d in OUTPUT_DIRS for p in (repo / d).rglob("*")
                 if ".tmp" in p.name or p.name.endswith((".old", ".download"))]
    assert leftovers == [], "temporary files left behind"
    for model in (repo / "models").rglob("*.pt"):
        checkpoint.load(model)  # a truncated or half-written file raises DataError
    for metric in (repo / "metrics").rglob("*.json"):
        json.loads(metric.read_text())
    for history in (repo / "metrics").rglob("history.csv"):
        rows = list(csv.reader(history.read_text().splitlines()))
        assert tuple(rows[0]) == HISTORY_COLUMNS and all(len(r) == len(HISTORY_COLUMNS) for r in rows[1:])


def test_ctrl_c_during_training_exits_130_in_one_line(project):
    stage = Watched(["python", "stages/train.py", "cnn"], project.path, project.env)
    stage.wait_for("epoch 1/")
    os.kill(stage.proc.pid, signal.SIGINT)
    assert stage.finish() == 130, "\n".join(stage.lines)
    assert not any("best epoch" in line for line in stage.lines), "interrupted after training, not during it"
    assert stage.lines[-1] == INTERRUPTED
    assert not any("Traceback" in line for line in stage.lines), "\n".join(stage.lines)
    assert_outputs_absent_or_whole(project.path)


def test_sigkill_of_dvc_repro_during_training_then_repro_recovers(project):
    repo = project.path
    set_params(repo, lambda p: p["train"].__setitem__("lr", 0.03))
    repro = Watched(["dvc", "repro"], repo, project.env)
    repro.wait_for("epoch 1/")
    os.killpg(repro.proc.pid, signal.SIGKILL)  # dvc, its shell and the stage: no chance to clean up
    assert repro.finish() == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _group_alive(repro.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_alive(repro.proc.pid) == [], "a process of the killed run is still writing"
    assert "Running stage 'train@cnn'" in "\n".join(repro.lines)
    assert not any("best epoch" in line for line in repro.lines), "killed after training, not during it"

    assert_outputs_absent_or_whole(repo)
    out = project.run("dvc", "repro").stdout
    assert "Running stage 'train@cnn'" in out
    assert "Data and pipelines are up to date" in project.run("dvc", "status").stdout
    assert_outputs_absent_or_whole(repo)
    assert json.loads((repo / "metrics/cnn/train.json").read_text())["epochs"] == TRAIN["epochs"]
