"""The benchmark labels its figures with the kernels they were measured with, not only the CPU."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bench/pipeline.py is a tool, not a package module: load it by path, as `make bench` runs it.
PROBE = """
import importlib.util, json
spec = importlib.util.spec_from_file_location("bench_pipeline", "bench/pipeline.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps({"kernels": module.kernel_info(), "bf16": module.bf16_supported()}))
"""


def _kernels(**forced: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, **forced},
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 kernels exist only on x86-64")
def test_forced_avx2_kernels_are_recorded_as_avx2_and_as_forced():
    forced = _kernels(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert forced["kernels"] == {"aten": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert forced["bf16"] is False  # so precision auto trains such a run in fp32, as on an AVX2-only CPU


def test_unforced_kernels_are_the_cpus_own_and_name_no_override():
    own = _kernels()["kernels"]
    assert set(own) == {"aten"}
    # The values torch.backends.cpu.get_cpu_capability documents.
    assert own["aten"] in {"DEFAULT", "NO AVX", "AVX2", "AVX512", "Z VECTOR", "VSX", "SVE256"}, own
