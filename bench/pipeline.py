"""`make bench` (python bench/pipeline.py): speed and accuracy of the training engine on the real data, measured.

Prints one JSON document (and writes it to .bench/benchmark.json) with, per model of
params.yaml: training images/s, seconds per epoch, seconds of training until the test accuracy
first reaches the target, final test accuracy (mean and spread over seeds), parameters and
achieved GFLOP/s next to this machine's measured matrix-multiply peaks; a side-by-side
baseline of the classic per-sample DataLoader pipeline on the same model; the usual PyTorch
example recipe (pytorch/examples mnist) trained until the CNN target, and how many times
sooner each CNN gets there; and the wall time of `dvc repro` with nothing to do and after
one training param changes (with --whole-pipeline, first the whole `dvc repro -f`). The
machine's CPU model and vector features are recorded, with the kernels PyTorch used (AVX2
where ATEN_CPU_CAPABILITY forces it on a newer CPU).

Test accuracy is measured after every epoch here only to time the targets; the pipeline
itself never looks at the test split before its evaluate stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from imgclf.atomic import write_json
from imgclf.config import EvaluateConfig, load_model, load_section, load_train, model_names, read_params
from imgclf.data.dataset import load_meta, load_split
from imgclf.dvcfiles import stages_in
from imgclf.engine import EpochRecord, Plan, evaluate, fit, make_loss
from imgclf.models import build_model, count_parameters
from imgclf.paths import PROCESSED_DIR, ROOT
from imgclf.runtime import autocast, bf16_supported, configure, describe_machine, pick_threads, resolve_precision
from imgclf.transforms import Normalizer, augmentation_of

log = logging.getLogger(__name__)

# Test accuracy to time, by architecture (issue targets). An architecture without one is
# benchmarked all the same, with no time to target.
TARGETS = {"cnn": 0.91, "mlp": 0.88}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Achieved GFLOP/s of an n x n matrix multiply: the practical ceiling for dense layers."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def train_flops_per_image(model: torch.nn.Module, shape: tuple[int, ...], precision: str) -> float:
    """Forward + backward FLOPs of one training image, counted by PyTorch's FLOP counter."""
    x = torch.randn(32, *shape).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 32


def run_engine(name: str, seed: int, data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Train one model as the pipeline does, timing it and testing after every epoch."""
    arch, cfg = load_model(name, params), load_train(name, params)
    cfg = cfg.model_copy(update={"seed": seed})
    eval_batch_size = load_section("evaluate", EvaluateConfig, params).batch_size
    precision, threads = resolve_precision(cfg.precision), pick_threads(cfg.threads)
    configure(seed, threads)
    meta = data["meta"]
    model = build_model(arch, tuple(meta["shape"]), len(meta["classes"]), log_probs=cfg.loss == "nll")
    model = model.to(memory_format=torch.channels_last)
    normalize = Normalizer(meta["mean"], meta["std"])
    test_loss = make_loss(cfg.loss)
    target = TARGETS.get(arch.arch)
    curve: list[dict[str, float]] = []
    excluded = 0.0  # seconds spent on the benchmark's own test evaluations
    start = time.perf_counter()

    def on_epoch(record: EpochRecord) -> None:
        nonlocal excluded
        t0 = time.perf_counter()
        elapsed = t0 - start - excluded  # training and validation so far, not these test passes
        # As the evaluate stage tests it: flip-averaged where the model trained on flips.
        result = evaluate(model, *data["test"], loss_fn=test_loss, normalize=normalize,
                          batch_size=eval_batch_size, precision="fp32", flip_average=plan.flip_average)
        excluded += time.perf_counter() - t0
        curve.append({"epoch": record.epoch, "seconds": round(elapsed, 2),
                      "train_images_per_s": round(record.train["images_per_s"]), "test_accuracy": result["accuracy"]})

    # The data set's augmentation, as the train stage applies it (meta.json says which).
    plan = Plan(cfg, normalize, precision, augment=augmentation_of(meta) if cfg.augment else None,
                eval_batch_size=eval_batch_size)
    history = fit(model, data["train"], data["val"], plan, on_epoch=on_epoch)
    epoch_seconds = [r.train["seconds"] for r in history]
    reached = next((c["seconds"] for c in curve if target is not None and c["test_accuracy"] >= target), None)
    return {
        "seed": seed,
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "seconds_to_target": reached,
        "train_seconds": round(sum(epoch_seconds), 2),
        "images_per_s": round(len(data["train"][1]) * len(history) / sum(epoch_seconds)),
        "seconds_per_epoch": round(statistics.mean(epoch_seconds), 2),
        "curve": curve,
        "model": model,
        "precision": precision,
        "threads": threads,
        "epochs": cfg.epochs,
        "target": target,
    }


def classic_baseline(name: str, data: dict[str, Any], params: dict[str, Any], batches: int) -> dict[str, Any]:
    """The usual tutorial input pipeline on the same model: a Dataset of PIL images with
    per-sample ToTensor + Normalize, a DataLoader with batch 64, fp32. Throughput only."""
    from PIL import Image
    from torchvision import transforms

    meta = data["meta"]
    images, labels = data["train_np"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(meta["mean"], meta["std"])])

    class ClassicDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            img = Image.fromarray(images[i, 0], mode="L")
            return transform(img), int(labels[i])

    torch.manual_seed(0)
    arch = load_model(name, params)
    model = build_model(arch, tuple(meta["shape"]), len(meta["classes"]), log_probs=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(ClassicDataset(), batch_size=64, shuffle=True)
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 5:  # skip warm-up batches
            start, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        if step == 5 + batches:
            break
    rate = seen / (time.perf_counter() - start)
    return {"images_per_s": round(rate), "seconds_per_epoch": round(len(labels) / rate, 1),
            "batches_timed": batches, "precision": "fp32", "batch_size": 64}


class ExamplesNet(torch.nn.Module):
    """The network of pytorch/examples' mnist/main.py: two unpadded 3x3 convolutions (32 and
    64 channels), one 2x2 max-pool, dropout 0.25 and 0.5 around a 128-unit layer, log_softmax."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 32, 3), torch.nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = torch.nn.Linear(64 * 12 * 12, 128), torch.nn.Linear(128, classes)
        self.drop1, self.drop2 = torch.nn.Dropout(0.25), torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.drop2(F.relu(self.fc1(torch.flatten(self.drop1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def examples_recipe(data: dict[str, Any], target: float, max_epochs: int) -> dict[str, Any]:
    """The usual PyTorch example recipe, run until its test accuracy reaches `target`: its net,
    a per-sample ToTensor + Normalize DataLoader with batch 64, Adadelta (lr 1.0) with StepLR
    (gamma 0.7), fp32. Seconds count training only, not the test passes after each epoch."""
    from PIL import Image
    from torchvision import transforms

    meta = data["meta"]
    if list(meta["shape"]) != [1, 28, 28]:
        return {"skipped": f"the recipe's net takes 1x28x28 images, this data set has {meta['shape']}"}
    images, labels = data["train_np"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(meta["mean"], meta["std"])])

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return transform(Image.fromarray(images[i, 0], mode="L")), int(labels[i])

    torch.manual_seed(1)  # the example's default seed
    model = ExamplesNet(len(meta["classes"]))
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    loader = torch.utils.data.DataLoader(Images(), batch_size=64, shuffle=True)
    test_x = (data["test"][0].float() / 255 - meta["mean"][0]) / meta["std"][0]
    seconds, curve = 0.0, []
    for epoch in range(1, max_epochs + 1):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        model.eval()
        with torch.inference_mode():
            predicted = torch.cat([model(test_x[i : i + 1000]).argmax(1) for i in range(0, len(test_x), 1000)])
        accuracy = float((predicted == data["test"][1]).double().mean())
        curve.append({"epoch": epoch, "seconds": round(seconds, 1), "test_accuracy": round(accuracy, 4)})
        log.info("pytorch/examples recipe: epoch %d, %.1f s of training, test accuracy %.4f", epoch, seconds, accuracy)
        if accuracy >= target:
            break
    reached = curve[-1]["seconds"] if curve[-1]["test_accuracy"] >= target else None
    return {"target_test_accuracy": target, "seconds_to_target": reached, "curve": curve, "precision": "fp32",
            "batch_size": 64, "max_epochs": max_epochs}


def compile_probe(name: str, data: dict[str, Any], params: dict[str, Any], steps: int) -> dict[str, Any]:
    """Eager versus `torch.compile` for the engine's training step on the same model, batch and
    precision: the compile time (first step) and the steady images/s after it. The engine
    compiles nothing; this is the measurement behind that choice, rerun on every `make bench`."""
    meta = data["meta"]
    images, labels = data["train"]
    cfg = load_train(name, params)
    precision = resolve_precision(cfg.precision)
    loss_fn = make_loss(cfg.loss, cfg.label_smoothing)
    normalize = Normalizer(meta["mean"], meta["std"])
    out: dict[str, Any] = {"steps_timed": steps, "batch_size": cfg.batch_size, "precision": precision}
    # A cold compile, as a fresh machine (or CI) pays it: not Inductor's cache from a last run.
    # patch.dict puts the environment back as it was, whatever happens inside.
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache, \
            mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": cache}):
        torch._dynamo.reset()
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = build_model(load_model(name, params), tuple(meta["shape"]), len(meta["classes"]),
                                log_probs=cfg.loss == "nll").to(memory_format=torch.channels_last)
            model.train()
            forward = torch.compile(model) if mode == "compiled" else model
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

            def step(i: int, forward=forward, optimizer=optimizer) -> None:
                first = (i * cfg.batch_size) % (len(labels) - cfg.batch_size)
                x, y = normalize(images[first : first + cfg.batch_size]), labels[first : first + cfg.batch_size]
                with autocast(precision):
                    loss = loss_fn(forward(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            start = time.perf_counter()
            step(0)  # compiles, for the compiled model
            out[f"{mode}_first_step_s"] = round(time.perf_counter() - start, 2)
            for i in range(1, 4):
                step(i)
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            out[f"{mode}_images_per_s"] = round(steps * cfg.batch_size / (time.perf_counter() - start))
    # Worth it only if the time saved per epoch repays the compile time within the run.
    per_epoch = len(labels) * (1 / out["eager_images_per_s"] - 1 / out["compiled_images_per_s"])
    out["seconds_saved_per_epoch"] = round(per_epoch, 2)
    out["pays_off_within_run"] = per_epoch * cfg.epochs > out["compiled_first_step_s"] - out["eager_first_step_s"]
    return out


def time_dvc(args: list[str]) -> tuple[float, dict[str, list[str]]]:
    start = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return round(seconds, 2), stages_in(proc.stdout + proc.stderr)


def unused_lr(base: float) -> float:
    """A learning rate next to `base` that no earlier benchmark used: DVC's run cache would
    restore the train stage of a value it has seen (in seconds) instead of training it."""
    return round(base * (1 - (time.time_ns() // 1_000_000 % 9973 + 1) * 1e-6), 9)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r["final_test_accuracy"] for r in runs]
    reached = [r["seconds_to_target"] for r in runs]
    return {
        "final_test_accuracy_mean": round(statistics.mean(acc), 4),
        "final_test_accuracy_std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
        "seconds_to_target_mean": round(statistics.mean(reached), 1) if None not in reached else None,
        "images_per_s_mean": round(statistics.mean(r["images_per_s"] for r in runs)),
        "seconds_per_epoch_mean": round(statistics.mean(r["seconds_per_epoch"] for r in runs), 2),
    }


def cpu_features() -> dict[str, Any]:
    """The CPU's model name and the vector features that decide the training speed."""
    flags: set[str] = set()
    model = describe_machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == describe_machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model": model, "features": [f for f in wanted if f in flags], **cpu_generation()}


def cpu_generation() -> dict[str, int]:
    """The CPU's family and model numbers: "AMD EPYC" alone names every Zen generation."""
    names = {"cpu family": "family", "model": "model_number"}
    found: dict[str, int] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in names and names[key] not in found:
                found[names[key]] = int(value)
            if len(found) == len(names):
                break
    except (OSError, ValueError):  # not Linux, or not x86
        pass
    return found


def provenance() -> dict[str, Any]:
    """When, from which commit, and how busy the machine was: speed figures measured beside
    other work are slower, and say so."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git("rev-parse", "HEAD") or "unknown",
            "tree_clean": git("status", "--porcelain", "--untracked-files=no") == "",
            "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def kernel_info() -> dict[str, str]:
    """The vector kernels PyTorch dispatches to: the CPU's features cap them, and so do
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, which measure an AVX2-only CPU's path on a newer
    one. The CPU's features alone would label such figures AVX-512."""
    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return {"aten": torch.backends.cpu.get_cpu_capability(), **forced}


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "processor": describe_machine(), "cpu": cpu_features(), "kernels": kernel_info(), "threads": threads,
        "torch": torch.__version__, "bf16_native": bf16_supported(),
        "matmul_gflops_fp32": round(matmul_peak(torch.float32), 1),
        # Without native bf16 the product is emulated (about 0.3 GFLOP/s on an AVX2 CPU): minutes
        # to measure a figure no model uses there (precision auto picks fp32).
        "matmul_gflops_bf16": round(matmul_peak(torch.bfloat16), 1) if bf16_supported() else None,
    }


def bench_model(name: str, args: argparse.Namespace, data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one model: its seeds' runs, FLOPs, the classic baseline, torch.compile."""
    runs = []
    for seed in range(args.seeds):
        log.info("%s: seed %d", name, seed)
        runs.append(run_engine(name, seed, data, params))
        log.info("%s seed %d: final test accuracy %.4f, %s s to target, %d img/s", name, seed,
                 runs[-1]["final_test_accuracy"], runs[-1]["seconds_to_target"], runs[-1]["images_per_s"])
    first = runs[0]
    flops = train_flops_per_image(first["model"], tuple(data["meta"]["shape"]), first["precision"])
    summary = summarize(runs)
    baseline = classic_baseline(name, data, params, args.baseline_batches)
    log.info("%s baseline: %s", name, baseline)
    compiled = compile_probe(name, data, params, args.compile_steps) if args.compile_steps else None
    log.info("%s torch.compile: %s", name, compiled)
    return {
        "arch": load_model(name, params).arch,
        "parameters": count_parameters(first["model"]),
        "epochs": first["epochs"], "precision": first["precision"], "threads": first["threads"],
        "target_test_accuracy": first["target"],
        **summary,
        "train_gflops_per_s": round(flops * summary["images_per_s_mean"] / 1e9, 1),
        "train_mflops_per_image": round(flops / 1e6, 2),
        "classic_dataloader_baseline": baseline,
        "speedup_images_per_s_vs_baseline": round(summary["images_per_s_mean"] / baseline["images_per_s"], 1),
        "torch_compile": compiled,
        "runs": [{k: v for k, v in r.items() if k != "model"} for r in runs],
    }


def bench_dvc(params: dict[str, Any], whole: bool = False) -> dict[str, Any]:
    """`dvc repro` with nothing to do, and `dvc exp run` after one training param changes;
    with `whole`, first the whole pipeline, `dvc repro -f`, download included."""
    # `dvc exp run --temp` runs the last commit plus changes to tracked files: commit first.
    out: dict[str, Any] = {}
    if whole:
        out["dvc_repro_force_s"], _ = time_dvc(["repro", "-f"])
    else:
        # Bring the pipeline up to date first (untimed; nothing to do unless this is a fresh
        # clone or a changed tree), so the timed run below is the no-op a user sees.
        time_dvc(["repro"])
    noop, stages = time_dvc(["repro"])
    out.update({"dvc_repro_nothing_to_do_s": noop, "stages_nothing_to_do": stages})
    # One training param of one model changes; --temp keeps the workspace as it was.
    names = model_names(params)
    rerun = "mlp" if "mlp" in names else names[0]  # the quickest to train in the default params
    change = f"models.{rerun}.train.lr={unused_lr(load_train(rerun, params).lr)}"
    seconds, stages = time_dvc(["exp", "run", "--temp", "-n", "bench-rerun", "-S", change])
    subprocess.run(["dvc", "exp", "remove", "bench-rerun"], cwd=ROOT, capture_output=True)
    return {**out, "dvc_exp_run_after_one_train_param_s": seconds, "changed_param": change,
            "stages_after_change": stages}


def record_name(result: dict[str, Any]) -> str:
    """`2026-12-07T1130-amd-epyc-f26m17.json`: sorts by date, says which CPU."""
    cpu = result["machine"]["cpu"]
    slug = "-".join("".join(c if c.isalnum() else " " for c in cpu["model"].lower()).split())
    generation = f"-f{cpu['family']}m{cpu['model_number']}" if "family" in cpu else ""
    stamp = result["recorded"]["date"][:16].replace(":", "")
    return f"{stamp}-{slug}{generation}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the training engine on the real data.")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per model (mean and spread)")
    parser.add_argument("--models", nargs="*", help="model keys of params.yaml (default: all)")
    parser.add_argument("--baseline-batches", type=int, default=150)
    parser.add_argument("--compile-steps", type=int, default=120,
                        help="training steps timed for eager vs torch.compile (0 skips it)")
    parser.add_argument("--recipe-epochs", type=int, default=6,
                        help="most epochs of the pytorch/examples recipe, run until the CNN target (0 skips it)")
    parser.add_argument("--skip-dvc", action="store_true", help="skip the dvc repro timings")
    parser.add_argument("--whole-pipeline", action="store_true",
                        help="also time `dvc repro -f` (minutes; it rewrites every output, the same bytes but "
                             "each timing.json, so dvc.lock changes as after any `dvc repro -f`)")
    parser.add_argument("--skip-engine", action="store_true", help="only the dvc repro timings")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "benchmark.json")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="also keep the finished result as DIR/<date>-<cpu>.json (make bench: bench/results, "
                             "which bench/docs.py turns into docs/benchmarks.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("imgclf.engine").setLevel(logging.WARNING)

    params = read_params()
    meta = load_meta(PROCESSED_DIR)
    splits = {s: load_split(PROCESSED_DIR, s, meta) for s in ("train", "val", "test")}
    data = {"meta": meta, "train_np": (splits["train"].images, splits["train"].labels)}
    data.update({s: (torch.from_numpy(v.images), torch.from_numpy(v.labels)) for s, v in splits.items()})
    threads = pick_threads(0)
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"recorded": provenance(), "machine": machine_info(threads), "models": {}}
    log.info("machine: %s", result["machine"])
    for name in [] if args.skip_engine else args.models or model_names(params):
        result["models"][name] = bench_model(name, args, data, params)
        write_json(args.out, result)  # kept as it grows: the engine figures take the longest
    if args.recipe_epochs and not args.skip_engine:
        recipe = examples_recipe(data, TARGETS["cnn"], args.recipe_epochs)
        result["pytorch_examples_recipe"] = recipe
        for figures in result["models"].values():
            ours, theirs = figures["seconds_to_target_mean"], recipe.get("seconds_to_target")
            if figures["target_test_accuracy"] == TARGETS["cnn"] and ours and theirs:
                figures["times_sooner_than_recipe"] = round(theirs / ours, 1)
    if not args.skip_dvc:
        result["pipeline"] = bench_dvc(params, whole=args.whole_pipeline)
    result["recorded"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["recorded"]["arguments"] = sys.argv[1:]
    write_json(args.out, result)
    if args.record:
        write_json(args.record / record_name(result), result)
    # The per-epoch curves are in the file; the terminal gets the figures.
    shown = {**result, "models": {n: {k: v for k, v in m.items() if k != "runs"} for n, m in result["models"].items()}}
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
