"""Working as a team: identical results from identical inputs, DVC's run cache, and sharing
data, models and run cache through a DVC remote (a local directory and a real SSH server).

One tiny pipeline is trained once per module (`trained`, ~30 s); every test that changes
something works on its own copy of it, so the tests do not depend on their order. The second
from-scratch run the reproducibility test needs is the session's tiny pipeline build
(tests/builds.py), which test_pipeline.py works on a copy of.
docs/team.md describes the workflow these tests exercise, with DVC's messages.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from builds import tiny_pipeline
from fixtures import ROOT, TINY, Project, set_params, tiny_project
from imgclf.dvcfiles import stages_in
from remotes import (
    UP_TO_DATE,
    Published,
    check_teammate_is_ready,
    commit_all,
    copy_project,
    lock_outs,
    output,
    publish,
    teammate,
)
from sshd import SSHDUnavailable, start_sshd

pytestmark = pytest.mark.slow

# Both models: a pull that misses one model's file must still bring the other's.
MODELS = tuple(TINY["models"])
ALL_STAGES = {"validate", "download", "preprocess", "report", *(f"{s}@{m}" for s in ("train", "evaluate") for m in MODELS)}
# Outputs that hold wall-clock timings or MLflow run ids by design; everything else is
# a pure function of code, params, data and thread count.
VARY_BY_DESIGN = {*(f"metrics/{m}/timing.json" for m in MODELS), "reports/report.html", "reports/report.md"}
EXPERIMENT = "fashion-mnist-lesson"
TEAM_DOC = ROOT / "docs" / "team.md"

# DVC 3.67's messages, as docs/team.md quotes them.
NO_REMOTE = "No remote provided and no default remote set."
CHECKOUT_FAILED = "Checkout failed for following targets:"
MISSING_CACHE = "Some of the cache files do not exist neither locally nor on remote. Missing cache files:"


def _documented(*messages: str) -> None:
    text = TEAM_DOC.read_text()
    missing = [m for m in messages if m not in text]
    assert not missing, f"docs/team.md no longer quotes DVC's message(s): {missing}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny pipeline, run once and committed (dvc.lock, git-tracked metrics, .gitignores)."""
    with tiny_project(tmp_path_factory.mktemp("team")) as proj:
        assert proj.repro() == ALL_STAGES
        commit_all(proj, "trained")
        yield proj


# 1. Exact reproducibility ---------------------------------------------------------------

def test_two_runs_from_scratch_record_identical_output_hashes(trained, tmp_path_factory):
    # The other run: the session's tiny pipeline build (tests/builds.py), its own copy, cache
    # and MLflow store, as its first `dvc repro` left it; only the loopback mirror's URL differs.
    other = tiny_pipeline(tmp_path_factory, MODELS)
    assert other.ran == ALL_STAGES
    first_outs, second_outs = lock_outs(trained.path), other.outs
    assert set(first_outs) == set(second_outs)
    assert VARY_BY_DESIGN <= set(first_outs)
    assert len(first_outs) >= 20  # every stage's outs, not a handful
    # The same thread count in both, as the claim requires.
    trained_threads = {m: json.loads((trained.path / f"metrics/{m}/timing.json").read_text())["threads"] for m in MODELS}
    assert trained_threads == other.threads == {m: TINY["train"]["threads"] for m in MODELS}
    differing = sorted(p for p in first_outs if p not in VARY_BY_DESIGN and first_outs[p] != second_outs[p])
    assert not differing, "outputs differ between two from-scratch runs with the same params and threads:\n" + \
        "\n".join(f"  {p}: {first_outs[p]} != {second_outs[p]}" for p in differing)


# 2. The run cache -----------------------------------------------------------------------

# The model whose param the run-cache cycle changes and changes back (the other one's stages
# are untouched by it: the cache works stage by stage).
CYCLED = "cnn"


@dataclass
class RunCacheCycle:
    project: Project
    changed: str   # output of `dvc repro` after changing CYCLED's hidden width
    restored: str  # output of `dvc repro` after changing it back


@pytest.fixture(scope="module")
def run_cache_cycle(trained, tmp_path_factory):
    proj = copy_project(trained, tmp_path_factory.mktemp("runcache") / "repo")
    hidden = yaml.safe_load((proj.path / "params.yaml").read_text())["models"][CYCLED]["hidden"]
    set_params(proj.path, lambda p: p["models"][CYCLED].__setitem__("hidden", hidden // 2))
    changed = output(proj.run("dvc", "repro"))
    set_params(proj.path, lambda p: p["models"][CYCLED].__setitem__("hidden", hidden))
    restored = output(proj.run("dvc", "repro"))
    return RunCacheCycle(proj, changed, restored)


def test_reverted_param_restores_trained_models_from_run_cache(run_cache_cycle, trained):
    import mlflow

    from imgclf.tracking import file_sha256, find_run

    cycle = run_cache_cycle
    # The change itself retrained: this is what a training run looks like in the log.
    assert f"Running stage 'train@{CYCLED}'" in cycle.changed
    assert "epoch 1/" in cycle.changed
    # Changing it back trains nothing: DVC checks the earlier outputs out of its run cache.
    assert f"Stage 'train@{CYCLED}' is cached - skipping run, checking out outputs" in cycle.restored, \
        cycle.restored
    assert "Running stage 'train@" not in cycle.restored, cycle.restored
    assert "epoch 1/" not in cycle.restored, cycle.restored
    # `make bench` reads the same two kinds of line to tell a rerun from a restore.
    assert stages_in(cycle.changed)["ran"] == sorted(["validate", f"train@{CYCLED}", f"evaluate@{CYCLED}", "report"]), \
        cycle.changed
    assert stages_in(cycle.changed)["restored_from_run_cache"] == []
    assert f"train@{CYCLED}" in stages_in(cycle.restored)["restored_from_run_cache"], cycle.restored
    assert not {f"train@{m}" for m in MODELS} & set(stages_in(cycle.restored)["ran"])
    assert UP_TO_DATE in cycle.project.run("dvc", "status").stdout

    mlflow.set_tracking_uri(cycle.project.env["MLFLOW_TRACKING_URI"])
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    hidden = yaml.safe_load((trained.path / "params.yaml").read_text())["models"][CYCLED]["hidden"]
    for model in MODELS:  # the restored model and the untouched one alike
        model_path = cycle.project.path / f"models/{model}/model.pt"
        assert model_path.read_bytes() == (trained.path / f"models/{model}/model.pt").read_bytes()
        sha = file_sha256(model_path)
        run = find_run(experiment_id, sha)
        assert run is not None, f"no MLflow run has model_sha256={sha} for the restored {model} model"
        assert run.data.tags["model_sha256"] == sha
        if model == CYCLED:
            assert run.data.params["model.hidden"] == str(hidden)  # the original run, not the narrower one


def test_reverted_param_restores_evaluation_from_run_cache(run_cache_cycle):
    # DVC (dvc/stage/__init__.py, Stage.run) never saves a stage to the run cache when one of
    # its plain `outs` (not metrics, not plots) has `cache: false`. evaluate@<model> declares
    # misclassified.json and confusion.json that way in dvc.yaml, so it reruns here instead.
    assert f"Stage 'evaluate@{CYCLED}' is cached - skipping run, checking out outputs" in run_cache_cycle.restored, (
        f"evaluate@{CYCLED} was not restored from the run cache: dvc.yaml declares plain outs with "
        "`cache: false` (metrics/<model>/misclassified.json, confusion.json), which keeps DVC from saving "
        "the stage to its run cache. Output:\n" + run_cache_cycle.restored
    )


# 3. Remotes -----------------------------------------------------------------------------

def _files_under(storage: Path) -> list[str]:
    return [str(p.relative_to(storage)) for p in storage.rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def local_remote(trained, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local-remote")
    storage = workdir / "storage"
    return publish(trained, workdir, str(storage), {}, storage, lambda: _files_under(storage))


@pytest.fixture(scope="module")
def sshd_server(request, tmp_path_factory):
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
    except SSHDUnavailable as exc:
        # CI (and any root Debian machine) always runs it; elsewhere say what is missing.
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no OpenSSH server can be started here: {exc}")
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def ssh_remote(trained, sshd_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ssh-remote")
    storage = workdir / "storage"
    private = {"user": sshd_server.user, "port": str(sshd_server.port), "keyfile": str(sshd_server.keyfile)}
    published = publish(trained, workdir, f"ssh://{sshd_server.host}{storage}", private, storage,
                        lambda: _files_under(storage))
    assert "Accepted publickey for root" in sshd_server.log_text(), sshd_server.log_text()
    return published


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_teammate_clones_and_pulls_everything_ready_to_use(kind, request, tmp_path):
    published: Published = request.getfixturevalue(f"{kind}_remote")
    alice = published.alice
    bob = teammate(alice, tmp_path / "bob")
    assert not (bob.path / "models/cnn/model.pt").exists()  # a clone has no data of its own

    bob.run("dvc", "pull", "--run-cache")
    check_teammate_is_ready(alice, bob)
    if kind == "ssh":
        server = request.getfixturevalue("sshd_server")
        assert server.log_text().count("Accepted publickey for root") >= 2  # alice's push, bob's pull


def test_pull_with_no_remote_configured_fails_and_says_so(trained, tmp_path):
    carol = teammate(trained, tmp_path / "carol")  # the repository before anyone added a remote
    proc = carol.run("dvc", "pull", check=False)
    out = output(proc)
    assert proc.returncode != 0, out
    assert NO_REMOTE in out, out
    assert CHECKOUT_FAILED in out and "models/cnn/model.pt" in out, out
    _documented(NO_REMOTE, CHECKOUT_FAILED)

    # `make pull` runs the same pull, then says in one line what is missing and what to run.
    proc = carol.run("python", "-m", "imgclf.pull", check=False)
    assert proc.returncode == 2, output(proc)
    assert NO_REMOTE in proc.stderr  # DVC's own output still passes through
    last = proc.stderr.strip().splitlines()[-1]
    missing = [p for p in lock_outs(trained.path) if not (carol.path / p).exists()]
    assert "models/cnn/model.pt" in missing and "metrics/cnn/test.json" not in missing  # git brought metrics
    assert last.startswith(f"error: dvc pull: no DVC remote is configured, so {len(missing)} outputs are missing ("), last
    assert "`dvc remote add -d team <url>`" in last and "`dvc repro`" in last, last
    _documented("make pull")


def test_pull_from_a_remote_missing_an_object_names_the_output(local_remote, tmp_path):
    # A copy of the team's storage with one object gone, as after an incomplete push.
    damaged = tmp_path / "damaged-storage"
    shutil.copytree(local_remote.storage, damaged)
    md5 = lock_outs(local_remote.alice.path)["models/cnn/model.pt"]
    obj = damaged / "files" / "md5" / md5[:2] / md5[2:]
    assert obj.is_file()
    obj.unlink()

    dave = teammate(local_remote.alice, tmp_path / "dave")
    dave.run("dvc", "remote", "modify", "--local", "team", "url", str(damaged))
    proc = dave.run("dvc", "pull", check=False)
    out = output(proc)
    assert proc.returncode != 0, out
    assert MISSING_CACHE in out and f"md5: {md5}" in out, out
    assert CHECKOUT_FAILED in out, out
    failed = out.split(CHECKOUT_FAILED, 1)[1].split("Is your cache up to date?", 1)[0].split()
    assert failed == ["models/cnn/model.pt"], out
    assert not (dave.path / "models/cnn/model.pt").exists()
    assert (dave.path / "models/mlp/model.pt").exists()  # everything else still arrived
    _documented(MISSING_CACHE, CHECKOUT_FAILED)

    proc = dave.run("python", "-m", "imgclf.pull", check=False)
    assert proc.returncode == 2, output(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dvc pull: remote 'team' did not deliver models/cnn/model.pt (stage train@cnn): "), last
    assert "`dvc push --run-cache`" in last and last.endswith("`dvc repro train@cnn`"), last
