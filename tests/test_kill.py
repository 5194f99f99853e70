"""A training killed outright (SIGKILL: the OOM killer, a lost machine) leaves the previous
finished model, never its own unfinished best-so-far that evaluate and imgclf-predict would
take for finished; what the kill leaves behind is ignored by DVC's hashes."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from fixtures import set_params, tiny_project
from imgclf import checkpoint
from test_interrupt import MODELS, TRAIN, Watched

pytestmark = pytest.mark.slow


def test_a_killed_training_leaves_the_previous_finished_model(tmp_path):
    def interruptible(params):
        params["train"].update(TRAIN)
        params["models"] = MODELS

    with tiny_project(tmp_path, interruptible, train_per_class=300) as project:
        project.run("dvc", "repro", "train@cnn")
    repo = project.path
    model = repo / "models" / "cnn" / "model.pt"
    finished = model.read_bytes()
    assert not (model.parent / ".model.pt.partial").exists()  # a finished run moved it into place
    assert checkpoint.load(model)[1]["epoch"] >= 1

    set_params(repo, lambda p: p["train"].__setitem__("lr", 0.03))  # another run: other weights
    stage = Watched(["python", "stages/train.py", "cnn"], repo, project.env)
    stage.wait_for("epoch 1/")  # logged after the epoch's improvement was saved
    os.killpg(stage.proc.pid, signal.SIGKILL)
    assert stage.finish() == -signal.SIGKILL
    assert not any("best epoch" in line for line in stage.lines), "killed after training, not during it"

    assert model.read_bytes() == finished, "the killed run's unfinished model replaced the finished one"
    partial = model.parent / ".model.pt.partial"
    assert partial.exists() and partial.read_bytes() != finished  # the killed run's, set aside
    # DVC's own view: what a kill leaves is outside every hash (models/ is the report's dependency).
    leftovers = [str(partial.relative_to(repo)), "models/cnn/.model.pt.x1y2.tmp", "data/.processed.a1b2.tmp"]
    proc = subprocess.run(["dvc", "check-ignore", *leftovers], cwd=repo, env=project.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == leftovers, proc.stdout + proc.stderr
    assert subprocess.run(["dvc", "check-ignore", "models/cnn/model.pt"], cwd=repo, env=project.env,
                          capture_output=True, timeout=120).returncode == 1  # the real output is not ignored
