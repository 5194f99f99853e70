"""REST serving: `mlflow models serve` on the registry's champion answers a batch of raw
uint8 images with the same probabilities as the local model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from fixtures import BIN
from pgserver import free_port
from test_predict import HEIGHT, WIDTH, classifier_of, make_checkpoint, register_tiny_model

REGISTERED = "serving-test-classifier"


def _wait_for_ping(proc: subprocess.Popen, url: str, log, timeout_s: float = 120) -> None:
    """Return once the scoring server answers /ping; fail with its log if it exits or stays
    silent. No skip: a server that does not start is a failure, in CI and everywhere else."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"mlflow models serve did not answer /ping in {timeout_s:.0f}s:\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    # Its own session: the signal reaches the CLI and the uvicorn server it started.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_served_champion_returns_the_local_models_probabilities(tmp_path):
    ckpt = make_checkpoint(tmp_path / "model.pt")
    store, _ = register_tiny_model(tmp_path, ckpt, REGISTERED)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ping(proc, url, log)
        images = np.random.default_rng(3).integers(0, 256, (6, 1, HEIGHT, WIDTH), dtype=np.uint8)
        images[0] = 0  # an all-black and an all-white image: the ends of the pixel range
        images[1] = 255
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        _stop(proc)
    with torch.inference_mode():
        local = classifier_of(ckpt)(torch.from_numpy(images)).numpy()
    assert served.shape == local.shape == (6, 5)
    # The same weights on the same CPU; the tolerance covers float32 sums in another process.
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
    assert len(set(local.argmax(axis=1))) > 1  # the batch is told apart, so a mixed-up row would show
