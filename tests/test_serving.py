"""REST serving: `mlflow models serve` on the registry's champion answers a batch of raw
uint8 images with the same probabilities as the local model."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from fixtures import BIN, stop_session, wait_until_serving
from pgserver import free_port
from test_predict import HEIGHT, WIDTH, classifier_of, make_checkpoint, register_tiny_model

REGISTERED = "serving-test-classifier"


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
        wait_until_serving(proc, url, log, what="mlflow models serve", path="/ping", expect=None,
                           timeout_s=120)
        images = np.random.default_rng(3).integers(0, 256, (6, 1, HEIGHT, WIDTH), dtype=np.uint8)
        images[0] = 0  # an all-black and an all-white image: the ends of the pixel range
        images[1] = 255
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        stop_session(proc, timeout_s=20)
    with torch.inference_mode():
        local = classifier_of(ckpt)(torch.from_numpy(images)).numpy()
    assert served.shape == local.shape == (6, 5)
    # The same weights on the same CPU; the tolerance covers float32 sums in another process.
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
    assert len(set(local.argmax(axis=1))) > 1  # the batch is told apart, so a mixed-up row would show
