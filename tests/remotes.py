"""Sharing a trained project through a DVC remote, whatever the storage (a directory, SSH, S3):
publish it from one workspace, clone it as a teammate, and check the teammate has everything.
Shared by test_team.py and test_s3.py."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fixtures import Project, git

UP_TO_DATE = "Data and pipelines are up to date."  # DVC 3.67's `dvc status`, as docs/team.md quotes it


def output(proc) -> str:
    return proc.stdout + proc.stderr


def commit_all(project: Project, message: str) -> None:
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", message)
    assert git(project.path, "status", "--porcelain") == "", "something was left uncommitted"


def copy_project(project: Project, dest: Path) -> Project:
    """A full copy of a workspace (git history, outputs, .dvc/cache with its run cache)."""
    shutil.copytree(project.path, dest, symlinks=True)
    return Project(dest, project.env)


def lock_outs(repo: Path) -> dict[str, str]:
    """{output path: hash} for every `outs` entry of every stage in dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def teammate(origin: Project, dest: Path, env: dict[str, str] | None = None) -> Project:
    """What a new teammate does: clone the repository, then put the remote's credentials
    (handed over privately, never committed) into their own .dvc/config.local."""
    git(origin.path.parent, "clone", "-q", str(origin.path), str(dest))
    private = origin.path / ".dvc" / "config.local"
    if private.exists():
        shutil.copy2(private, dest / ".dvc" / "config.local")
    return Project(dest, origin.env if env is None else env)


def run_cache_entries(repo: Path) -> list[str]:
    runs = repo / ".dvc" / "cache" / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file()) if runs.exists() else []


@dataclass
class Published:
    alice: Project   # the workspace that trained and pushed
    storage: object  # where the remote keeps its objects (a Path on this machine, or a bucket)
    push: str


def publish(trained: Project, workdir: Path, url: str, private: dict[str, str], storage: object,
            stored: Callable[[], list[str]], shared: dict[str, str] | None = None) -> Published:
    """Copy `trained` to workdir/alice, add the remote `team` (`shared` settings committed,
    `private` ones in config.local only), commit, and `dvc push --run-cache`. `stored()` lists
    the remote's object paths relative to `url`, to check that data and run cache both arrived."""
    alice = copy_project(trained, workdir / "alice")
    alice.run("dvc", "remote", "add", "-d", "team", url)
    for key, value in (shared or {}).items():
        alice.run("dvc", "remote", "modify", "team", key, value)
    for key, value in private.items():
        alice.run("dvc", "remote", "modify", "--local", "team", key, value)
    commit_all(alice, "add the team's DVC remote")

    tracked = git(alice.path, "ls-files").splitlines()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked, tracked
    committed = (alice.path / ".dvc" / "config").read_text()
    assert "remote = team" in committed and url in committed
    for key in private:
        assert f"{key} =" not in committed, f"{key} leaked into the committed .dvc/config:\n{committed}"
    if private:
        local = (alice.path / ".dvc" / "config.local").read_text()
        assert all(f"{key} = {value}" in local for key, value in private.items()), local
    if "keyfile" in private:
        assert private["keyfile"] not in committed

    push = output(alice.run("dvc", "push", "--run-cache"))
    objects = stored()
    assert any(p.startswith("files/md5/") for p in objects), push
    assert any(p.startswith("runs/") for p in objects), push  # --run-cache sent the run cache too
    return Published(alice, storage, push)


def check_teammate_is_ready(alice: Project, bob: Project) -> None:
    """After a pull, bob's clone is alice's workspace: nothing to reproduce, the same results
    byte for byte, the same dvc.lock and the same run cache."""
    assert UP_TO_DATE in bob.run("dvc", "status").stdout
    assert bob.repro() == set()
    compared = sorted(p.relative_to(alice.path) for p in alice.path.glob("metrics/*/test.json"))
    compared.append(Path("reports/report.md"))
    assert len(compared) == len(alice.models) + 1
    for rel in compared:
        assert (bob.path / rel).read_bytes() == (alice.path / rel).read_bytes(), rel
    assert lock_outs(bob.path) == lock_outs(alice.path)
    assert run_cache_entries(bob.path) == run_cache_entries(alice.path) != []
