"""Data-parallel training with PyTorch DDP under `torchrun`.

The train stage's command stays `python stages/train.py <model>`. With `train.processes: N > 1`
and no torchrun around it, the stage starts `python -m torch.distributed.run --nproc-per-node N`
on itself (`launch`) and waits. Each of the N processes then joins the process group (gloo on
the CPU, NCCL on GPUs, one GPU per process: `session`) and trains on its shard of every global
batch (imgclf.engine.Shard).

`train.batch_size` is the global batch: with N processes each takes batch_size / N images per
step and DDP averages their gradients, so a step sees the same images, and the same learning
rate applies, whatever N is. Differences from one process, by design of DDP:
- batch-norm layers normalize with each process's own batch statistics (not SyncBatchNorm);
  their running averages are rank 0's, which DDP copies to every process before each forward
  pass;
- dropout draws its masks from a generator seeded per rank (seed + rank), so processes do not
  drop the same units of different images; rank 0 keeps the single-process stream.
Without dropout and batch norm, N processes reproduce one process's weights up to the order of
floating-point sums (tests/test_distributed.py states the tolerance).

Multi-node (docs/distributed.md): users start torchrun themselves on the other nodes. Exactly
one process writes outputs and talks to MLflow: local rank 0 of the node whose torchrun this
module started (the node running `dvc repro`), else global rank 0. c10d rendezvous orders nodes
by host name, so global rank 0 may well be on another node.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imgclf.config import TrainConfig
from imgclf.engine import Shard
from imgclf.errors import ConfigError, TrainingError
from imgclf.runtime import deterministic_cuda_env, pick_threads, resolve_device

log = logging.getLogger(__name__)

# Set by `launch` for the torchrun it starts: the node that runs the pipeline writes its outputs.
PIPELINE_NODE_ENV = "IMGCLF_PIPELINE_NODE"
# torchrun's own environment forms of its flags (PET_NNODES is --nnodes, ...): set on the node
# that runs `dvc repro`, they make the stage join a multi-node job instead of a local one.
MULTI_NODE_ENV = ("PET_NNODES", "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_MASTER_ADDR")


@dataclass(frozen=True)
class Context:
    """This process's place in the job; a single process is rank 0 of 1."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    writer: int = 0  # the global rank that validates, writes outputs and logs to MLflow

    @property
    def is_writer(self) -> bool:
        return self.rank == self.writer

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def threads(self, requested: int) -> int:
        """`train.threads` per process, or when 0 this node's CPUs shared among its processes."""
        return requested if requested > 0 else max(1, pick_threads(0) // self.local_world_size)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def multi_node() -> bool:
    return any(os.environ.get(k) for k in MULTI_NODE_ENV)


def needs_launch(processes: int) -> bool:
    """True when this process should start torchrun rather than train itself: several
    processes here, or this node's share (even one process) of a multi-node job."""
    return not under_torchrun() and (processes > 1 or multi_node())


def check_devices(cfg: TrainConfig) -> torch.device:
    """The device kind the processes will use, and enough GPUs for one per process."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.processes > torch.cuda.device_count():
        raise ConfigError(f"train.processes: got {cfg.processes}: this machine has {torch.cuda.device_count()} "
                          "CUDA GPU(s) and DDP uses one per process; use at most that many, or train.device: cpu")
    return device


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.isdigit():
        raise ConfigError(f"{name} is {value!r} in the environment: start data-parallel training with torchrun, "
                          "which sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE")
    return int(value)


@contextlib.contextmanager
def session(cfg: TrainConfig) -> Iterator[Context]:
    """The process group for this process's lifetime, or a 1-process context outside torchrun.

    On success every process meets at a barrier (the writer has finished its outputs) and the
    group is destroyed. On an error the process just fails: torchrun then stops the others.
    """
    if cfg.deterministic:
        deterministic_cuda_env()  # before the first CUDA call, which may be just below
    if not under_torchrun():
        yield Context(device=resolve_device(cfg.device))
        return
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank, local_world = _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE")
    if local_world != cfg.processes:
        raise ConfigError(f"train.processes: got {cfg.processes}, but torchrun started {local_world} processes "
                          "on this node (--nproc-per-node); make them equal")
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size: got {cfg.batch_size}: it does not split evenly across the "
                          f"{world} processes of this job ({world // local_world} node(s) x {local_world}); "
                          f"use a multiple of {world}")
    device = check_devices(cfg)
    if world == 1:
        yield Context(device=device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    ctx = Context(device, rank, world, local_rank, local_world, writer=_elect_writer(rank, local_rank))
    log.debug("rank %d of %d on %s (%s); rank %d writes", rank, world, socket.gethostname(), device, ctx.writer)
    yield ctx
    barrier(ctx)
    dist.destroy_process_group()


def _elect_writer(rank: int, local_rank: int) -> int:
    flagged = os.environ.get(PIPELINE_NODE_ENV) == "1" and local_rank == 0
    everyone: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(everyone, flagged)
    writers = [r for r, f in enumerate(everyone) if f]
    if len(writers) > 1:
        raise ConfigError(f"{len(writers)} nodes started this job from the pipeline (dvc repro or dvc exp run); "
                          "run it on one node and plain torchrun on the others (see docs/distributed.md)")
    return writers[0] if writers else 0


def check_same_inputs(ctx: Context, **inputs: Sequence[Any]) -> None:
    """Fail on every process when processes disagree on any input (params, data): a node with a
    stale checkout or without `dvc pull` would otherwise train silently on other data."""
    if ctx.world_size == 1:
        return
    mine = {}
    for key, parts in inputs.items():
        digest = hashlib.sha256()
        for part in parts:  # bytes or C-contiguous arrays, hashed without a copy
            digest.update(part)
        mine[key] = digest.hexdigest()
    everyone: list[tuple[str, dict[str, str]] | None] = [None] * ctx.world_size
    dist.all_gather_object(everyone, (socket.gethostname(), mine))
    host0, ref = everyone[ctx.writer]
    for rank, (host, theirs) in enumerate(everyone):
        differ = sorted(k for k in ref if theirs.get(k) != ref[k])
        if differ:
            raise ConfigError(f"rank {rank} on {host} has different {' and '.join(differ)} from rank {ctx.writer} "
                              f"on {host0}: check out the same commit and `dvc pull` the data on every node")


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The DDP wrapper that averages gradients across processes; the model itself on one."""
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


# --- launching torchrun from the stage -------------------------------------------------------

def torchrun_command(script: Path, args: list[str], processes: int) -> list[str]:
    """The same interpreter running torchrun on the stage script: local, unless torchrun's
    multi-node settings are in the environment (then it takes them from there)."""
    standalone = [] if multi_node() else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *standalone, "--nproc-per-node", str(processes),
            str(script), *args]


def _die_with_parent() -> None:
    # torchrun runs in its own session (see `launch`), so a SIGKILL of the stage's process group
    # (DVC killed, machine out of memory) would not reach it: ask Linux to send it SIGTERM when
    # the stage dies; torchrun then stops its workers. Runs in the child between fork and exec.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# torchrun's own log lines: glog style, with its process id (workers' lines carry theirs).
_GLOG = r"^[IWEF]\d{{4}} [\d:.]+\s+{pid} "


class _TorchrunOutput:
    """Passes the workers' output through; keeps torchrun's failure report (a traceback and a
    summary table) out of the stage's output, reading from it what failed."""

    def __init__(self, pid: int, verbose: bool):
        self.own_line = re.compile(_GLOG.format(pid=pid).encode())
        self.verbose = verbose
        self.quiet = False
        self.held: list[str] = []
        self.errors: set[bytes] = set()

    def feed(self, raw: bytes) -> None:
        own = self.own_line.match(raw) is not None
        if own and (raw[:1] in b"EF" or b"death signal" in raw or b"closing signal" in raw):
            self.quiet = True  # torchrun is tearing the job down: what follows is its report
        if self.quiet or own and raw[:1] != b"I":
            self.held.append(raw.decode("utf-8", "replace").rstrip())
        if raw.startswith(b"error: ") and not self.verbose:
            if raw in self.errors:
                return  # every process stops on the same non-finite loss: say it once
            self.errors.add(raw)
        if self.verbose or not self.quiet:
            sys.stderr.buffer.write(raw)
            sys.stderr.buffer.flush()

    def failure(self, returncode: int) -> str:
        text = "\n".join(self.held)
        root = text.split("Root Cause", 1)[1] if "Root Cause" in text else ""
        rank = re.search(r"\brank\s*:\s*(\d+)", root)
        status = re.search(r"exitcode\s*:\s*(-?\d+)", root)
        if rank and status:
            code = int(status.group(1))
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            return f"data-parallel training failed: rank {rank.group(1)} {how} (its own messages are above)"
        last = next((line.strip() for line in reversed(self.held) if line.strip()), "no message")
        return f"data-parallel training failed: torchrun exited with status {returncode} ({last})"


def launch(script: Path, args: list[str], cfg: TrainConfig) -> None:
    """Run the stage script under torchrun with `train.processes` workers on this node and wait.

    A worker's failure becomes one TrainingError line (exit 2); Ctrl-C is passed on to torchrun,
    which stops every worker, and ends here as KeyboardInterrupt (exit 130).
    """
    device = check_devices(cfg)
    threads = Context(device, local_world_size=cfg.processes).threads(cfg.threads)
    cmd = torchrun_command(script, args, cfg.processes)
    env = {**os.environ, PIPELINE_NODE_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun otherwise sets 1 and prints a banner
    log.info("data-parallel training: %d process(es) on this node (%s): %s", cfg.processes, device.type,
             shlex.join(cmd))
    # Its own session: a Ctrl-C in the terminal reaches this process alone, which passes it on
    # once (a second SIGINT while torchrun shuts its workers down would abort the shutdown).
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_die_with_parent)
    output = _TorchrunOutput(proc.pid, verbose=bool(os.environ.get("IMGCLF_DEBUG")))
    interrupted = False
    while True:
        try:
            for raw in proc.stderr:
                output.feed(raw)
            proc.wait()
            break
        except KeyboardInterrupt:
            if not interrupted:
                interrupted = output.quiet = True
                proc.send_signal(signal.SIGINT)  # torchrun sends it to every worker and waits for them
    if interrupted:
        raise KeyboardInterrupt
    if proc.returncode:
        raise TrainingError(output.failure(proc.returncode))
