"""`make bench-scale`: how preprocessing, training and DVC cost grow with the data (docs/scale.md).

    python bench/scale.py [--images N] [--side 64] [--out FILE] [--skip-dvc]

Prints one JSON document (and writes it to --out, default .bench/scale/scale.json):

- `machine`: CPU model and flags (avx512_bf16, AMX), cores this process may use, memory,
  versions; every measurement also records the load averages before and after it, since
  this machine's CPUs may be shared.
- `preprocess`: images/s and peak memory of the real preprocess stage on Fashion-MNIST as
  70,000 PNG files in class folders (and as one tar archive of them), and on a generated
  data set of 64x64 RGB JPEG files at 1x and 4x size (37,500 and 150,000 images), each run in
  its own memory cgroup under the same limit (320 MB, a fifth of the 4x output): memory grows
  by well under a tenth of the data (bookkeeping per image) while the time grows linearly.
- `train`: the real train stage on the 4x set (1.76 GB processed), reading the processed
  splits into memory vs memory-mapped (page cache warm), and memory-mapped under a cgroup
  limit of half the processed arrays (page cache emptied first, so every page is read under
  the limit); the checkpoint and metrics must be byte-identical across the three.
- `near_duplicates`: what near-duplicate detection (imgclf.data.neardup) and the blank-image
  check add to the real preprocess stage on the generated 1x and 4x sets: the stage with no
  checks, with the blank-image check only and with both (as shipped), interleaved, in the same
  memory limit; the share of the stage's time each takes, and what each adds to peak memory
  per image next to the rest of the bookkeeping and the manifest's bytes per image; and how
  well copies are told from other pictures on Fashion-MNIST's test images (`detection`).
  `--near-duplicates-only` runs just this section.
- `dvc`: `dvc add`, `dvc status` with nothing changed, `dvc push` / `dvc pull` through a local
  remote, and `dvc add` / `dvc push` after 1% more images, for the 70,000-file folder with
  DVC's defaults, with the settings docs/scale.md recommends, and as one tar archive.

Everything runs in scratch projects under .bench/scale/ (git-ignored), made of copies of this
checkout's src/ and stages/, so the stages measured are this checkout's; the generated data
sets stay in .bench/scale/data for the next run (`rm -rf .bench/scale` to reclaim ~2 GB).
Memory limits use a child of this process's cgroup v1 memory controller (root needed);
without one the runs happen unlimited, peaks come from getrusage, and the limited run is
reported as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "scale"
PY = sys.executable
MB = 1 << 20

FASHION_IMAGES = 70_000
# 1x; 4x is four times: 150,000 64x64 RGB images, 1.76 GB processed, twice a limit of ~880 MB,
# over what the train stage itself needs (torch and MLflow: 600-800 MB of anonymous memory).
SYNTH_1X = 37_500
PRE_LIMIT_MB = 320  # preprocess: a fifth of the 4x output, over one run's own needs
TRAIN_HEADROOM_MB = 96  # page cache the limited run has at the least, beyond its own peak
# One model that trains fast, so the data path shows: an MLP over the 12,288 inputs, one epoch.
MODEL = {"mlp": {"arch": "mlp", "hidden": [16]}}
TRAIN = {"seed": 0, "epochs": 1, "batch_size": 512, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "weight_decay": 0.0005, "schedule": "onecycle", "warmup_fraction": 0.2, "label_smoothing": 0.0,
         "augment": False, "loss": "cross_entropy", "precision": "fp32", "threads": 0,
         "device": "cpu", "deterministic": True, "processes": 1}
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


# --- the machine ------------------------------------------------------------------------------

def _pipeline():
    """bench/pipeline.py, home of the CPU's generation and the commit a record names. Loaded
    when asked: it imports torch, which the preprocess runs measured here must not pay for."""
    sys.path.insert(0, str(ROOT / "bench"))
    import pipeline

    return pipeline


def machine() -> dict:
    model, flags = "unknown", set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    lscpu_model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    versions = {}
    for name in ("numpy", "PIL", "torch", "dvc"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    return {
        "cpu_model": lscpu_model.group(1).strip() if lscpu_model else model,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": sorted(f for f in flags if f.startswith("amx")),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "memory_gb": round(int(mem.group(1)) / (1 << 20), 1) if mem else None,
        "swap": Path("/proc/swaps").read_text().count("\n") > 1,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "cgroup_v1_memory": cgroup_root() is not None,
        **_pipeline().cpu_generation(),
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- memory cgroups (v1) -----------------------------------------------------------------------

def cgroup_root() -> Path | None:
    """This process's own memory cgroup, if it is v1 and we may make children in it."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x)
    except (OSError, StopIteration):
        return None
    path = CGROUP_V1 / line.split(":", 2)[2].lstrip("/")
    return path if os.access(path, os.W_OK) and (path / "memory.limit_in_bytes").exists() else None


class Group:
    """A child memory cgroup: a limit (on memory, and on memory+swap where swap exists, so
    nothing is swapped out instead of reclaimed), peaks and counters of what ran in it."""

    def __init__(self, limit_mb: int | None) -> None:
        root = cgroup_root()
        self.path = None if root is None else root / f"imgclf-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.limit_mb = limit_mb
        self.peak_anon = 0
        self._stop = threading.Event()

    def __enter__(self) -> Group:
        if self.path is None:
            return self
        self.path.mkdir()
        if self.limit_mb is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_mb * MB))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(self.limit_mb * MB))
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self._stop.set()
            for _ in range(50):  # the last task may take a moment to leave
                try:
                    self.path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)

    def stat(self) -> dict[str, int]:
        lines = (self.path / "memory.stat").read_text().split("\n")
        return {k: int(v) for k, v in (line.split() for line in lines if line)}

    def read(self, name: str) -> int:
        return int((self.path / name).read_text())

    def watch(self) -> None:
        # The kernel keeps the peak of all memory charged (page cache included), not of the
        # anonymous part, the memory that cannot be reclaimed: sample that one.
        while not self._stop.wait(0.05):
            try:
                self.peak_anon = max(self.peak_anon, self.stat()["total_rss"])
            except (OSError, KeyError):
                return

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, entering this group first (a shell moves itself in, then execs `cmd`): the
        command and everything it starts are charged here from their first page."""
        if self.path is None:
            return cmd
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]


def measure(cmd: list[str], cwd: Path, limit_mb: int | None = None, env: dict | None = None,
            keep_stdout: bool = False) -> dict:
    """Run `cmd` in its own memory cgroup; wall time, exit status and memory figures."""
    before = load()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Group(limit_mb) as group:
        watcher = None
        if group.path is not None:
            watcher = threading.Thread(target=group.watch, daemon=True)
            watcher.start()
        started = time.perf_counter()
        proc = subprocess.run(group.wrap(cmd), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
        result = {"seconds": round(seconds, 2), "rc": proc.returncode, "load_before": before, "load_after": load()}
        if group.path is not None:
            stat = group.stat()
            group._stop.set()
            watcher.join()
            # peak_charged: the kernel's peak of all memory charged (page cache included, so it
            # reaches a limit whenever the run touches more data than that). The anonymous peak
            # is sampled. (memory.failcnt stays 0 on this kernel even when the limit is reached.)
            result.update(limit_mb=limit_mb, peak_anon_mb=round(group.peak_anon / MB, 1),
                          peak_charged_mb=round(group.read("memory.max_usage_in_bytes") / MB, 1),
                          page_faults=stat.get("total_pgfault"), major_faults=stat.get("total_pgmajfault"))
        else:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            result.update(limit_mb=None, peak_rss_mb=round(max(usage.ru_maxrss, usage_before.ru_maxrss) / 1024, 1))
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
    if keep_stdout:
        result["stdout"] = proc.stdout
    return result


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache, so a limited run must read (and be charged
    for) every page itself: pages cached by an earlier process stay charged to its cgroup."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_mb(paths: list[Path]) -> float | None:
    """Megabytes of these files in the page cache (util-linux fincore), if it can tell."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True)
    return round(sum(int(x) for x in out.stdout.split()) / MB, 1) if out.returncode == 0 else None


def warm(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as fh:
            while fh.read(16 * MB):
                pass


# --- data sets --------------------------------------------------------------------------------

def _synthetic_chunk(job: tuple[Path, int, int, int, int]) -> None:
    """Images first..first+n of the generated set: class k is a disk of hue k/10 on noise,
    placed and sized at random, so a model has something to learn and JPEG something to do."""
    out, first, n, side, classes = job
    rng = np.random.default_rng(first)
    yy, xx = np.mgrid[0:side, 0:side]
    hsv = np.array([[[255 * k // classes, 200, 230] for k in range(classes)]], dtype=np.uint8)
    colours = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))[0]
    for i in range(first, first + n):
        k = i % classes
        pixels = rng.integers(0, 96, (side, side, 3), dtype=np.uint8)
        cy, cx = rng.integers(side // 4, 3 * side // 4, 2)
        r = rng.integers(side // 8, side // 3)
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colours[k]
        Image.fromarray(pixels, "RGB").save(out / f"c{k}" / f"{i:07d}.jpg", quality=90)


def make_synthetic(out: Path, n: int, side: int, classes: int = 10) -> float:
    """n generated JPEG files in class folders (deterministic); seconds taken."""
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for k in range(classes):
        (tmp / f"c{k}").mkdir(parents=True)
    step = 1000
    with Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(_synthetic_chunk, [(tmp, f, min(step, n - f), side, classes) for f in range(0, n, step)])
    tmp.rename(out)
    return round(time.perf_counter() - started, 1)


def link_subset(src: Path, out: Path, fraction: float) -> None:
    """The first `fraction` of each class folder of src, as hard links (same bytes, no copy)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (tmp / cls.name).mkdir(parents=True)
        for f in files[: int(len(files) * fraction)]:
            os.link(f, tmp / cls.name / f.name)
    tmp.rename(out)


def make_fashion(out: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([PY, "-m", "imgclf.data.sample", "--all", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: python -m imgclf.data.sample failed: {proc.stderr.strip().splitlines()[-1:]}")
    return round(time.perf_counter() - started, 1)


def make_tar(folder: Path, out: Path) -> float:
    """An uncompressed tar of the folder (PNG is compressed already), members sorted, so the
    same folder always gives the same bytes."""
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(path, arcname=f"{folder.name}/{path.relative_to(folder).as_posix()}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    tmp.rename(out)
    return round(time.perf_counter() - started, 2)


def add_new_images(folder: Path, n: int) -> None:
    """n images with content not yet in the folder (mirrored copies of every k-th file, so every
    class folder gets some)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for f in files[:: max(1, len(files) // n)][:n]:
        with Image.open(f) as img:
            img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(f.with_name(f"new-{f.name}"))


# --- scratch projects ---------------------------------------------------------------------------

def project(path: Path, datasets: dict, dataset: str, train: dict | None = None, models: dict | None = None) -> Path:
    """A project at `path`: this checkout's src/ and stages/, params.yaml with these entries."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("src", "stages"):
        shutil.rmtree(path / name, ignore_errors=True)
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {**params["datasets"], **datasets}
    params["download"]["dataset"] = dataset
    if train is not None:
        params["train"] = train
    if models is not None:
        params["models"] = models
        params["mlflow"]["register_model"] = None
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def processed_files(proj: Path) -> list[Path]:
    return sorted((proj / "data" / "processed").glob("*.npy"))


def preprocess(proj: Path, n_images: int, limit_mb: int | None, cmd: list[str] | None = None) -> dict:
    shutil.rmtree(proj / "data" / "processed", ignore_errors=True)
    result = measure(cmd or [PY, "stages/preprocess.py"], proj, limit_mb)
    if result["rc"] == 0:
        result["images"] = n_images
        result["images_per_s"] = round(n_images / result["seconds"], 1)
        result["processed_mb"] = round(sum(p.stat().st_size for p in processed_files(proj)) / MB, 1)
        result["processed_md5"] = tree_md5(proj / "data" / "processed")
    return result


def tree_md5(folder: Path) -> str:
    digest = hashlib.md5()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(16 * MB):
                digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def train(proj: Path, model: str, variant: str, limit_mb: int | None) -> dict:
    for out in (proj / "models", proj / "metrics"):
        shutil.rmtree(out, ignore_errors=True)
    if variant == "in_memory":
        cmd = [PY, str(Path(__file__).resolve()), "train-in-memory", model]
    else:
        cmd = [PY, "stages/train.py", model]
    result = measure(cmd, proj, limit_mb, env={"MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}"})
    if result["rc"] == 0:
        from imgclf.paths import METRICS_DIR, MODELS_DIR
        from imgclf.schema import ModelFiles

        files = ModelFiles.of(model, proj / MODELS_DIR.name, proj / METRICS_DIR.name)
        timing = json.loads(files.timing.read_text())
        result.update(
            images_per_s=timing["images_per_s"], train_seconds=timing["train_seconds"],
            epoch_seconds=timing["epoch_seconds"],
            md5={p.name: file_md5(p) for p in (files.checkpoint, files.train_summary, files.history)},
            val_accuracy=json.loads(files.train_summary.read_text())["val/accuracy"],
        )
    return result


def train_in_memory(model: str) -> None:
    """The train stage of the project in the current directory, with the processed splits read
    into memory instead of mapped: the same code, the other way of holding the data."""
    import runpy

    sys.path[:0] = [str(Path.cwd() / "stages"), str(Path.cwd() / "src")]  # as running the script would
    from imgclf.data import dataset

    mapped = dataset.load_split
    dataset.load_split = lambda *args, **kwargs: mapped(*args, **{**kwargs, "mmap": False})
    sys.argv = ["stages/train.py", model]
    runpy.run_path("stages/train.py", run_name="__main__")


# --- DVC --------------------------------------------------------------------------------------

# What preprocess checks beyond decoding, and how a run leaves them out: the real stage with
# the checks' functions replaced by ones that do nothing (see preprocess_without).
CHECKS = ("none", "no_near_duplicates", "all")


def preprocess_without(what: str) -> None:
    """The preprocess stage of the project in the current directory with some checks left out:
    `near_duplicates` (no fingerprints, no grouping), `checks` (that and the blank-image
    check) or `nothing`. The same code otherwise; forked workers inherit the replacements.
    Every variant measured runs through here, so all pay the same start-up."""
    import runpy

    sys.path[:0] = [str(Path.cwd() / "stages"), str(Path.cwd() / "src")]  # as running the script would
    from imgclf.data import folder, neardup

    if what in ("near_duplicates", "checks"):
        neardup.fingerprints = lambda pixels: np.zeros((len(pixels), neardup.FINGERPRINT_WORDS), np.uint64)
        neardup.pairs = lambda prints, *args, **kwargs: np.zeros((0, 2), np.int64)
        neardup.groups = lambda matched: []
    if what == "checks":
        folder.is_uniform = lambda pixels: False
    sys.argv = ["stages/preprocess.py"]
    runpy.run_path("stages/preprocess.py", run_name="__main__")


# How copies are made of a 28x28 picture: (size it is resized to, pixels cropped from each side
# of that, format and its options).
COPIES = {
    "resized_3x_png": (84, 0, "PNG", {}),
    "jpeg_q70": (28, 0, "JPEG", {"quality": 70}),
    "resized_2x_jpeg_q90": (56, 0, "JPEG", {"quality": 90}),
    "resized_4x_crop_1px_each_side": (112, 1, "PNG", {}),
    "resized_4x_crop_2px_each_side": (112, 2, "PNG", {}),
    "resized_4x_crop_4px_each_side": (112, 4, "PNG", {}),
    "crop_1px_each_side": (28, 1, "PNG", {}),
}


def near_duplicate_detection(copies: int = 1000) -> dict:
    """How well imgclf.data.neardup tells copies from other pictures, on Fashion-MNIST's 10,000
    test images (28x28 gray; the copies decoded as an image folder's would be): the
    groups found among them (each a false match unless the two are one photograph), and, for
    copies of the first `copies` made each way of COPIES, the share found with their original
    and the share matched to another image."""
    import tempfile

    from imgclf.config import DownloadConfig, load_dataset, load_section, read_params
    from imgclf.data import neardup
    from imgclf.data.download import fetch_all
    from imgclf.data.images import decode
    from imgclf.data.raw import load_raw

    params = read_params()  # as the download stage fetches them: Debian's copy first
    download, ds = load_section("download", DownloadConfig, params), load_dataset("fashion_mnist", params)
    with tempfile.TemporaryDirectory(prefix="bench-neardup-") as raw:
        fetch_all(ds.files or {}, ds.mirrors or [], Path(raw), timeout_s=download.timeout_s, retries=download.retries)
        originals = load_raw(Path(raw), ds.format, tuple(ds.classes or ()))[1].images  # test: (n, 1, 28, 28)
    n = len(originals)
    prints = neardup.fingerprints(originals)
    started = time.perf_counter()
    among = neardup.groups(neardup.pairs(prints))
    out: dict = {"images": n, "groups": len(among), "images_grouped": sum(map(len, among)),
                 "grouping_s": round(time.perf_counter() - started, 3), "copies": {}}
    for name, (size, crop, fmt, options) in COPIES.items():
        made = []
        for pixels in originals[:copies, 0]:
            img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
            img = img.crop((crop, crop, size - crop, size - crop))
            buf = io.BytesIO()
            img.save(buf, fmt, **options)
            made.append(decode(buf.getvalue(), (1, 28, 28)))
        both = np.concatenate([prints, neardup.fingerprints(np.stack(made))])
        matched = neardup.pairs(both)
        copy_pairs = matched[matched[:, 1] >= n]
        found = {int(j) - n for i, j in copy_pairs if i == j - n}
        wrong = {int(j) - n for i, j in copy_pairs if i < n and i != j - n}
        out["copies"][name] = {"found": round(len(found) / copies, 4), "matched_elsewhere": round(len(wrong) / copies, 4)}
    return out


def near_duplicate_cost(proj: Path, entries: dict, sizes: dict[str, int], limit_mb: int | None,
                        repeats: int = 3) -> dict:
    """The real preprocess stage on the 1x and 4x generated sets with no checks, with the
    blank-image check only, and with every check (as shipped), interleaved `repeats` times so
    that a change in the machine's load falls on all three alike; the fastest run of each.
    Near-duplicate detection's share is what `all` adds to `no_near_duplicates`, of `all`; its
    memory, what it adds to the peak per image between 1x and 4x, next to what the rest of
    preprocess adds (paths, hashes, manifest rows) and the manifest's own bytes per image."""
    without = {"none": "checks", "no_near_duplicates": "near_duplicates", "all": "nothing"}
    commands = {check: [PY, str(ROOT / "bench" / "scale.py"), "preprocess-without", left_out]
                for check, left_out in without.items()}
    out: dict = {"limit_mb": limit_mb, "repeats": repeats}
    for name in ("synth_1x", "synth_4x"):
        project(proj, entries, name, TRAIN, MODEL)
        runs: dict[str, list[dict]] = {check: [] for check in CHECKS}
        for _ in range(repeats):
            for check in CHECKS:
                runs[check].append(preprocess(proj, sizes[name], limit_mb, commands[check]))
        best = {check: min(r, key=lambda x: (x["rc"] != 0, x["seconds"])) for check, r in runs.items()}
        case = {check: {**best[check], "seconds_all_runs": [r["seconds"] for r in runs[check]]} for check in CHECKS}
        if all(best[c]["rc"] == 0 for c in CHECKS):
            all_s, without_s, none_s = (best[c]["seconds"] for c in ("all", "no_near_duplicates", "none"))
            case["near_duplicates_share"] = round((all_s - without_s) / all_s, 3)
            case["blank_check_share"] = round((without_s - none_s) / all_s, 3)
            case["manifest_bytes_per_image"] = round(
                (proj / "data" / "processed" / "manifest.csv").stat().st_size / sizes[name], 1)
            meta = json.loads((proj / "data" / "processed" / "meta.json").read_text())
            case["near_duplicate_groups"] = meta.get("near_duplicates", {}).get("groups")
        out[name] = case
        log(f"near_duplicates {name}", {c: case[c]["seconds"] for c in CHECKS})
    one, four = out["synth_1x"], out["synth_4x"]
    added = sizes["synth_4x"] - sizes["synth_1x"]
    if all(one[c].get("peak_anon_mb") and four[c].get("peak_anon_mb") for c in CHECKS):
        slope = {c: (four[c]["peak_anon_mb"] - one[c]["peak_anon_mb"]) * MB / added for c in CHECKS}
        out["anon_bytes_per_image"] = {c: round(v) for c, v in slope.items()}
        out["near_duplicates_bytes_per_image"] = round(slope["all"] - slope["no_near_duplicates"])
    out["detection"] = near_duplicate_detection()
    log("near_duplicates detection", out["detection"])
    return out


def run_timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed in {cwd}: {proc.stderr.strip().splitlines()[-3:]}")
    return round(time.perf_counter() - started, 2)


def du_mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / MB, 1)


def dvc_case(name: str, source: Path, config: dict[str, str], jobs: int | None, archive: bool) -> dict:
    """The DVC operations a team repeats, on one layout of the data with one set of settings:
    add, status with nothing changed, push, a teammate's clone and pull, then 1% more images
    added and pushed. Nothing is deleted while measuring (see `trash`)."""
    base = WORK / "dvc" / name
    trash(base)
    repo, clone, remote = base / "repo", base / "clone", base / "remote"
    repo.mkdir(parents=True)
    git = ["git", "-c", "user.email=bench@example.org", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    run_timed(["dvc", "init", "-q"], repo)
    for key, value in {"core.analytics": "false", **config}.items():
        run_timed(["dvc", "config", key, value], repo)
    run_timed(["dvc", "remote", "add", "-d", "local", str(remote)], repo)
    # Hard links: the same files without writing 70,000 new ones (DVC replaces, never edits, them).
    work = base / source.name if archive else repo / "data" / "images" / source.name
    work.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(source), str(work)], check=True)
    target = repo / "data" / "images" / f"{source.name}.tar" if archive else work
    jobs_flag = ["--jobs", str(jobs)] if jobs else []
    out: dict = {"settings": config, "jobs": jobs, "layout": "tar archive" if archive else "folder",
                 "files": sum(1 for p in work.rglob("*") if p.is_file()), "load_before": load()}
    if archive:
        target.parent.mkdir(parents=True, exist_ok=True)
        out["tar_s"] = make_tar(work, target)
    rel = str(target.relative_to(repo))
    out["add_s"] = run_timed(["dvc", "add", rel], repo)
    out["status_unchanged_s"] = run_timed(["dvc", "status"], repo)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], cwd=repo, check=True)
    out["push_s"] = run_timed(["dvc", "push", *jobs_flag], repo)
    out["remote_mb"] = du_mb(remote)
    # A teammate: a clone (the remote and settings are in the committed .dvc/config), then pull.
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    out["pull_s"] = run_timed(["dvc", "pull", *jobs_flag], clone)
    # 1% more images, new content (DVC stores each distinct file once); an archive is rebuilt.
    add_new_images(work, out["files"] // 100)
    if archive:
        out["tar_1pct_s"] = make_tar(work, target)
    out["add_1pct_s"] = run_timed(["dvc", "add", rel], repo)
    out["push_1pct_s"] = run_timed(["dvc", "push", *jobs_flag], repo)
    out["remote_after_1pct_mb"] = du_mb(remote)
    out["load_after"] = load()
    trash(base)
    return out


TRASH = WORK / "trash"


def trash(path: Path) -> None:
    """Move `path` out of the way (a rename: instant); `empty_trash` deletes it at the end.

    Deleting is slow here and would disturb what is measured: the reference VM's ext4 is
    mounted with `discard`, so every freed file waits for a TRIM (~2 ms each once its blocks
    are allocated: minutes for the hundreds of thousands of files the DVC cases write)."""
    if path.exists():
        TRASH.mkdir(parents=True, exist_ok=True)
        path.rename(TRASH / f"{path.name}-{time.time_ns()}")


def empty_trash() -> None:
    """Delete the trash in the background, outliving this process (the JSON is out already)."""
    if TRASH.exists():
        subprocess.Popen(["nice", "-n", "19", "rm", "-rf", *map(str, TRASH.iterdir())], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- the benchmark ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=SYNTH_1X, help=f"generated images at 1x (default {SYNTH_1X}; 4x is four times)")
    parser.add_argument("--side", type=int, default=64, help="generated images are side x side RGB (default 64)")
    parser.add_argument("--out", type=Path, default=WORK / "scale.json")
    parser.add_argument("--skip-dvc", action="store_true", help="leave out the DVC measurements")
    parser.add_argument("--near-duplicates-only", action="store_true", help="measure only near-duplicate detection")
    args = parser.parse_args()
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_start": load(),
                    "provenance": _pipeline().provenance(),
                    "trash_pending_at_start": len(list(TRASH.iterdir())) if TRASH.exists() else 0}
    limited = cgroup_root() is not None

    # The data sets, kept in .bench/scale/data between runs (deterministic; deleting 200,000
    # files costs minutes here, see `trash`). Making them is timed, not benchmarked.
    data = WORK / "data"
    data.mkdir(exist_ok=True)
    n1, n4 = args.images, 4 * args.images
    made = {}
    if not (data / "fashion_png").is_dir() and not args.near_duplicates_only:
        made["fashion_png_s"] = make_fashion(data / "fashion_png")
    synth = f"synth{args.side}"
    if not (data / f"{synth}_4x_{n4}").is_dir():
        made[f"{synth}_4x_s"] = make_synthetic(data / f"{synth}_4x_{n4}", n4, args.side)
    if not (data / f"{synth}_1x_{n1}").is_dir():
        link_subset(data / f"{synth}_4x_{n4}", data / f"{synth}_1x_{n1}", 0.25)
    report["made"] = made

    proj = WORK / "proj"
    trash(proj)
    (proj / "data" / "images").mkdir(parents=True)
    folders = {"fashion_png": "fashion_png", "synth_1x": f"{synth}_1x_{n1}", "synth_4x": f"{synth}_4x_{n4}"}
    for name, folder in folders.items():
        (proj / "data" / "images" / name).symlink_to(data / folder)
    side = [args.side, args.side]
    entries = {
        "fashion_png": {"title": "Fashion-MNIST as PNG files", "folder": "data/images/fashion_png",
                        "image_size": [28, 28], "channels": 1},
        "synth_1x": {"title": f"generated {args.side}x{args.side} RGB, 1x", "folder": "data/images/synth_1x",
                     "image_size": side, "channels": 3, "resize": "stretch"},
        "synth_4x": {"title": f"generated {args.side}x{args.side} RGB, 4x", "folder": "data/images/synth_4x",
                     "image_size": side, "channels": 3, "resize": "stretch"},
    }

    # --- preprocess: the real stage, every run under the same memory limit -------------------
    pre: dict = {"limit_mb": PRE_LIMIT_MB if limited else None}
    sizes = {"fashion_png": FASHION_IMAGES, "synth_1x": n1, "synth_4x": n4}
    report["near_duplicates"] = near_duplicate_cost(proj, entries, sizes, pre["limit_mb"])
    if args.near_duplicates_only:
        finish(report, args.out, started)
        return
    for name in ("fashion_png", "synth_1x", "synth_4x"):
        project(proj, entries, name, TRAIN, MODEL)
        pre[name] = preprocess(proj, sizes[name], pre["limit_mb"])
        log(f"preprocess {name}", pre[name])
    one, four = pre["synth_1x"], pre["synth_4x"]
    if one["rc"] == 0 and four["rc"] == 0:
        pre["synth_4x_vs_1x"] = {k: round(four[k] / one[k], 2) for k in ("seconds", "peak_anon_mb", "processed_mb")
                                 if one.get(k)}
        # What memory grows by per image (paths, hashes, manifest rows), against its pixels.
        pre["synth_4x_vs_1x"]["anon_bytes_per_image"] = round((four["peak_anon_mb"] - one["peak_anon_mb"]) * MB
                                                              / (n4 - n1))
        pre["synth_4x_vs_1x"]["pixel_bytes_per_image"] = 3 * args.side**2
    # 4x's output stays in data/processed for training below.
    train_data = proj / "data" / "processed"
    trained = WORK / "processed_4x"
    trash(trained)
    train_data.rename(trained)
    # The same Fashion-MNIST folder as one tar, fetched by the download stage, read member by member.
    tar = WORK / "archive" / "fashion_png.tar"
    tar.parent.mkdir(exist_ok=True)
    tar_s = make_tar(data / "fashion_png", tar)
    archive_entry = {"title": "Fashion-MNIST PNG files in a tar", "mirrors": [tar.parent.as_uri() + "/"],
                     "files": {tar.name: hashlib.sha256(tar.read_bytes()).hexdigest()},
                     "image_size": [28, 28], "channels": 1}
    project(proj, {**entries, "fashion_tar": archive_entry}, "fashion_tar", TRAIN, MODEL)
    subprocess.run([PY, "stages/download.py"], cwd=proj, check=True, capture_output=True)
    pre["fashion_tar"] = {**preprocess(proj, FASHION_IMAGES, pre["limit_mb"]), "tar_s": tar_s,
                          "tar_mb": round(tar.stat().st_size / MB, 1)}
    log("preprocess fashion_tar", pre["fashion_tar"])
    report["preprocess"] = pre

    # --- train on the 4x set: in memory, mapped, mapped under a limit -------------------------
    project(proj, entries, "synth_4x", TRAIN, MODEL)
    shutil.rmtree(train_data, ignore_errors=True)
    trained.rename(train_data)
    files = processed_files(proj)
    arrays_mb = sum(p.stat().st_size for p in files) / MB
    runs: dict = {"model": MODEL, "train": {k: TRAIN[k] for k in ("epochs", "batch_size", "precision")},
                  "processed_mb": round(arrays_mb, 1)}
    warm(files)  # both unlimited runs start from a warm page cache, as after preprocessing
    runs["in_memory"] = train(proj, "mlp", "in_memory", None)
    log("train in_memory", runs["in_memory"])
    warm(files)
    runs["mapped"] = train(proj, "mlp", "mapped", None)
    log("train mapped", runs["mapped"])
    if limited and runs["mapped"]["rc"] == 0:
        # Half the arrays, unless the stage itself needs more (torch and MLflow: ~600 MB here).
        limit = max(int(arrays_mb / 2), int(runs["mapped"]["peak_anon_mb"]) + TRAIN_HEADROOM_MB)
        evict(files)
        runs["cached_mb_before_limited"] = cached_mb(files)
        runs["mapped_limited"] = train(proj, "mlp", "mapped", limit)
        runs["processed_vs_limit"] = round(arrays_mb / limit, 2)
        log("train mapped_limited", runs["mapped_limited"])
    else:
        runs["mapped_limited"] = {"skipped": "no writable cgroup v1 memory controller (run as root)" if not limited
                                  else "the unlimited run failed"}
    done = [r for r in (runs["in_memory"], runs["mapped"], runs["mapped_limited"]) if "md5" in r]
    runs["identical_outputs"] = len(done) == 3 and all(r["md5"] == done[0]["md5"] for r in done)
    for variant in ("mapped", "mapped_limited"):
        if runs["in_memory"].get("images_per_s") and runs[variant].get("images_per_s"):
            runs[f"{variant}_vs_in_memory"] = round(runs[variant]["images_per_s"] / runs["in_memory"]["images_per_s"], 3)
    report["train"] = runs
    trash(proj)

    # --- DVC on the 70,000-file folder -----------------------------------------------------------
    if not args.skip_dvc:
        report["dvc"] = {}
        for name, (config, jobs, archive) in DVC_CASES.items():
            report["dvc"][name] = dvc_case(name, data / "fashion_png", config, jobs, archive)
            log(f"dvc {name}", report["dvc"][name])

    finish(report, args.out, started)


def finish(report: dict, out: Path, started: float) -> None:
    """Print the report and write it to `out`."""
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_end"] = load()
    text = json.dumps(report, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    empty_trash()


def log(what: str, result: dict) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what}: {json.dumps(result)}", file=sys.stderr, flush=True)


# The settings docs/scale.md recommends for folders of many files (chosen by measurement there:
# hard links halve `dvc add` and speed up `dvc pull`; hashing on every core; --jobs made no
# difference with a local remote on 2 cores), against DVC's defaults and one archive of the files.
RECOMMENDED = {"cache.type": "hardlink", "core.checksum_jobs": str(len(os.sched_getaffinity(0)))}
DVC_CASES = {
    "folder_defaults": ({}, None, False),
    "folder_recommended": (RECOMMENDED, None, False),
    "archive_defaults": ({}, None, True),
}


if __name__ == "__main__":
    if sys.argv[1:2] == ["train-in-memory"]:
        train_in_memory(sys.argv[2])
    elif sys.argv[1:2] == ["preprocess-without"]:
        preprocess_without(sys.argv[2])
    else:
        main()
