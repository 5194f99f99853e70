"""`imgclf-data-diff` on a real DVC repository: two versions of an image folder preprocessed
from real PNG files, their manifests pushed to a local remote, and the diff read in a fresh
clone that has only git and the remote."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf import datadiff
from imgclf.data import folder

ENV_GIT = ["-c", "user.name=t", "-c", "user.email=t@example.org"]
CLASSES = ("boot", "coat", "shirt")


def run(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", *ENV_GIT, *args)


def picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)


def preprocess(repo: Path) -> None:
    """The manifest preprocess writes for the folder (the rest of data/processed does not matter here)."""
    plan = folder.ReadPlan(shape=(1, 12, 12), resize="pad", val_fraction=0.2, test_fraction=0.2,
                           test_fraction_given=False, seed=42, skip_bad=False, workers=1)
    data = folder.read_tree(folder.scan_folder(repo / "data" / "images" / "mine"), plan)
    out = repo / "data" / "processed"
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").write_text(data.manifest)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """A repository with a commit before any data, v1 (60 images), and v2: 3 added, 2 removed,
    1 relabelled (coat/007.png moved to shirt/); both pushed to a local remote."""
    base = tmp_path_factory.mktemp("datadiff")
    repo, remote = base / "repo", base / "remote"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "no data yet")
    images = repo / "data" / "images" / "mine"
    for k, c in enumerate(CLASSES):
        for i in range(20):
            picture(images / c / f"{i:03d}.png", 100 * k + i)
    preprocess(repo)
    dvc(repo, "add", "-q", "data/processed")
    dvc(repo, "push", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    for i in (20, 21):
        picture(images / "boot" / f"{i:03d}.png", 900 + i)
    picture(images / "shirt" / "020.png", 999)
    (images / "coat" / "000.png").unlink()
    (images / "shirt" / "019.png").unlink()
    shutil.move(images / "coat" / "007.png", images / "shirt" / "from-coat.png")
    preprocess(repo)
    dvc(repo, "add", "-q", "data/processed")
    dvc(repo, "push", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v2")
    fresh = base / "fresh"
    git(base, "clone", "-q", str(repo), str(fresh))
    return {"repo": repo, "fresh": fresh, "remote": remote, "base": base}


def test_a_hand_made_change_is_reported_exactly_from_a_fresh_clone(versions):
    fresh = versions["fresh"]
    assert not (fresh / "data" / "processed").exists()  # nothing but git: the manifests come from the remote
    result = datadiff.compare("HEAD~1", "HEAD", fresh)
    assert result["changes"] == {
        "boot": {"added": 2},
        "coat": {"removed": 1, "relabelled_out": 1},
        "shirt": {"added": 1, "removed": 1, "relabelled_in": 1},
    }
    assert result["relabelled"] == [{"path": "shirt/from-coat.png", "from": "coat", "to": "shirt"}]
    assert result["moved_split"] == []
    old, new = result["counts"]["old"], result["counts"]["new"]
    assert {c: sum(v.values()) for c, v in old.items()} == {"boot": 20, "coat": 20, "shirt": 20}
    assert {c: sum(v.values()) for c, v in new.items()} == {"boot": 22, "coat": 18, "shirt": 21}
    text = datadiff.format_diff(result)
    assert "  coat: 1 removed, 1 relabelled out" in text
    assert "    relabelled: shirt/from-coat.png (coat -> shirt)" in text and "WARNING" not in text


def test_the_working_tree_is_the_default_new_version(versions):
    result = datadiff.compare("HEAD~1", None, versions["repo"])
    assert result["new"] == "working tree" and result["changes"]["boot"] == {"added": 2}
    assert datadiff.compare("HEAD", None, versions["repo"])["changes"] == {}


def test_a_changed_split_seed_is_said_loudly():
    old = {"a": datadiff.Image("x/1.png", "x", "train"), "b": datadiff.Image("x/2.png", "x", "test")}
    new = {"a": datadiff.Image("x/1.png", "x", "test"), "b": datadiff.Image("x/2.png", "x", "test")}
    result = {"old": "v1", "new": "v2", **datadiff.diff(old, new)}
    assert result["changes"] == {"x": {"moved_split": 1}}
    assert "WARNING: 1 image(s) changed split (e.g. x/1.png: train -> test)" in datadiff.format_diff(result)


def _error(cwd: Path, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "imgclf.datadiff", *argv], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp",
                               "PYTHONPATH": str(Path(datadiff.__file__).parents[1])}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_revisions_and_an_unreachable_remote_are_one_line_each(versions):
    fresh = versions["fresh"]
    assert "no-such-rev: not a git revision of this repository" in \
        _error(versions["repo"], "no-such-rev", "HEAD", "--repo", ".")
    assert "HEAD~2: has no data/processed/manifest.csv" in _error(versions["repo"], "HEAD~2", "HEAD", "--repo", ".")
    # A clone whose remote has gone: the manifests cannot be fetched.
    gone = versions["base"] / "gone"
    git(versions["base"], "clone", "-q", str(versions["repo"]), str(gone))
    dvc(gone, "remote", "modify", "local", "url", str(versions["base"] / "no-such-remote"))
    line = _error(gone, "HEAD~1", "HEAD", "--repo", ".")
    assert "HEAD~1: could not fetch data/processed/manifest.csv from the DVC cache or remote" in line, line
    assert not (gone / "data" / "processed").exists()  # nothing written
    assert not (fresh / "data" / "processed").exists()
