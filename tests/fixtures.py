"""Tiny real-format data sets and a loopback HTTP server, shared by the tests."""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.server
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from imgclf.atomic import write_json
from imgclf.data import idx
from imgclf.data.dataset import Split, write_split
from imgclf.dvcfiles import stages_in
from imgclf.schema import dvc_plots

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def learnable_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Noisy images whose class is visible: class k lights up a band at rows 2k..2k+3."""
    images = rng.integers(0, 60, size=(len(labels), size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 2 : 2 * k + 6, 4:24] = rng.integers(180, 256, dtype=np.uint8)
    return images


def make_fashion_like(directory: Path, train_per_class: int = 30, test_per_class: int = 10, seed: int = 0) -> dict[str, str]:
    """Write the four gzip IDX files of a tiny 10-class data set; return {file: content sha256}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = learnable_images(labels, rng)
        for kind, array in (("images", images), ("labels", labels)):
            name = FASHION_FILES[f"{split}_{kind}"]
            content = idx.encode(array)
            # mtime=0: the bytes of the fixture do not depend on when the test ran.
            (directory / name).write_bytes(gzip.compress(content, mtime=0))
            checksums[name] = hashlib.sha256(content).hexdigest()
    return checksums


def save_processed(out_dir: Path, splits: dict[str, Split], meta: dict) -> None:
    """Write arrays as a processed data set (each split's .npy files, meta.json), the layout
    the preprocess stage writes, for tests that start from processed data."""
    for name, split in splits.items():
        write_split(out_dir, name, split.images, split.labels)
    write_json(out_dir / "meta.json", meta)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def serve_directory(directory: Path | None, handler: type[http.server.BaseHTTPRequestHandler] | None = None,
                    poll_interval: float = 0.05) -> Iterator[str]:
    """Serve `directory` (or answer with `handler`) on 127.0.0.1 at a free port; yield the base URL."""
    if handler is None:
        class handler(_QuietHandler):  # type: ignore[no-redef]
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits up to one interval, once per server per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        outputs = rel.startswith(("data/", "models/", "metrics/", "reports/")) and not rel.startswith("data/images/")
        if not src.is_file() or outputs or rel == "dvc.lock":
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def set_params(repo: Path, update) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    update(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def plots_follow_models(repo: Path) -> None:
    """Rewrite dvc.yaml's top-level plots (its last section) for the keys under `models` in
    repo's params.yaml, as a user who changes those keys does (tests/test_dvc_yaml.py holds the
    repository's own dvc.yaml to the same rule)."""
    text = (repo / "dvc.yaml").read_text()
    head = text[: text.index("\nplots:\n") + 1]
    models = list(yaml.safe_load((repo / "params.yaml").read_text())["models"])
    (repo / "dvc.yaml").write_text(head + yaml.safe_dump({"plots": dvc_plots(models)}, sort_keys=False))


class Project:
    def __init__(self, path: Path, env: dict[str, str]):
        self.path, self.env = path, env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    @property
    def models(self) -> tuple[str, ...]:
        """The model keys in this copy's params.yaml: one train@ and one evaluate@ stage each."""
        return tuple(yaml.safe_load((self.path / "params.yaml").read_text())["models"])

    def repro(self) -> set[str]:
        """Run `dvc repro`; return the names of the stages that actually ran."""
        return set(stages_in(self.run("dvc", "repro").stdout)["ran"])


def make_project(base: Path, update_params) -> Project:
    """A git-committed copy of this repository under base/repo, with params adjusted and
    its own MLflow store, ready for `dvc repro`."""
    repo = base / "repo"
    repo.mkdir()
    copy_repo(repo)
    set_params(repo, update_params)
    plots_follow_models(repo)
    env = project_env(base)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "test copy"], cwd=repo, env=env, check=True)
    return Project(repo, env)


def project_env(base: Path) -> dict[str, str]:
    """The environment of the project in base/repo: this interpreter first, the copy's own
    code and its own MLflow store (base/mlflow.db), a git identity."""
    repo = base / "repo"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # `python -m imgclf.<tool>` in the copy runs the copy's code, not whatever checkout the
        # environment's editable install points at (the stages see to this with _bootstrap).
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")])),
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    env.pop("IMGCLF_DEBUG", None)
    return env


# Params that make the whole pipeline run in about 50 s on the tiny data set (both models, 2 cores).
TINY = {
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "threads": 1},
    "models": {
        "mlp": {"arch": "mlp", "hidden": [32], "dropout": 0.1, "train": {"augment": False}},
        "cnn": {"arch": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.1},
    },
    "evaluate": {"batch_size": 200, "top_misclassified": 5},
    "report": {"samples_per_class": 2, "prediction_grid": 12},
}
# Each model adds a train and an evaluate stage, ~40% of a tiny pipeline's time (process
# start-up: torch, MLflow). Tests of one run's journey (tracking server, registry, S3, the UI,
# image folders) train only the CNN; tests of what happens across models (which stages rerun,
# a partial pull) keep both.
ONE_MODEL = ("cnn",)


@contextmanager
def tiny_project(base: Path, extra=None, train_per_class: int = 30,
                 models: tuple[str, ...] = tuple(TINY["models"])) -> Iterator[Project]:
    """A copy of this repository set up for the tiny data set (TINY params for `models`, mirrors
    pointing at a loopback server that serves it while the block runs). `extra(params)` adjusts
    further."""
    mirror = base / "mirror"
    checksums = make_fashion_like(mirror, train_per_class=train_per_class)
    with serve_directory(mirror) as url:
        def tiny(params):
            params["download"].update(dataset="fashion_mnist", retries=0)
            params["datasets"]["fashion_mnist"].update(mirrors=[url], files=checksums)
            # Copies: an `extra` that edits a model's entry must not edit TINY for the tests after it.
            params["train"].update(copy.deepcopy(TINY["train"]))
            params.update({k: copy.deepcopy(TINY[k]) for k in ("evaluate", "report")})
            params["models"] = {name: copy.deepcopy(TINY["models"][name]) for name in models}
            if extra is not None:
                extra(params)

        yield make_project(base, tiny)


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, *, what: str = "mlflow server",
                       path: str = "/health", expect: bytes | None = b"OK", timeout_s: float = 180,
                       context: ssl.SSLContext | None = None) -> None:
    """Return once the server started as `proc` answers GET `path` (with body `expect`, when
    given; over HTTPS, trusting what `context` trusts); fail with its log if it exits or stays
    silent. Never skips: a server that does not start is a failure, in CI and everywhere else."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=5, context=context) as response:
                if response.status == 200 and (expect is None or response.read().strip() == expect):
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not answer {path} in {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def wait_for_mlflow(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180) -> None:
    """Return once the MLflow server started as `proc` answers /health."""
    wait_until_serving(proc, url, log, timeout_s=timeout_s)


def stop_session(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a server started with start_new_session=True: the signal reaches its whole
    process group (mlflow and the uvicorn workers it starts), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def toy_images(n: int = 64, seed: int = 0):
    """n noisy 12x12 uint8 images in 4 classes, each class a bright bar in its own rows: a
    problem a few epochs of any model learn, for engine tests that need no real data."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 40, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for i, k in enumerate(y):
        x[i, 0, 3 * k : 3 * k + 2, 2:10] = 220
    return x, y
