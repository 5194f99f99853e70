"""GPU device selection and data-parallel (DDP) training: what a user running `train.device`
and `train.processes` relies on. Multi-process runs use gloo on the CPU, so they run anywhere."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fixtures import ROOT, set_params, tiny_project, toy_images
from imgclf import distributed
from imgclf.config import Augment, MLPConfig, TrainConfig
from imgclf.engine import Plan, Shard, fit
from imgclf.errors import ConfigError
from imgclf.models import build_model
from imgclf.runtime import resolve_device
from imgclf.tracking import file_sha256
from imgclf.transforms import Normalizer
from pgserver import free_port

PYTHON = sys.executable


# --- device ---------------------------------------------------------------------------------

def test_auto_device_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_config_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    message = str(err.value)
    assert message.startswith("train.device: got 'cuda': ") and "\n" not in message
    assert message.endswith("use 'auto' (CUDA when present, else CPU) or 'cpu'")


# --- sharding -------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_split_every_global_batch_exactly_once(world_size):
    for n in range(0, 40):
        parts = [Shard(rank, world_size).part(n) for rank in range(world_size)]
        taken = [i for p in parts for i in range(n)[p]]
        assert taken == list(range(n)), (n, parts)  # in order, nothing lost or repeated
        sizes = [len(range(n)[p]) for p in parts]
        assert max(sizes) - min(sizes) <= 1




# 61 images in global batches of 15 over 2 processes: every batch splits 8/7 and the last one
# (1 image) 1/0, the cases where plainly averaging the processes' mean losses would be wrong.
# (The stage insists on batch_size divisible by train.processes; the engine copes regardless.)
N_IMAGES, CFG = 61, TrainConfig(seed=0, epochs=2, batch_size=15, optimizer="sgd", lr=0.05, augment=True,
                                label_smoothing=0.1, threads=1)
ARCH = MLPConfig(arch="mlp", hidden=[16])  # no dropout, no batch norm: nothing differs by design


def _train(shard: Shard, ddp: bool):
    torch.manual_seed(CFG.seed)
    torch.set_num_threads(1)
    model = build_model(ARCH, (1, 12, 12), 4, log_probs=False)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else None
    x, y = toy_images(N_IMAGES)
    vx, vy = toy_images(20, seed=1)
    plan = Plan(CFG, Normalizer([0.2], [0.3]), augment=Augment(shift=2, flip=True), shard=shard,
                validate=shard.rank == 0, eval_batch_size=1000)
    history = fit(model, (x, y), (vx, vy), plan, train_module=net)
    return model, history


def _shard_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model, history = _train(Shard(rank, world_size), ddp=True)
    if rank == 0:
        torch.save({"weights": model.state_dict(), "train_loss": [r.train["loss"] for r in history]}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_like_one_also_on_uneven_and_empty_shards(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_shard_worker, args=(2, free_port(), str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)
    model, history = _train(Shard(), ddp=False)
    # Measured: equal to ~2e-8 (only the order of floating-point sums differs). Averaging the
    # processes' mean losses unweighted (wrong for 8/7 and 1/0 shards) moves them by ~1e-2.
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(ddp["weights"][name], weight, rtol=0, atol=1e-6)
    assert ddp["train_loss"] == pytest.approx([r.train["loss"] for r in history], abs=1e-6)


# --- launching torchrun from a stage --------------------------------------------------------

def test_torchrun_is_local_unless_its_multi_node_settings_are_in_the_environment(monkeypatch):
    for key in distributed.MULTI_NODE_ENV:
        monkeypatch.delenv(key, raising=False)
    cmd = distributed.torchrun_command(Path("stages/train.py"), ["mlp"], 2)
    assert cmd == [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "stages/train.py", "mlp"]
    monkeypatch.setenv("PET_NNODES", "2")  # torchrun reads --nnodes (and the rendezvous) from there
    assert "--standalone" not in distributed.torchrun_command(Path("stages/train.py"), ["mlp"], 2)


LAUNCHER = """
import sys
from pathlib import Path
from imgclf import cli, distributed
from imgclf.config import TrainConfig

cfg = TrainConfig(seed=0, epochs=1, batch_size=4, optimizer="sgd", lr=0.1, device="cpu", threads=1, processes=2)
cli.run(lambda: distributed.launch(Path(sys.argv[1]), sys.argv[2:], cfg))
"""

# A stand-in for the stage script under torchrun: no torch import, so each case costs little
# more than torchrun's start-up (about 3 s).
WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
# One write(2) of the whole line: print() writes the text and the newline separately to
# stderr (write-through), and two ranks' lines then interleave on a loaded machine.
os.write(2, f"rank {rank} of {os.environ['WORLD_SIZE']} writer-node={os.environ.get('IMGCLF_PIPELINE_NODE')}\\n".encode())
with open(f"pid-{rank}", "w") as f:
    f.write(str(os.getpid()))
if sys.argv[1] == "fail":
    if rank == 1:
        print("error: something a user can fix", file=sys.stderr)
        sys.exit(2)
    time.sleep(60)  # torchrun stops this one when rank 1 fails
if sys.argv[1] == "sleep":
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print(f"error: interrupted (rank {rank})", file=sys.stderr)
        sys.exit(130)
"""


def _launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("IMGCLF_DEBUG", None)
    return subprocess.Popen([PYTHON, "-c", LAUNCHER, str(tmp_path / "worker.py"), mode], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_failing_process_ends_the_stage_with_its_error_and_one_line_exit_2(tmp_path):
    proc = _launch(tmp_path, "fail")
    _, err = proc.communicate(timeout=120)
    lines = err.splitlines()
    assert proc.returncode == 2, err
    assert "error: something a user can fix" in lines
    assert lines[-1] == "error: data-parallel training failed: rank 1 exited with status 2 (its own messages are above)"
    assert "Traceback" not in err and "ChildFailedError" not in err  # torchrun's report is kept out


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_exits_130_in_one_line(tmp_path):
    proc = _launch(tmp_path, "sleep")
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # from writing their pid to their sleep
    os.kill(proc.pid, signal.SIGINT)  # the stage alone, as a terminal's Ctrl-C would reach it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # Both ran, marked as the node that runs the pipeline (so its local rank 0 writes).
    assert sorted(line for line in err.splitlines() if line.startswith("rank ")) == [
        "rank 0 of 2 writer-node=1", "rank 1 of 2 writer-node=1"]
    assert err.splitlines()[-1] == "error: interrupted; outputs of this stage were left as they were"
    assert "Traceback" not in err
    for pid_file in tmp_path.glob("pid-*"):
        with pytest.raises(ProcessLookupError):  # torchrun stopped it before it reported back
            os.kill(int(pid_file.read_text()), 0)


# --- the train stage ------------------------------------------------------------------------

def _outputs(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for d in ("models", "metrics") for p in (repo / d).rglob("*")
            if p.is_file()}


def _history(data: bytes) -> list[list[float]]:
    rows = list(csv.reader(data.decode().splitlines()))[1:]
    return [[float(v) for v in row] for row in rows]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny pipeline up to train@mlp in one process; the MLP has no dropout (so one and two
    processes are comparable closely), fp32 and the CPU (gloo) whatever the machine."""
    def ddp_ready(params):
        params["models"]["mlp"].update(dropout=0.0, train={"augment": True})  # augmentation is sharded too
        params["train"].update(precision="fp32", device="cpu")

    with tiny_project(tmp_path_factory.mktemp("ddp"), ddp_ready) as proj:
        proj.run("dvc", "repro", "train@mlp")
        proj.one_process = _outputs(proj.path)
        yield proj


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_cuda_without_a_gpu_fails_in_one_line_and_writes_nothing(project, processes):
    repo = project.path
    before = _outputs(repo)
    params = (repo / "params.yaml").read_text()
    set_params(repo, lambda p: p["train"].update(device="cuda", processes=processes))
    try:
        # No GPU visible, also on a machine that has one.
        env_hidden = {**project.env, "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([PYTHON, "stages/train.py", "mlp"], cwd=repo, env=env_hidden, capture_output=True,
                              text=True, timeout=300)
    finally:
        (repo / "params.yaml").write_text(params)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: train.device: got 'cuda': ")
    assert "Traceback" not in proc.stderr and "torch.distributed.run" not in proc.stderr  # failed before launching
    assert _outputs(repo) == before


@pytest.mark.slow
def test_two_gloo_processes_under_dvc_exp_run_match_one_and_only_rank_0_writes(project):
    import mlflow
    from mlflow import MlflowClient

    repo = project.path
    proc = project.run("dvc", "exp", "run", "-S", "train.processes=2", "train@mlp")
    log = proc.stdout + proc.stderr
    assert "Running stage 'train@mlp'" in log and "--nproc-per-node 2" in log
    # One process validates and logs: each epoch line and the summary appear once.
    assert log.count("epoch 1/3 ") == 1 and log.count("best epoch") == 1, log
    assert json.loads((repo / "metrics/mlp/timing.json").read_text())["processes"] == 2
    two = _outputs(repo)
    assert set(two) == set(project.one_process), "a stray or missing output file"

    # Measured on this tiny set: weights agree to ~3e-8 and the logged losses (6 decimals) to
    # the last digit; the tolerances leave ample room for other CPUs' orders of summation. With
    # each process drawing its own order and augmentation the weights differ by ~3e-2.
    one = torch.load(io.BytesIO(project.one_process["models/mlp/model.pt"]), weights_only=True)["state_dict"]
    for name, weight in torch.load(io.BytesIO(two["models/mlp/model.pt"]), weights_only=True)["state_dict"].items():
        torch.testing.assert_close(weight, one[name], rtol=0, atol=1e-6)
    one_history = _history(project.one_process["metrics/mlp/history.csv"])
    two_history = _history(two["metrics/mlp/history.csv"])
    assert len(two_history) == len(one_history) == 3
    for r1, r2 in zip(one_history, two_history):
        assert r2 == pytest.approx(r1, abs=2e-6)

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name("fashion-mnist-lesson")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, "only rank 0 may create an MLflow run"  # the 1-process run and this one
    ddp = next(r for r in runs if r.data.params["train.world_size"] == "2")
    assert ddp.data.params["train.batch_per_process"] == "16" and ddp.data.params["train.effective_batch"] == "32"
    assert ddp.data.params["train.device_used"] == "cpu"
    assert ddp.data.tags["model_sha256"] == file_sha256(repo / "models/mlp/model.pt")
