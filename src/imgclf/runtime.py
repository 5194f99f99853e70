"""Where and how the computation runs: device, precision, threads, determinism, data placement.

Every such choice is made here, once, from `train.*` params; the loops in imgclf.engine only
carry them out.
"""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from imgclf.errors import ConfigError


def pick_threads(requested: int) -> int:
    """`requested`, or when 0 the CPUs this process may run on (cgroup/affinity aware)."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def deterministic_cuda_env() -> None:
    # cuBLAS reads this when it creates its first handle: without it some CUDA matmuls give
    # run-to-run different sums, and use_deterministic_algorithms raises on them. So it is set
    # before any CUDA work; a value the user set (e.g. :16:8, less memory) is kept.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def configure(seed: int, threads: int, deterministic: bool = True) -> None:
    """Seed, thread count and kernel choice for this process.

    With `deterministic`: same seed, params, code, data, thread count and device -> the same
    bytes out. Without it, cuDNN may pick its fastest kernels by timing them (cudnn.benchmark),
    which varies run to run; the CPU path computes the same either way.
    """
    if deterministic:
        deterministic_cuda_env()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # The same switch as torch.use_deterministic_algorithms, which also sets torch.compile's
    # (inductor's) flag and so imports the compiler: 2.5 s at every stage start. The engine
    # does not compile (README, "Benchmark").
    torch.set_deterministic_debug_mode("error" if deterministic else "default")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def resolve_device(requested: str, index: int = 0) -> torch.device:
    """`train.device` as a torch device: 'auto' is CUDA (GPU `index`) when PyTorch sees one, else
    the CPU; 'cuda' without a GPU is a ConfigError rather than a silent fall-back."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", index)
    if requested == "cuda":
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "PyTorch sees no CUDA GPU on this machine")
        raise ConfigError(f"train.device: got 'cuda': {why}; use 'auto' (CUDA when present, else CPU) or 'cpu'")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """'cpu' or e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)', for timing.json and MLflow."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def describe_machine() -> str:
    """The CPU architecture and model, for timings that are only comparable on like machines."""
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """'fp32' or 'bf16'; 'auto' picks bf16 where the device computes it natively (CPUs with
    AVX512-BF16/AMX, GPUs from Ampere on)."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        what = "GPU" if torch.device(device).type == "cuda" else "CPU"
        raise ConfigError(f"train.precision: got 'bf16': this {what} has no native bf16 support; use 'fp32' or 'auto'")
    return precision


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Of the GPU memory free when training starts, the share the data set may take on the device;
# the rest is for the model, its activations and the optimizer.
DEVICE_DATA_SHARE = 0.5


def place(array: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A split's tensor where its batches are gathered.

    On the CPU the tensor itself (memory-mapped from disk, so the page cache holds what fits).
    On a GPU the whole split once when it fits in DEVICE_DATA_SHARE of free memory (gathering
    a batch there is then free); otherwise it stays on the CPU and each batch is copied over as
    it is gathered (imgclf.engine moves batches to the model's device).
    """
    if device.type != "cuda":
        return array
    free, _ = torch.cuda.mem_get_info(device)
    if array.element_size() * array.nelement() <= DEVICE_DATA_SHARE * free:
        return array.to(device)
    return array
