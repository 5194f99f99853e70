"""Memory: under a real cgroup memory limit, a training that cannot fit says so in one line
before it starts (it used to be SIGKILLed by the OOM killer part-way through), and one that fits
trains; the working set beyond the mapped data follows the batch sizes, not the splits."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fixtures import make_project, save_processed
from imgclf.config import CNNConfig, MLPConfig
from imgclf.data.dataset import Split
from imgclf.memory import estimate_training

pytestmark = pytest.mark.slow

GIB = 2**30
BIG_MLP = {"arch": "mlp", "hidden": [512, 256], "train": {"epochs": 1, "lr": 0.05, "augment": False}}
DEFAULT_CNN = {"arch": "cnn", "channels": [32, 64, 128, 256], "hidden": 256,
               "train": {"epochs": 1, "lr": 0.05, "augment": False}}


@pytest.fixture
def cgroup_1gib(tmp_path):
    yield from _cgroup(tmp_path, GIB)


def _cgroup(tmp_path, limit: int):
    """A child of this process's cgroup v1 memory group, limited to `limit` bytes (no swap here)."""
    line = next((x for x in Path("/proc/self/cgroup").read_text().splitlines()
                 if "memory" in x.split(":")[1].split(",")), None)
    parent = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") if line else None
    group = parent / f"imgclf-test-{os.getpid()}-{tmp_path.name}" if parent else None
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot make a cgroup v1 memory group here ({exc}); needs root and cgroup v1")
    try:
        yield group
    finally:
        group.rmdir()  # its processes have exited


def _project(tmp_path: Path, model: dict, shape: tuple[int, int, int], n: int, n_test: int | None = None):
    def params(p):
        p["train"].update(batch_size=128, threads=2)
        p["evaluate"]["batch_size"] = 1000
        p["models"] = {"m": model}
        p["mlflow"]["register_model"] = None

    project = make_project(tmp_path, params)
    rng = np.random.default_rng(0)
    splits = {name: Split(rng.integers(0, 256, (k, *shape), dtype=np.uint8), (np.arange(k) % 10).astype(np.int64))
              for name, k in (("train", n), ("val", n // 10), ("test", n_test or n // 10))}
    meta = {"dataset": "fashion_mnist", "classes": [f"c{i}" for i in range(10)], "shape": list(shape),
            "mean": [0.5] * shape[0], "std": [0.25] * shape[0], "counts": {k: len(s.labels) for k, s in splits.items()},
            "val_fraction": 0.1, "seed": 0, "augment": {"shift": 0, "flip": False}}
    (project.path / "data" / "processed").mkdir(parents=True)
    save_processed(project.path / "data" / "processed", splits, meta)
    project.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return project


def _train_in(group: Path, project, stage: str = "train") -> subprocess.CompletedProcess:
    # The shell joins the group, then becomes the stage: everything it allocates is charged there.
    return project.run("sh", "-c", f"echo $$ > {group / 'cgroup.procs'} && exec python stages/{stage}.py m",
                       check=False)


def test_a_training_that_cannot_fit_says_so_before_it_starts(tmp_path, cgroup_1gib):
    """The issue's case, 128x128 RGB images and the 25-million-weight MLP, validated 1,000 images
    at a time (evaluate.batch_size), under a 1 GiB limit: before, the OOM killer's SIGKILL."""
    project = _project(tmp_path, BIG_MLP, (3, 128, 128), 10_000)
    proc = _train_in(cgroup_1gib, project)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # -9: killed by the OOM killer
    last = proc.stderr.strip().splitlines()[-1]
    # "has" is the limit less the few KiB the group's shell may still hold: not asserted exactly.
    assert re.match(r"error: train@m needs about 1\.5 GiB of memory but has \S+ \S+ \(the cgroup memory limit "
                    r"1\.0 GiB, less [^)]* used by other processes\): ", last), last
    assert ("25,300,234 weights take 386.1 MiB, a batch of 128 (validation: 1000) 3x128x128 images "
            "562.5 MiB, the runtime 560.0 MiB; lower train.batch_size or evaluate.batch_size, the data set's "
            "image_size, or the model's size (hidden, channels), or run it with more memory") in last, last
    assert "Traceback" not in proc.stderr
    assert not (project.path / "models" / "m" / "model.pt").exists()
    assert int((cgroup_1gib / "memory.failcnt").read_text()) == 0  # it never even reached the limit


def test_the_default_model_on_the_default_shape_trains_under_the_same_limit(tmp_path, cgroup_1gib):
    """The default data set's shape (1x28x28) and the default CNN: measured peak 575 MB."""
    project = _project(tmp_path, DEFAULT_CNN, (1, 28, 28), 2000)
    proc = _train_in(cgroup_1gib, project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project.path / "models" / "m" / "model.pt").exists()
    peak = int((cgroup_1gib / "memory.max_usage_in_bytes").read_text())
    assert peak < GIB  # the group's own figure, page cache included


def test_an_evaluation_that_cannot_fit_says_so_before_it_starts(tmp_path):
    """The big MLP, trained without a limit, then evaluated 1,000 test images at a time under
    800 MiB (measured peak 981 MB): before, the OOM killer's SIGKILL."""
    project = _project(tmp_path, BIG_MLP, (3, 128, 128), 1000, n_test=1000)
    project.run("python", "stages/train.py", "m")
    for group in _cgroup(tmp_path, 800 * 2**20):
        proc = _train_in(group, project, "evaluate")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # -9: killed by the OOM killer
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: evaluate@m needs about 1\.0 GiB of memory but has \S+ \S+ \(the cgroup memory limit "
                    r"800\.0 MiB, less [^)]* used by other processes\): ", last), last
    assert last.endswith("25,300,234 weights take 193.0 MiB, a batch of 1000 3x128x128 images 377.0 MiB, the "
                         "runtime 500.0 MiB; lower evaluate.batch_size, the data set's image_size, or the model's "
                         "size (hidden, channels), or run it with more memory"), last
    assert not (project.path / "metrics" / "m" / "test.json").exists()


def test_the_estimate_follows_batch_sizes_not_split_sizes():
    mlp = MLPConfig(arch="mlp", hidden=[512, 256])
    small, large = (estimate_training(mlp, (3, 128, 128), 10, "sgd", 0.9, 128, min(1000, n)) for n in (200, 20_000))
    assert large.batch > small.batch  # a bigger validation batch (up to evaluate.batch_size) costs more ...
    assert large.total == estimate_training(mlp, (3, 128, 128), 10, "sgd", 0.9, 128, 1000).total  # ... no more
    cnn = CNNConfig(arch="cnn", channels=[32, 64, 128, 256], hidden=256)
    half = estimate_training(cnn, (3, 128, 128), 10, "sgd", 0.9, 64, 50)
    full = estimate_training(cnn, (3, 128, 128), 10, "sgd", 0.9, 128, 50)
    assert full.batch == 2 * half.batch and full.weights == half.weights
