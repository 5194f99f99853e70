"""The report stage's work: every model's results, side by side, as one HTML page and Markdown.

Both documents are rendered from one list of blocks, so they always say the same thing. The
HTML embeds its figures as data URIs (a single file that opens offline); the Markdown points
at figures/<file>. For the same inputs every byte is the same, apart from the numbers that
come from timing.json, which measure the machine rather than the model.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from imgclf import __version__, plots
from imgclf.atomic import atomic_dir, write_text
from imgclf.config import ReportConfig
from imgclf.data.dataset import Split, load_meta, load_split, source_version
from imgclf.errors import DataError
from imgclf.schema import (
    HISTORY_COLUMNS,
    JSON_LAYOUTS,
    PREDICTION_COLUMNS,
    EvaluationMetrics,
    Mistake,
    ModelFiles,
    Timing,
    TrainSummary,
    layout_problem,
)

log = logging.getLogger(__name__)

_NUM = (int, float)


class _Meta(TypedDict):
    """The keys the report reads from data/processed/meta.json (the preprocess stage writes more)."""

    dataset: str
    classes: list
    shape: list
    mean: list
    std: list
    counts: dict
    val_fraction: float
    seed: int


# Past this many classes a figure per class (samples, per-class bars, confusion matrix) is no
# longer readable: the report shows the hardest classes and the most confused pairs instead.
MANY_CLASSES = 30
TOP_ROWS = 20


@dataclass(frozen=True)
class ModelResults:
    """What the train and evaluate stages wrote for one model."""

    name: str
    history: pd.DataFrame
    train: TrainSummary
    timing: Timing
    test: EvaluationMetrics
    confusion: np.ndarray
    misclassified: list[Mistake]
    predicted: np.ndarray  # class index per test image, in test-set order


@dataclass(frozen=True)
class ReportInputs:
    meta: dict[str, Any]
    train: Split  # source of the sample images
    test: Split
    models: tuple[ModelResults, ...]


@dataclass(frozen=True)
class Report:
    html: str
    markdown: str
    figures: dict[str, bytes]  # file name under reports/figures/ -> PNG bytes

    def write(self, reports_dir: Path) -> None:
        """report.html, report.md and figures/ (replaced as a whole: no stale figure stays)."""
        with atomic_dir(reports_dir / "figures") as tmp:
            for file_name, png in self.figures.items():
                (tmp / file_name).write_bytes(png)
        write_text(reports_dir / "report.md", self.markdown)
        write_text(reports_dir / "report.html", self.html)


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; run `dvc repro` to regenerate it")


def _check(path: Path, data: Any, layout: type | None) -> Any:
    problem = layout_problem(layout, data) if layout is not None else None
    if problem:
        raise _bad(path, problem)
    return data


def _parse(path: Path, parse: Callable[[Path], Any]) -> Any:
    try:
        return parse(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:  # bad JSON, bad UTF-8 and pandas' parser errors are ValueErrors
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _bad(path, f"unreadable ({first_line})") from None


def _read_json(path: Path) -> Any:
    """A model's JSON file, checked against its layout (imgclf.schema) where its top level is an object."""
    return _check(path, _parse(path, lambda p: json.loads(p.read_text(encoding="utf-8"))), JSON_LAYOUTS.get(path.name))


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    # keep_default_na=False: a class called "None" or "NA" must stay a string.
    frame = _parse(path, lambda p: pd.read_csv(p, keep_default_na=False))
    if tuple(frame.columns) != columns:
        raise _bad(path, f"expected the columns {','.join(columns)}")
    if frame.empty:
        raise _bad(path, "has no rows")
    return frame


def _load_model(name: str, files: ModelFiles, classes: list[str], test: Split) -> ModelResults:
    index = {c: i for i, c in enumerate(classes)}
    history = _read_csv(files.history, HISTORY_COLUMNS)
    if not all(pd.api.types.is_numeric_dtype(history[c]) for c in HISTORY_COLUMNS):
        raise _bad(files.history, "has non-numeric values")
    metrics = _read_json(files.test_metrics)
    per_class = metrics["test/per_class_accuracy"]
    if set(per_class) != set(classes) or not all(isinstance(v, _NUM) for v in per_class.values()):
        raise _bad(files.test_metrics, "expected one per-class accuracy for each class of meta.json")
    confusion = _read_json(files.confusion)
    try:
        counts = np.asarray(confusion["counts"], dtype=np.int64)
    except (TypeError, ValueError):
        counts = np.zeros(0)
    if confusion["classes"] != classes or counts.shape != (len(classes), len(classes)):
        raise _bad(files.confusion, f"expected a {len(classes)}x{len(classes)} matrix of meta.json's classes")
    mistakes = _read_json(files.misclassified)
    if not isinstance(mistakes, list) or not all(
            layout_problem(Mistake, m) is None and 0 <= m["index"] < len(test.labels)
            and m["actual"] in index and m["predicted"] in index for m in mistakes):
        raise _bad(files.misclassified, f"expected a list of {{{', '.join(Mistake.__annotations__)}}}")
    predictions = _read_csv(files.predictions, PREDICTION_COLUMNS)
    named = predictions["predicted"].astype(str)
    if len(predictions) != len(test.labels) or not named.isin(index).all():
        raise _bad(files.predictions, f"expected {len(test.labels)} rows naming known classes")
    return ModelResults(name=name, history=history, train=_read_json(files.train_summary),
                        timing=_read_json(files.timing), test=metrics, confusion=counts,
                        misclassified=mistakes, predicted=named.map(index).to_numpy(np.int64))


def load_inputs(models: list[str], processed_dir: Path, metrics_root: Path) -> ReportInputs:
    """Everything the report shows, checked, so that a stale or partial run fails with one line."""
    if not models:
        raise DataError("no models to report on: add one under `models` in params.yaml")
    meta = _check(processed_dir / "meta.json", load_meta(processed_dir), _Meta)
    train = load_split(processed_dir, "train", meta)
    test = load_split(processed_dir, "test", meta)
    results = tuple(_load_model(name, ModelFiles.of(name, metrics_root=metrics_root), list(meta["classes"]), test)
                    for name in models)
    log.info("report inputs: %d models, %d test images", len(results), len(test.labels))
    return ReportInputs(meta=meta, train=train, test=test, models=results)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _epoch(summary: TrainSummary) -> str:
    return f"{summary['best_epoch']} of {summary['epochs']}"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _slugs(names: list[str]) -> list[str]:
    """File-name-safe, distinct versions of the model names (which are arbitrary params keys)."""
    out: list[str] = []
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"
        out.append(slug if slug not in out else f"{slug}-{len(out) + 1}")
    return out


def _teaching(shape: list[int]) -> list[tuple[str, ...]]:
    c, h, w = shape
    return [
        ("p", f"The multilayer perceptron (MLP) starts by flattening the image: the {c}×{h}×{w} grid "
              f"becomes a single list of {c * h * w} numbers, and where a pixel sat survives only as its "
              "position in that list. Every unit of the first hidden layer has its own weight for every "
              "pixel (a fully connected layer), and nothing in the model says which pixels are neighbours: "
              "shuffling the pixels of every image in the same fixed way would not make its task any harder."),
        ("p", "The convolutional network (CNN) keeps the image as a grid. Each layer slides small filters, a "
              "few pixels wide, over the whole image and reuses the same weights at every position, so each "
              "output depends only on a small neighbourhood (sparse, local connections) and a pattern such "
              "as an edge or a seam is recognised wherever it appears. Pooling then shrinks the grid, so "
              "later filters summarise ever larger regions. Both models put the ReLU non-linearity, "
              "max(0, x), between their layers and end with one score per class."),
    ]


def _mistakes(m: ModelResults, slug: str, test: Split, classes: list[str]) -> list[tuple[Any, ...]]:
    if m.misclassified:
        return [("img", f"misclassified_{slug}.png", f"The {len(m.misclassified)} test images {m.name} got wrong "
                 "with the highest confidence.", plots.misclassified_grid(test.images, m.misclassified, classes))]
    if m.test["test/accuracy"] >= 1:
        return [("p", f"{m.name} classified every test image correctly.")]
    return [("p", "No mistakes were kept (evaluate.top_misclassified is 0).")]


def _version(meta: dict[str, Any]) -> str:
    labels = {"dvc_md5": "DVC hash", "checksum": "archive checksum", "content_sha256": "content SHA-256",
              "checksums": "digest of the files' checksums"}
    kind, value = source_version(meta)
    return f"{labels[kind]} {value[:16]}" if kind in labels else "not recorded"


def _split_rule(meta: dict[str, Any]) -> str:
    return "by content hash" if meta.get("format") == "folder" else "stratified by class"


def _quality_blocks(meta: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Image folders: images that came out blank, and near-duplicates across splits
    (imgclf.data.quality); nothing for data sets processed before these were counted."""
    blocks: list[tuple[Any, ...]] = []
    blank, near = meta.get("blank_images") or {}, meta.get("near_duplicates") or {}
    if blank:
        rule = "on the background that contrasts with each image" if blank.get("transparency") == "auto" \
            else f"onto {blank.get('transparency')}"
        blocks.append(("p", f"{blank['count']:,} of {blank['images']:,} images ({blank['share']:.1%}) come out "
                            f"(nearly) uniform after preprocessing; {blank['transparent']:,} had transparency, "
                            f"composited {rule}."))
    if near:
        across = near["groups_across_splits"]
        what = (f"{near['left_out']:,} image(s) left out so that each group is used in one split"
                if near["action"] == "keep_together" else "used as they are (near_duplicates: report)")
        example = "; ".join(", ".join(f"{m['path']} ({m['split']})" for m in g) for g in near["examples"][:2])
        blocks.append(("p", f"{near['groups']:,} near-duplicate group(s) (resized or re-encoded copies), "
                            f"{across:,} of them across splits: {what}{'. E.g. ' + example if example else ''}."))
    return blocks


def _data_blocks(meta: dict[str, Any], train: Split, cfg: ReportConfig) -> list[tuple[Any, ...]]:
    classes, per_class = list(meta["classes"]), meta.get("counts_per_class") or {}
    source = meta.get("source") or {}
    where = source.get("repo") or source.get("path") or source.get("file") or ", ".join(source.get("files", {}))
    blocks: list[tuple[Any, ...]] = [
        ("p", f"Version: {_version(meta)} (source: {source.get('kind', 'unknown')}, {where}).")]
    skipped, duplicates = meta.get("skipped") or [], int(meta.get("duplicates") or 0)
    if skipped or duplicates:
        listed = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:TOP_ROWS])
        more = f" and {len(skipped) - TOP_ROWS} more" if len(skipped) > TOP_ROWS else ""
        blocks.append(("p", f"{len(skipped)} bad file(s) skipped{': ' + listed + more if skipped else ''}. "
                            f"{duplicates} exact duplicate file(s) left out (each kept once, in one split)."))
    blocks += _quality_blocks(meta)
    if per_class:
        splits = [s for s in ("train", "val", "test") if s in per_class]
        rows = [[c, *(f"{per_class[s].get(c, 0):,}" for s in splits)] for c in classes]
        if len(rows) > MANY_CLASSES:
            rows = sorted(rows, key=lambda r: int(r[1].replace(",", "")))[:TOP_ROWS]
            blocks.append(("p", f"The {TOP_ROWS} classes with the fewest training images "
                                "(data/processed/manifest.csv lists every image):"))
        blocks.append(("table", ["Class", *splits], rows, "l" + "r" * len(splits)))
    shown = classes[:MANY_CLASSES]
    keep = np.isin(train.labels, np.arange(len(shown)))
    caption = f"The first {cfg.samples_per_class} training images of each class" + (
        f" (the first {MANY_CLASSES} of {len(classes)} classes)." if len(classes) > MANY_CLASSES else ".")
    blocks.append(("img", "samples.png", caption,
                   plots.sample_grid(train.images[keep], train.labels[keep], shown, cfg.samples_per_class)))
    return blocks


def _per_class_blocks(per_class: dict[str, dict[str, float]], classes: list[str], names: list[str],
                      best: str) -> list[tuple[Any, ...]]:
    if len(classes) <= MANY_CLASSES:
        return [("img", "per_class.png", "Test accuracy of each model on each class.",
                 plots.per_class_accuracy(per_class, classes)),
                ("table", ["Class", *names], [[c, *(_pct(per_class[n][c]) for n in names)] for c in classes],
                 "l" + "r" * len(names))]
    hardest = sorted(classes, key=lambda c: per_class[best][c])[:TOP_ROWS]
    return [("p", f"The {TOP_ROWS} classes {best} finds hardest (metrics/<model>/test.json has every class):"),
            ("table", ["Class", *names], [[c, *(_pct(per_class[n][c]) for n in names)] for c in hardest],
             "l" + "r" * len(names))]


def _confusion_blocks(m: ModelResults, slug: str, classes: list[str]) -> list[tuple[Any, ...]]:
    if len(classes) <= MANY_CLASSES:
        return [("h3", m.name),
                ("p", "Rows are the actual class, columns the predicted class; the diagonal holds the correct answers."),
                ("img", f"confusion_{slug}.png", f"Confusion matrix of {m.name} on the test set.",
                 plots.confusion_matrix(m.confusion, classes, f"{m.name}: test set"))]
    off = m.confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = [divmod(int(i), len(classes)) for i in np.argsort(-off, axis=None, kind="stable")[:TOP_ROWS]]
    rows = [[classes[a], classes[p], f"{int(off[a, p]):,}"] for a, p in pairs if off[a, p] > 0]
    return [("h3", m.name), ("table", ["Actual", "Predicted", "Test images"], rows, "llr")]


def _champion_blocks(decision: dict[str, Any] | None) -> list[tuple[Any, ...]]:
    """What evaluate recorded about the registered model and the champion (imgclf.champion.recorded)."""
    if decision is None:
        return []
    tags, rec, version = decision["tags"], decision["record"], decision["version"]
    t = {k.removeprefix("promotion."): v for k, v in tags.items()}
    blocks: list[tuple[Any, ...]] = [("h2", "Champion and challenger")]
    if rec is None:
        blocks.append(("p", f"Version {version}: {t.get('outcome', 'no decision recorded')}"
                            f"{' (' + t['reason'] + ')' if t.get('reason') else ''}."))
    else:
        c = rec["comparison"]
        low, high = c["interval"]
        blocks.append(("p", f"Version {version} ({rec['model']}) against the champion, version {rec['champion']}, "
                            f"on the same {c['compared']:,} test images: {rec['outcome']}, {rec['reason']}."))
        blocks += [("p", note) for note in rec["notes"]]
        rows = [["Overall", _pct(c["challenger_accuracy"]), _pct(c["champion_accuracy"]),
                 f"{100 * c['difference']:+.2f} ({100 * c['confidence']:g}% interval {100 * low:+.2f} to "
                 f"{100 * high:+.2f}; McNemar p={c['p_value']:.3g})"]]
        rows += [[f"{cls} (new)" if f["champion"] is None else cls, _pct(f["challenger"]),
                  "n/a" if f["champion"] is None else _pct(f["champion"]),
                  "n/a" if f["drop"] is None else f"{-100 * f['drop'] + 0.0:+.2f}"] for cls, f in c["per_class"].items()]
        blocks += [("table", ["", f"Challenger (version {version})", f"Champion (version {rec['champion']})",
                              "Difference (points)"], rows, "lrrr"),
                   ("p", f"Policy: {t.get('policy', '')}. The record is on the model version (tags promotion.*) "
                         "and its MLflow run (champion/comparison.json).")]
    if rec is not None and rec.get("data_change"):
        blocks += _data_change_blocks(rec["data_change"], rec["champion"])
    if t.get("manual.action"):
        blocks.append(("p", f"Since then {t['manual.action']} by hand by {t.get('manual.by', 'unknown')} "
                            f"(replacing version {t.get('manual.replaced', 'none')}): {t.get('manual.reason', '')}."))
    return blocks


def _data_change_blocks(change: dict[str, Any], champion: str) -> list[tuple[Any, ...]]:
    """The data the champion learned against today's, from both manifests (imgclf.champion.data_change)."""
    blocks: list[tuple[Any, ...]] = [("h3", "What changed in the data")]
    counts, changes = change["counts"], change["changes"]
    if not changes:
        blocks.append(("p", f"Nothing: today's images are the ones version {champion} learned from."))
    if change["moved_split"]:
        blocks.append(("p", f"Warning: {change['moved_split']} image(s) changed split since version {champion}'s "
                            "data (a changed preprocess.seed or fraction): its test and training images overlap "
                            "today's."))
    zero = {"train": 0, "val": 0, "test": 0}
    rows = []
    for cls in sorted(set(counts["old"]) | set(counts["new"])):
        old, new, n = counts["old"].get(cls, zero), counts["new"].get(cls, zero), changes.get(cls, {})
        rows.append([cls, "/".join(str(old[s]) for s in ("train", "val", "test")),
                     "/".join(str(new[s]) for s in ("train", "val", "test")), str(n.get("added", 0)),
                     str(n.get("removed", 0)), str(n.get("relabelled_in", 0)), str(n.get("relabelled_out", 0))])
    blocks.append(("table", ["class", f"version {champion} learned (train/val/test)", "today (train/val/test)",
                             "added", "removed", "relabelled in", "relabelled out"], rows, "lrrrrrr"))
    if change["relabelled"]:
        shown = ", ".join(f"{r['path']} ({r['from']} → {r['to']})" for r in change["relabelled"])
        blocks.append(("p", f"Relabelled, e.g.: {shown}."))
    return blocks


def _blocks(inputs: ReportInputs, cfg: ReportConfig, run_links: dict[str, str | None],
            decision: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """The report as a list of (kind, ...) blocks; ("img", file, caption, png) carries its figure."""
    meta, models, train, test = inputs.meta, inputs.models, inputs.train, inputs.test
    classes, counts, names = list(meta["classes"]), meta["counts"], [m.name for m in models]
    slugs = _slugs(names)
    # max() keeps the first of equals, so a tie goes to the model listed first in params.yaml.
    best = max(models, key=lambda m: m.test["test/accuracy"])
    comparison = [[m.name, f"{m.train['parameters']:,}", _epoch(m.train), _pct(m.train["val/accuracy"]),
                   _pct(m.test["test/accuracy"]), f"{m.test['test/loss']:.4f}", f"{m.timing['train_seconds']:.1f}",
                   f"{m.timing['images_per_s']:,.0f}", f"{m.timing['threads']} / {m.timing['precision']}",
                   run_links.get(m.name) or "not recorded"] for m in models]
    per_class = {m.name: m.test["test/per_class_accuracy"] for m in models}
    n_grid = min(cfg.prediction_grid, len(test.labels))
    wrong = int(np.count_nonzero(best.predicted[:n_grid] != test.labels[:n_grid]))
    torch_versions = sorted({str(m.timing["torch"]) for m in models})
    return [
        ("h1", f"{meta.get('title') or meta['dataset']}: {_and(names)}"),
        ("p", f"{counts.get('train', 0):,} training, {counts.get('val', 0):,} validation and "
              f"{counts.get('test', 0):,} test images of {'×'.join(map(str, meta['shape']))} pixels "
              f"in {len(classes)} classes."),
        ("h2", "How the two models see an image"), *_teaching(list(meta["shape"])),
        ("h2", "The data"), *_data_blocks(meta, train, cfg),
        ("h2", "Model comparison"),
        ("table", ["Model", "Parameters", "Best epoch", "Val accuracy", "Test accuracy", "Test loss",
                   "Training time (s)", "Images/s", "Threads / precision", "MLflow run"], comparison, "lrrrrrrrll"),
        ("p", f"Highest test accuracy: {best.name} ({_pct(best.test['test/accuracy'])}). Validation accuracy is "
              "that of the best epoch, whose weights were kept. Training time, images/s and threads depend on "
              "the machine and vary between runs; every other number is reproducible."),
        ("h2", "Training curves"),
        ("img", "curves.png", "Loss and accuracy per epoch: dashed lines are the training split, solid lines "
         "the validation split.", plots.training_curves({m.name: m.history for m in models})),
        ("h2", "Accuracy per class"),
        *_per_class_blocks(per_class, classes, names, best.name),
        ("h2", "Confusion matrices" if len(classes) <= MANY_CLASSES else "Most confused classes"),
        *[block for m, slug in zip(models, slugs) for block in _confusion_blocks(m, slug, classes)],
        ("h2", "Predictions on test images"),
        ("img", "predictions.png", f"The first {n_grid} test images as classified by {best.name}, the model "
         "with the highest test accuracy: predicted class with the actual class in brackets, green when right, "
         f"red when wrong ({wrong} of {n_grid} wrong).",
         plots.prediction_grid(test.images, test.labels, best.predicted, classes, n_grid)),
        ("h2", "Most confident mistakes"),
        *[block for m, slug in zip(models, slugs) for block in (("h3", m.name), *_mistakes(m, slug, test, classes))],
        *_champion_blocks(decision),
        ("footer", f"Data set: {meta['dataset']}, version {_version(meta)}. Validation split: "
                   f"{meta['val_fraction']:g} of the training images, {_split_rule(meta)}, seed {meta['seed']}. "
                   "Normalization: mean "
                   f"{', '.join(f'{v:g}' for v in meta['mean'])}, std {', '.join(f'{v:g}' for v in meta['std'])} "
                   f"(training split, per channel). PyTorch {', '.join(torch_versions)}. "
                   f"Report by imgclf {__version__}."),
    ]


_CSS = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.5}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #d0d7de;padding:.3rem .6rem}th{background:#f6f8fa}
td.r{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}figure{margin:1rem 0}
figcaption,footer{color:#59636e;font-size:.9rem}footer{margin-top:2rem;border-top:1px solid #d0d7de}"""


def _to_html(blocks: list[tuple[Any, ...]]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
             f"<title>{esc(blocks[0][1])}</title>", f"<style>\n{_CSS}\n</style></head>", "<body>"]
    for kind, *args in blocks:
        if kind == "img":
            data = base64.b64encode(args[2]).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(args[1])}">'
                         f"<figcaption>{esc(args[1])}</figcaption></figure>")
        elif kind == "table":
            header, rows, align = args
            parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                         + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f'<td class="{a}">{esc(c)}</td>' for c, a in zip(row, align)) + "</tr>"
                      for row in rows]
            parts.append("</tbody></table>")
        else:  # h1, h2, h3, p, footer: plain text
            parts.append(f"<{kind}>{esc(args[0])}</{kind}>")
    return "\n".join([*parts, "</body>", "</html>"]) + "\n"


def _md(text: str) -> str:
    """Text that Markdown shows literally (no emphasis, links, table breaks or raw HTML)."""
    text = re.sub(r"([\\`*_\[\]|#])", r"\\\1", text)
    return html.escape(text, quote=False)


def _to_markdown(blocks: list[tuple[Any, ...]]) -> str:
    out = []
    for kind, *args in blocks:
        if kind == "img":
            out.append(f"![{_md(args[1])}](figures/{args[0]})\n\n*{_md(args[1])}*")
        elif kind == "table":
            header, rows, align = args
            lines = [header, [":---" if a == "l" else "---:" for a in align], *rows]
            out.append("\n".join("| " + " | ".join(c if i == 1 else _md(c) for c in line) + " |"
                                 for i, line in enumerate(lines)))
        elif kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md(args[0]))
        else:
            out.append(("---\n\n" if kind == "footer" else "") + _md(args[0]))
    return "\n\n".join(out) + "\n"


def build_report(inputs: ReportInputs, cfg: ReportConfig, run_links: dict[str, str | None],
                 decision: dict[str, Any] | None = None) -> Report:
    """Figures, HTML and Markdown for the models in `inputs`, in the order they were given;
    `decision`: what evaluate recorded about the registered model and the champion."""
    blocks = _blocks(inputs, cfg, run_links, decision)
    figures = {block[1]: block[3] for block in blocks if block[0] == "img"}
    return Report(html=_to_html(blocks), markdown=_to_markdown(blocks), figures=figures)
