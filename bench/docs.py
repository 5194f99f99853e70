"""Write docs/benchmarks.md and README's results table from the benchmark's JSON records.

`make bench` keeps each finished run as bench/results/<date>-<cpu>.json (bench/pipeline.py
--record) and then runs this script, so no figure on either page is typed by hand and none
goes stale unnoticed: tests/test_benchmarks_doc.py fails when a page differs from what its
records give. `python bench/docs.py --check` says the same without writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BEGIN = "<!-- results: written by bench/docs.py from bench/results/*.json; edit those, not this -->"
END = "<!-- /results -->"

# How each architecture sees an image (the lesson's point), for the README table.
SEES = {"mlp": "a flat vector of pixels", "cnn": "a grid: shared filters, pooling"}
# CPU generations this project has been measured on, by (vendor prefix, family, model); other
# CPUs are named by their numbers.
GENERATIONS = {("AMD", 25, 1): "Zen 3", ("AMD", 25, 17): "Zen 4", ("AMD", 26, 2): "Zen 5",
               ("AMD", 26, 17): "Zen 5"}


def load(directory: Path = RESULTS) -> list[dict[str, Any]]:
    """Every record, oldest first (file names start with the date)."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def cpu(record: dict[str, Any]) -> str:
    """`AMD EPYC (Zen 5; AVX512 kernels)`: the model, its generation and the kernels used."""
    c, kernels = record["machine"]["cpu"], record["machine"]["kernels"]
    generation = GENERATIONS.get((c["model"].split()[0], c.get("family"), c.get("model_number")))
    if generation is None and "family" in c:
        generation = f"family {c['family']} model {c['model_number']}"
    forced = " forced" if len(kernels) > 1 else ""
    return f"{c['model']} ({generation + '; ' if generation else ''}{kernels['aten']}{forced} kernels)"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:g} s"


def _accuracy(m: dict[str, Any]) -> str:
    n = len(m["runs"])
    spread = f" ± {100 * m['final_test_accuracy_std']:.2f}" if n > 1 else ""
    return f"{_pct(m['final_test_accuracy_mean'])}{spread} (n={n})"


def measured_on(record: dict[str, Any]) -> str:
    r, m = record["recorded"], record["machine"]
    load = f"load {r['load_average_1m']:g} → {r.get('load_average_1m_at_end', r['load_average_1m']):g} on {r['cpus']} CPUs"
    clean = "" if r["tree_clean"] else ", uncommitted changes"
    return (f"{r['date'][:10]}, {cpu(record)}, {m['threads']} threads, torch {m['torch']}, "
            f"commit `{r['commit'][:7]}`{clean}, {load}")


def readme_block(record: dict[str, Any]) -> str:
    rows = ["| model | sees the image as | parameters | epochs | test accuracy | training | images/s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in record["models"].items():
        rows.append(f"| `{name}` | {SEES.get(m.get('arch', ''), m.get('arch', '?'))} | {m['parameters']:,} | "
                    f"{m['epochs']} | {_accuracy(m)} | {m['seconds_per_epoch_mean'] * m['epochs']:.0f} s | "
                    f"{m['images_per_s_mean']:,} |")
    rows.append("")
    rows.append(f"Measured by `make bench` on {measured_on(record)}; every run: "
                "[docs/benchmarks.md](docs/benchmarks.md).")
    return "\n".join([BEGIN, *rows, END])


def _run_section(record: dict[str, Any]) -> list[str]:
    out = [f"### {record['recorded']['date'][:16].replace('T', ' ')} UTC: {cpu(record)}", "",
           f"{measured_on(record)}. Arguments: `{' '.join(record['recorded'].get('arguments', [])) or '(defaults)'}`.",
           ""]
    m = record["machine"]
    bf16 = f", bf16 {m['matmul_gflops_bf16']:g}" if m.get("matmul_gflops_bf16") else ""
    out += [f"Matrix-multiply peak (GFLOP/s): fp32 {m['matmul_gflops_fp32']:g}{bf16}.", ""]
    if record["models"]:
        out += ["| model | params | epochs | precision | test accuracy | s to target (target) | images/s | "
                "s/epoch | GFLOP/s | vs classic DataLoader | vs pytorch/examples |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, f in record["models"].items():
            sooner = f.get("times_sooner_than_recipe")
            out.append(f"| `{name}` | {f['parameters']:,} | {f['epochs']} | {f['precision']} | {_accuracy(f)} | "
                       f"{_s(f['seconds_to_target_mean'])} ({_pct(f['target_test_accuracy'])}) | "
                       f"{f['images_per_s_mean']:,} | {f['seconds_per_epoch_mean']:g} | {f['train_gflops_per_s']:g} | "
                       f"{f['speedup_images_per_s_vs_baseline']:g}x | {f'{sooner:g}x sooner' if sooner else '–'} |")
        out.append("")
    recipe = record.get("pytorch_examples_recipe")
    if recipe and "curve" in recipe:
        out += [f"pytorch/examples recipe: {_s(recipe['seconds_to_target'])} of training to "
                f"{_pct(recipe['target_test_accuracy'])} (at most {recipe['max_epochs']} epochs).", ""]
    pipe = record.get("pipeline")
    if pipe:
        whole = f"`dvc repro -f` {_s(pipe['dvc_repro_force_s'])}; " if "dvc_repro_force_s" in pipe else ""
        out += [f"{whole}`dvc repro` with nothing to do {_s(pipe['dvc_repro_nothing_to_do_s'])}; "
                f"`dvc exp run -S {pipe['changed_param']}` {_s(pipe['dvc_exp_run_after_one_train_param_s'])} "
                f"(reran: {', '.join(sorted(pipe['stages_after_change']['ran'])) or 'nothing'}).", ""]
    return out


def document(records: list[dict[str, Any]]) -> str:
    lines = ["# Benchmarks", "",
             "Written by `bench/docs.py` from the JSON records in `bench/results/`, one per `make bench` run;",
             "do not edit this page by hand (`make bench` adds a record and rewrites it, and README's results",
             "table). Speed depends on the CPU, the kernels PyTorch used and how busy the machine was, so",
             "every run names all three; accuracies are on the 10,000 test images, the mean and spread over",
             "the seeds (`n`). \"s to target\": seconds of training until the test accuracy first reached the",
             "target; the classic DataLoader baseline is the usual per-image pipeline on the same model.",
             "Measurements made before these records existed are in the git history of README.md.", ""]
    if not records:
        return "\n".join([*lines, "No records yet: run `make bench`.", ""])
    lines += ["## Every run", "", "| date | CPU | commit | " + " | ".join(f"`{n}`" for n in _model_names(records))
              + " | dvc repro -f |", "|---|---|---|" + "---:|" * (len(_model_names(records)) + 1)]
    for r in reversed(records):
        accs = [_pct(r["models"][n]["final_test_accuracy_mean"]) if n in r["models"] else "–"
                for n in _model_names(records)]
        force = _s(r.get("pipeline", {}).get("dvc_repro_force_s"))
        lines.append(f"| {r['recorded']['date'][:10]} | {cpu(r)} | `{r['recorded']['commit'][:7]}` | "
                     + " | ".join(accs) + f" | {force} |")
    lines += ["", "## Each run, newest first", ""]
    for r in reversed(records):
        lines += _run_section(r)
    return "\n".join(lines).rstrip() + "\n"


def _model_names(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(n for r in records for n in r["models"]))


def readme_with(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"error: README.md must hold the results markers once each ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN)
    return head + block + rest.split(END, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the pages are up to date")
    args = parser.parse_args()
    records = load()
    pages = {DOC: document(records)}
    if records:
        pages[README] = readme_with(README.read_text(), readme_block(with_models(records)))
    stale = [p for p, text in pages.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} differs from bench/results: run python bench/docs.py", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(pages[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


def with_models(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest record that trained models (a --skip-engine run times only DVC)."""
    return next(r for r in reversed(records) if r["models"])


if __name__ == "__main__":
    sys.exit(main())
