"""The disk: outputs get the modes the umask allows; on a real 2 MiB tmpfs, preprocess refuses
to start without the space it will write, a disk that fills anyway or is read-only is one line
(never SIGBUS from a mapped output, never a traceback), and the previous outputs stay while no
scratch file is left behind."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
ENV.pop("IMGCLF_DEBUG", None)


def _python(code: str, umask: int | None = None) -> subprocess.CompletedProcess:
    prefix = f"import os; os.umask(0o{umask:o})\n" if umask is not None else ""
    return subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=300,
                          env=ENV)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o077, 0o600, 0o700), (0o022, 0o644, 0o755),
                                                        (0o002, 0o664, 0o775)])
def test_outputs_get_the_modes_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    code = (
        "from pathlib import Path\n"
        "from imgclf.atomic import atomic_dir, write_text\n"
        f"out = Path({str(tmp_path)!r})\n"
        "write_text(out / 'metrics.json', '{}')\n"
        "with atomic_dir(out / 'processed') as tmp:\n"
        "    write_text(tmp / 'meta.json', '{}')\n"
    )
    proc = _python(code, umask)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "processed").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "processed" / "meta.json").stat().st_mode) == file_mode


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (root mounts one; elsewhere the test cannot be made, and says so)."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}); these tests need root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _images(root: Path, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())


def _preprocess(tmp_path: Path, disk: Path, *, skip_free_space_check: bool = False) -> subprocess.CompletedProcess:
    """What stages/preprocess.py does (write_processed into atomic_dir, under cli.run), with its
    output on `disk` and 120 images of 3x64x64 (1.4 MiB of splits, as much again of scratch)."""
    _images(tmp_path / "data" / "images" / "pets")
    code = (
        "from pathlib import Path\n"
        "from imgclf import cli\n"
        "from imgclf.atomic import atomic_dir\n"
        "from imgclf.config import DatasetConfig, PreprocessConfig\n"
        "from imgclf.data import folder\n"
        "from imgclf.data.prepare import write_processed\n"
        + ("folder.require_free = lambda *a: None  # as if another writer filled the disk after the check\n"
           if skip_free_space_check else "")
        + f"root, disk = Path({str(tmp_path)!r}), Path({str(disk)!r})\n"
        "ds = DatasetConfig(folder='data/images/pets', image_size=[64, 64], channels=3)\n"
        "def main():\n"
        "    with atomic_dir(disk / 'processed') as tmp:\n"
        "        write_processed(tmp, 'pets', ds, PreprocessConfig(val_fraction=0.2, seed=0), root / 'raw', root,\n"
        "                        workers=1)\n"
        "cli.run(main)\n"
    )
    return _python(code)


def _previous_output(disk: Path) -> Path:
    meta = disk / "processed" / "meta.json"
    meta.parent.mkdir()
    meta.write_text('{"previous": true}')
    return meta


def _left(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))


def test_preprocess_refuses_to_start_without_the_space_it_will_write(tmp_path, small_disk):
    meta = _previous_output(small_disk)
    proc = _preprocess(tmp_path, small_disk)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {small_disk}: 2.0 MiB free, but preprocessing 120 images of 3x64x64 needs about 3.8 MiB; free "
        "space there or move the project to a larger disk (the previous outputs are as they were)")
    assert meta.read_text() == '{"previous": true}' and _left(small_disk) == ["processed", "processed/meta.json"]


def test_a_disk_that_fills_during_preprocess_is_one_line_not_sigbus(tmp_path, small_disk):
    meta = _previous_output(small_disk)
    proc = _preprocess(tmp_path, small_disk, skip_free_space_check=True)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # -7 would be SIGBUS
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar's
    assert "Traceback" not in proc.stderr
    assert last.startswith(f"error: {small_disk}/") and last.endswith(
        ": no space left on the device (No space left on device); free space there and rerun (the previous "
        "outputs are as they were, nothing half-written is left)"), last
    assert meta.read_text() == '{"previous": true}' and _left(small_disk) == ["processed", "processed/meta.json"]


def test_a_read_only_disk_is_one_line(tmp_path, small_disk):
    meta = _previous_output(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc = _preprocess(tmp_path, small_disk)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1:] == [
        f"error: {small_disk}: cannot write there (Read-only file system); make it writable and rerun "
        "(the previous outputs are as they were)"]
    assert meta.read_text() == '{"previous": true}'


def test_a_model_that_does_not_fit_on_the_disk_leaves_the_previous_one(tmp_path, small_disk):
    model = small_disk / "models" / "mlp" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"the previous model")
    code = (
        "from pathlib import Path\n"
        "from imgclf import checkpoint, cli\n"
        "from imgclf.config import MLPConfig\n"
        "from imgclf.models import build_model\n"
        "cfg = MLPConfig(arch='mlp', hidden=[256])\n"
        "net = build_model(cfg, (3, 32, 32), 10, log_probs=False)  # 3 MiB of weights\n"
        "meta = {'shape': [3, 32, 32], 'classes': list('abcdefghij'), 'mean': [0.5] * 3, 'std': [0.2] * 3}\n"
        f"cli.run(lambda: checkpoint.save(Path({str(model)!r}), net, cfg=cfg, meta=meta, loss='cross_entropy',"
        " extra={}))\n"
    )
    proc = _python(code)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {model}: no space left on the device (No space left on device); free space there and rerun "
        "(the previous outputs are as they were, nothing half-written is left)"]
    assert model.read_bytes() == b"the previous model"
    assert _left(small_disk) == ["models", "models/mlp", "models/mlp/model.pt"]
