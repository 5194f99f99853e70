"""Queued DVC experiments (`dvc exp run --queue` + `dvc queue start -j 2`) and the check that
each one left a complete, correct set of MLflow runs, wherever the runs were logged (the
project's SQLite store in test_registry.py, the team server in test_tracking_server.py)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time

import pytest

from fixtures import TINY, Project

EXPERIMENT = "fashion-mnist-lesson"


def wait_for_queue(project: Project, names: list[str], limit_s: float = 420) -> str:
    """Wait until the queued experiments `names` have run and nothing is queued or running;
    return the last `dvc queue status` table."""
    deadline = time.monotonic() + limit_s
    # Each `dvc queue status` is a DVC process of its own, seconds of CPU taken from the
    # experiments: first follow each one's log (`dvc queue logs -f` returns when it has
    # finished, sleeping in between), then poll the status table for the rest (results
    # collected into the workspace's repository).
    for name in names:
        while time.monotonic() < deadline:
            try:
                proc = subprocess.run(["dvc", "queue", "logs", "-f", name], cwd=project.path, env=project.env,
                                      capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            if proc.returncode == 0 or "has not been started" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)  # not picked up by a worker yet
    while True:
        status = project.run("dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"queued experiments still running after {limit_s:.0f}s:\n{status}")
        time.sleep(3)


def start_workers(project: Project, jobs: int) -> None:
    """`dvc queue start -j jobs`, returning once the workers are started. Not Project.run: the
    workers inherit the command's stdout and stderr, so capturing them through pipes would wait
    until the workers exit, which their idle monitor makes them do ~15 s after the queue
    empties (measured: 43 s for a queue whose runs had ended after 30)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=project.path, env=project.env,
                              stdout=log, stderr=subprocess.STDOUT, text=True, timeout=120)
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, f"dvc queue start failed ({proc.returncode}):\n{output}"
    assert f"Started '{jobs}' new experiments task queue workers" in output, output


def failure_logs(project: Project, status: str) -> str:
    """The status table plus the output of every failed task, for the assertion message."""
    logs = [status]
    for line in status.splitlines():
        if "Failed" in line:
            task = line.split()[0]
            logs.append(project.run("dvc", "queue", "logs", task, check=False).stdout[-4000:])
    return "\n".join(logs)


def run_queued(project: Project, lrs: tuple[str, ...]) -> dict[str, float]:
    """Queue one experiment per train.lr, run them two at a time; return {name: lr} as
    `dvc exp show` reports them."""
    names = []
    for lr in lrs:
        out = project.run("dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}").stdout
        names += re.findall(r"Queued experiment '([^']+)' for future execution", out)
    assert len(names) == len(lrs), names
    try:
        start_workers(project, 2)
        status = wait_for_queue(project, names)
    finally:
        # Idle workers would linger ~15 s (start_workers); --kill also ends a task the wait gave up on.
        project.run("dvc", "queue", "stop", "--kill", check=False)
    assert "Failed" not in status, failure_logs(project, status)
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                params = rev["data"]["params"]["params.yaml"]["data"]
                found[exp["name"]] = params["train"]["lr"]
    assert sorted(found.values()) == sorted(float(lr) for lr in lrs), found
    return found


def check_experiment_runs(client, experiments: dict[str, float], models: tuple[str, ...], registered: str,
                          accuracy_tag: str) -> None:
    """Every experiment has one run per model in `models` with its own lr, every epoch's metrics,
    the test accuracy, the report and one logged model; its cnn is a registry version with its
    accuracy."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    epochs = TINY["train"]["epochs"]
    registered_runs = {v.run_id: v for v in client.search_model_versions(f"name = '{registered}'")}
    for exp_name, lr in experiments.items():
        runs = client.search_runs([experiment.experiment_id], f"tags.dvc_exp_name = '{exp_name}'")
        assert sorted(r.data.tags["model_name"] for r in runs) == sorted(models), exp_name
        for run in runs:
            model = run.data.tags["model_name"]
            expected_lr = lr if model == "cnn" else TINY["models"]["mlp"]["train"].get("lr", lr)
            assert float(run.data.params["train.lr"]) == pytest.approx(expected_lr), (exp_name, model)
            for metric in ("train/loss", "val/loss", "val/accuracy"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
                assert steps == list(range(1, epochs + 1)), (exp_name, model, metric)
            assert 0 <= run.data.metrics["test/accuracy"] <= 1, (exp_name, model)
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
            assert "report/report.html" in artifacts, (exp_name, model)
            logged = client.search_logged_models([experiment.experiment_id],
                                                 filter_string=f"source_run_id = '{run.info.run_id}'")
            assert len(logged) == 1, (exp_name, model)
            if model == "cnn":
                version = registered_runs[run.info.run_id]
                assert float(version.tags[accuracy_tag]) == pytest.approx(run.data.metrics["test/accuracy"])
