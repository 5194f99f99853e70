"""Security: no secrets in the repository, nothing phones home or listens beyond this machine,
data files cannot run code, and params.yaml cannot steer the download outside data/raw."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures import ROOT, make_fashion_like, make_project, save_processed, serve_directory
from imgclf.data.dataset import Split
from imgclf.data.download import fetch_all, fetch_one
from imgclf.errors import ConfigError

# --- a small credential scanner --------------------------------------------------------------
# Some patterns are assembled from pieces so that this file does not match them itself.

SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "private key block": re.compile("-----BEGIN [A-Z0-9 ]*" + "PRIVATE KEY-----"),
    "AWS secret key setting": re.compile("aws" + "_secret_access_key", re.IGNORECASE),
    "user:password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:(?P<secret>[^\s/@]+)@", re.IGNORECASE),
}
# Only where a line is a setting: in code or prose `password = ...` is usually not a secret.
CONFIG_PATTERNS: dict[str, re.Pattern[str]] = {
    "password setting": re.compile(r"pass" + r"word[ \t]*[:=][ \t]*(?P<secret>\S+)", re.IGNORECASE),
}
CONFIG_LIKE = re.compile(
    r"(\.(ya?ml|toml|cfg|ini|conf|env|json|properties)|(^|/)\.env(\..*)?|(^|/)\.dvc/config(\.local)?"
    r"|(^|/)\.?netrc|(^|/)\.pypirc)$"
)
# Documentation shows the shape of a URL with words like these, or takes the value from the
# environment: not secrets (`postgresql://user:password@host/db`, `password: ${DB_PASSWORD}`).
PLACEHOLDER = re.compile(
    r"[\"']?(pass(word|wd)?|secret|change[-_]?me|example|x+|\*+|<[^>]*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)[\"']?",
    re.IGNORECASE,
)


def scan_text(rel: str, text: str) -> list[str]:
    """`file:line: what` for every credential-looking match in one file's text."""
    patterns = dict(SECRET_PATTERNS)
    if CONFIG_LIKE.search(rel):
        patterns.update(CONFIG_PATTERNS)
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in patterns.items():
            for match in pattern.finditer(line):
                secret = match.groupdict().get("secret")
                if secret is None or not PLACEHOLDER.fullmatch(secret):
                    findings.append(f"{rel}:{number}: {what}")
    return findings


def repository_files() -> list[str]:
    # Tracked files plus new ones git would pick up (not ignored): what a commit would publish.
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and (ROOT / p).is_file()})


def test_scanner_flags_planted_credentials_and_spares_look_alikes():
    planted = {
        "deploy.py": "KEY = '" + "AKIA" + "Z7Q4" * 4 + "'",
        "id_rsa": "-----BEGIN " + "OPENSSH PRIVATE KEY" + "-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        "credentials.ini": "[default]\n" + "aws_secret" + "_access_key = " + "x" * 40,
        "README.md": "clone https://" + "deploy" + ":" + "hunter2" + "@git.example.org/repo.git",
        "params.yaml": "db:\n  pass" + "word: hunter2\n",
    }
    for rel, text in planted.items():
        assert scan_text(rel, text), f"the scanner misses the planted secret in {rel}"
    look_alikes = {
        "deploy.py": "KEY = 'AKIA' + 'SHORT'",
        "README.md": "open http://127.0.0.1:5000 or sqlite:///mlflow.db; user@example.org",
        "docs.md": "e.g. postgresql://user:" + "password@db-host:5432/mlflow or mysql://me:" + "***@host/db"
                   " or postgresql://mlflow:" + "change-me@localhost/mlflow",
        "settings.yaml": "pass" + "word: ${DB_PASSWORD}\n",
        "notes.py": "pass" + "word = prompt()",  # code, not a setting
        "params.yaml": "pass" + "word:\n  from_env: DB_PASS\n",  # no value on the line
    }
    for rel, text in look_alikes.items():
        assert scan_text(rel, text) == [], rel


def test_no_credentials_in_any_file_git_would_publish():
    files = repository_files()
    assert "params.yaml" in files and "src/imgclf/data/download.py" in files and len(files) > 20
    findings = []
    for rel in files:
        data = (ROOT / rel).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        findings += scan_text(rel, data.decode("utf-8", errors="replace"))
    assert findings == []


# --- nothing phones home, nothing listens beyond this machine --------------------------------

def test_dvc_analytics_is_off_in_the_committed_config():
    from configobj import ConfigObj  # what DVC itself parses .dvc/config with

    assert ".dvc/config" in repository_files()
    assert ConfigObj(str(ROOT / ".dvc" / "config"))["core"]["analytics"] == "false"


def _mlflow_ui_recipe() -> list[str]:
    # `make -n` prints the recipe with every variable expanded, and runs nothing.
    out = subprocess.run(["make", "-n", "--no-print-directory", "mlflow-ui"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    commands = [shlex.split(line) for line in out.splitlines() if " mlflow ui " in f" {line} "]
    assert len(commands) == 1, out
    return commands[0]


def test_mlflow_ui_target_listens_on_loopback_only():
    args = _mlflow_ui_recipe()
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert "0.0.0.0" not in (ROOT / "Makefile").read_text()


# A clean environment: the test process itself has these set by conftest.py.
CLEAN_ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT / "src")}


def test_an_entry_point_switches_mlflow_telemetry_off_before_mlflow_is_imported():
    code = (
        "import os, sys\n"
        "import imgclf.tracking, imgclf.runlog\n"
        "assert 'MLFLOW_DISABLE_TELEMETRY' not in os.environ  # importing the library changes nothing\n"
        "from imgclf import cli\n"
        "def main():\n"
        # Set before mlflow is imported, which is when mlflow may read it.
        "    print('mlflow' in sys.modules, os.environ.get('MLFLOW_DISABLE_TELEMETRY'), os.environ.get('DO_NOT_TRACK'))\n"
        "    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
        "    print(MLFLOW_DISABLE_TELEMETRY.get())\n"
        "cli.run(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=CLEAN_ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "true", "true", "True"]


def test_the_mlflow_ui_runs_with_telemetry_off():
    args = _mlflow_ui_recipe()
    # The recipe runs `mlflow ui` through imgclf.cli, which sets the switch first: run that
    # wrapper on `env` instead, to see the environment mlflow would get.
    wrapper = args[: args.index("mlflow")]
    assert wrapper[1:] == ["-m", "imgclf.cli"], args
    proc = subprocess.run([sys.executable, *wrapper[1:], "env"], env=CLEAN_ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    shown = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert {k: shown.get(k) for k in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")} == {
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


# --- data files cannot run code ----------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.mkdir(marker): proof, if the directory appears, that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


TINY_MLP = {
    "train": {"epochs": 1, "lr": 0.1, "batch_size": 16, "threads": 1},
    "models": {"mlp": {"arch": "mlp", "hidden": [8]}},
}


def test_train_stage_refuses_pickled_data_in_one_line_without_running_it(tmp_path):
    def tiny(params):
        params["train"].update(TINY_MLP["train"])
        params["models"] = TINY_MLP["models"]

    project = make_project(tmp_path, tiny)
    rng = np.random.default_rng(0)
    classes = [f"class{i}" for i in range(10)]
    splits = {name: Split(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10)
              for name, n in (("train", 40), ("val", 20), ("test", 20))}
    meta = {"dataset": "fashion_mnist", "classes": classes, "shape": [1, 28, 28], "mean": [0.5], "std": [0.25],
            "counts": {k: len(s.labels) for k, s in splits.items()}, "val_fraction": 0.33, "seed": 0}
    processed = project.path / "data" / "processed"
    processed.mkdir(parents=True)
    save_processed(processed, splits, meta)
    marker = tmp_path / "code-ran"
    payload = np.array([_RunsCode(marker), None], dtype=object)
    np.save(processed / "train_images.npy", payload, allow_pickle=True)

    proc = project.run("python", "stages/train.py", "mlp", check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {processed / 'train_images.npy'}: not a plain numeric .npy file ("), last
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "unpickling ran code"
    assert not (project.path / "models" / "mlp" / "model.pt").exists()


# --- params.yaml cannot steer the download elsewhere -----------------------------------------

@pytest.mark.parametrize("name", ["../escape.gz", "/etc/passwd", "sub/dir.gz", "..", ".hidden.gz", "a\nb.gz",
                                  "x.gz?y=1", ""])
def test_file_names_that_are_not_plain_are_refused_before_any_download(name, tmp_path):
    dest = tmp_path / "deep" / "raw"
    dest.mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a plain file name") as info:
        fetch_all({"t10k-labels-idx1-ubyte.gz": "0" * 64, name: "0" * 64}, [tmp_path.as_uri() + "/"], dest,
                  timeout_s=1, retries=0)
    assert str(info.value).splitlines() == [str(info.value)]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "raw"]  # nothing fetched, nothing written


def test_mirror_with_credentials_is_refused_unsent_and_masked(tmp_path):
    hits = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    checksums = make_fashion_like(tmp_path / "mirror")
    name = next(iter(checksums))
    with serve_directory(tmp_path, handler=Recorder) as url:
        with_password = url.replace("http://", "http://deploy:" + "s3cr3t-pw" + "@")
        with pytest.raises(ConfigError) as info:
            fetch_one(name, checksums[name], [url, with_password], tmp_path / "raw" / "x", timeout_s=1, retries=0)
    message = str(info.value)
    assert "s3cr3t-pw" not in message and "deploy" not in message and "***@127.0.0.1" in message
    assert hits == []  # refused before the first mirror was even tried
