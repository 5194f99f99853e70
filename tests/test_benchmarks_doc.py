"""docs/benchmarks.md and README's results table are written from the benchmark's JSON records,
never by hand: the pages match their records, and a record's figures land where they should."""

import importlib.util
import subprocess
import sys

from fixtures import ROOT

spec = importlib.util.spec_from_file_location("bench_docs", ROOT / "bench" / "docs.py")
docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs)


def _record(kernels=None, date="2026-12-07T11:00:00Z", accuracies=(0.9371, 0.9350, 0.9390)):
    runs = [{"seed": i, "final_test_accuracy": a} for i, a in enumerate(accuracies)]
    return {
        "recorded": {"date": date, "commit": "0123456789abcdef", "tree_clean": True, "load_average_1m": 0.5,
                     "load_average_1m_at_end": 2.1, "cpus": 2, "arguments": ["--seeds", "3"]},
        "machine": {"cpu": {"model": "AMD EPYC", "features": ["avx2"], "family": 25, "model_number": 1},
                    "kernels": kernels or {"aten": "AVX2"}, "threads": 2, "torch": "2.14.1",
                    "matmul_gflops_fp32": 100.0, "matmul_gflops_bf16": None},
        "models": {"cnn": {"arch": "cnn", "parameters": 420_000, "epochs": 9, "precision": "fp32",
                           "target_test_accuracy": 0.91, "final_test_accuracy_mean": 0.937,
                           "final_test_accuracy_std": 0.002, "seconds_to_target_mean": 61.5,
                           "images_per_s_mean": 1700, "seconds_per_epoch_mean": 31.75, "train_gflops_per_s": 40.2,
                           "speedup_images_per_s_vs_baseline": 3.5, "times_sooner_than_recipe": 4.2, "runs": runs}},
    }


def test_the_committed_pages_are_what_the_committed_records_give():
    proc = subprocess.run([sys.executable, "bench/docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_records_figures_and_provenance_reach_the_readme_table():
    block = docs.readme_block(_record())
    assert "| `cnn` | a grid: shared filters, pooling | 420,000 | 9 | 93.70% ± 0.20 (n=3) | 286 s | 1,700 |" in block
    assert "AMD EPYC (Zen 3; AVX2 kernels), 2 threads, torch 2.14.1, commit `0123456`, load 0.5 → 2.1 on 2 CPUs" in block
    assert block.startswith(docs.BEGIN) and block.endswith(docs.END)


def test_the_pipeline_timings_name_the_stages_a_change_reran():
    record = _record()
    record["pipeline"] = {"dvc_repro_force_s": 165.1, "dvc_repro_nothing_to_do_s": 1.01,
                          "dvc_exp_run_after_one_train_param_s": 46.62, "changed_param": "models.mlp.train.lr=0.05",
                          "stages_after_change": {"ran": ["train@mlp", "evaluate@mlp"], "restored_from_run_cache": []}}
    assert ("`dvc repro -f` 165.1 s; `dvc repro` with nothing to do 1.01 s; `dvc exp run -S models.mlp.train.lr=0.05` "
            "46.62 s (reran: evaluate@mlp, train@mlp).") in docs.document([record])


def test_forced_kernels_are_labelled_as_forced():
    record = _record(kernels={"aten": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    record["machine"]["cpu"].update(family=26, model_number=2, features=["avx512_bf16"])
    assert "AMD EPYC (Zen 5; AVX2 forced kernels)" in docs.document([record])


def test_every_run_is_listed_newest_first_and_the_readme_shows_the_newest():
    old, new = _record(date="2026-12-01T09:00:00Z", accuracies=(0.90,)), _record(date="2026-12-07T11:00:00Z")
    old["models"]["cnn"]["final_test_accuracy_mean"] = 0.9
    page = docs.document([old, new])
    assert page.index("| 2026-12-07 |") < page.index("| 2026-12-01 |")
    assert "93.70%" in page and "90.00%" in page
    readme = docs.readme_with(f"intro\n{docs.BEGIN}\nstale\n{docs.END}\nrest\n", docs.readme_block(docs.with_models([old, new])))
    assert "stale" not in readme and "93.70% ± 0.20 (n=3)" in readme and readme.endswith("rest\n")
