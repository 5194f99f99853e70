"""The model card of a registered version: a short Markdown page saying what the model
classifies, on which data, how well (with exact intervals), how it was trained, what the
champion decision was, where it falls short and how to get it back.

Pure: the facts the evaluate stage already holds come in (the test confusion counts, meta.json,
the run's params and tags, the version's `promotion.*` tags), Markdown comes out; no figure
is typed here. imgclf.champion.record_card writes it onto the version (artifact and description).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imgclf.data.dataset import source_version
from imgclf.promotion import exact_interval

ARTIFACT = "model_card/model_card.md"  # on the version's run
TITLE = "# Model card: "  # every card's first line starts so
CONFIDENCE = 0.95
# MLflow keeps a model version's description in a VARCHAR(5000) column (its SQL stores'
# model_versions.description): PostgreSQL refuses a longer one, SQLite would keep it whole.
DESCRIPTION_LIMIT = 5000
LOW_CLASS_GAP = 0.10  # a class this far below the overall test accuracy is a known limit
WIDE_INTERVAL = 0.10  # a class whose 95% interval is wider than this has too few test images to tell
TOP_CONFUSIONS = 5
SHOWN_CLASS_NAMES = 20  # in the card's first line; the table names every class


@dataclass(frozen=True)
class Facts:
    """Everything a card says, as the evaluate stage and MLflow hold it."""

    name: str  # the registered model
    version: str
    model_key: str  # its key under `models` in params.yaml
    run_id: str
    classes: list[str]
    confusion: list[list[int]]  # counts[i][j]: test images of class i predicted as class j
    meta: dict[str, Any]  # the processed data's meta.json
    params: dict[str, str]  # the run's params as training logged them (train.*, model.*); may be empty
    run_tags: dict[str, str]  # git_commit, data_version, data_source_version, best_epoch
    decision: dict[str, str]  # the version's promotion.* tags, prefix removed; may be empty


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def _points(x: float) -> str:
    return f"{100 * x + 0.0:+.2f}"  # + 0.0: no "-0.00"


@dataclass(frozen=True)
class ClassResult:
    name: str
    right: int
    images: int

    @property
    def accuracy(self) -> float:
        return self.right / self.images if self.images else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return exact_interval(self.right, self.images, CONFIDENCE) if self.images else (0.0, 1.0)


def per_class(classes: Sequence[str], confusion: Sequence[Sequence[int]]) -> list[ClassResult]:
    return [ClassResult(c, int(row[i]), int(sum(row))) for i, (c, row) in enumerate(zip(classes, confusion))]


def worst_confusions(classes: Sequence[str], confusion: Sequence[Sequence[int]],
                     top: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
    """(actual, predicted, images), most images first; ties by names, so the card repeats."""
    found = [(classes[i], classes[j], int(n)) for i, row in enumerate(confusion) for j, n in enumerate(row)
             if i != j and n]
    return sorted(found, key=lambda f: (-f[2], f[0], f[1]))[:top]


# --- the sections -------------------------------------------------------------------------------

def _what(f: Facts, results: list[ClassResult]) -> list[str]:
    meta = f.meta
    shape = meta.get("shape") or []
    kind = ""
    if len(shape) == 3:
        kind = f"{shape[1]}x{shape[2]} {'gray' if shape[0] == 1 else 'colour'} "
    names = f.classes[:SHOWN_CLASS_NAMES]
    more = f" and {len(f.classes) - len(names)} more" if len(f.classes) > len(names) else ""
    title = meta.get("title") or meta.get("dataset", "?")
    right, n = sum(r.right for r in results), sum(r.images for r in results)
    low, high = exact_interval(right, n, CONFIDENCE) if n else (0.0, 1.0)
    return [f"{TITLE}{f.name} version {f.version}", "",
            f"`{f.model_key}` classifies {kind}images of {title} (`{meta.get('dataset', '?')}`) into "
            f"{len(f.classes)} classes: {', '.join(names)}{more}.", "",
            f"**Test accuracy: {_pct(right / n if n else 0.0)}** ({100 * CONFIDENCE:g}% interval {_pct(low)} to "
            f"{_pct(high)}, exact) on {n} test images."]


def _split_rule(meta: dict[str, Any]) -> str:
    val, seed = meta.get("val_fraction"), meta.get("seed")
    if val is None:
        return "not recorded in meta.json."
    if meta.get("format") != "folder":
        return (f"the data set's official test split, never trained on; validation: {val} of the training "
                f"images, stratified by class (seed {seed}).")
    rule = f"by each image's content hash (SHA-256) and seed {seed}, so an image keeps its split when others are added"
    if meta.get("test_fraction") is None:
        return f"test: the folder's test/ images; validation: {val} of the others, {rule}."
    return f"test: {meta['test_fraction']}, validation: {val} of the rest, {rule}."


def _data(f: Facts) -> list[str]:
    kind, value = source_version(f.meta)
    source = f.run_tags.get("data_source_version") or value
    processed = f.run_tags.get("data_version") or "unknown"
    return ["", "## Data", "",
            f"- Data version: {kind} `{source}`; processed data (DVC) `{processed}`.",
            f"- Split: {_split_rule(f.meta)}"]


def _table(f: Facts, results: list[ClassResult], shown: int | None) -> list[str]:
    """Images per split and test accuracy per class; `shown`: only the least accurate classes."""
    rows = results
    if shown is not None and shown < len(results):
        least = sorted(results, key=lambda r: (r.accuracy, r.name))[:shown]
        rows = [r for r in results if r in least]
    counts = f.meta.get("counts_per_class") or {}
    lines = ["", "## Test results", "",
             f"| class | train | val | test | test accuracy | {100 * CONFIDENCE:g}% interval |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        low, high = r.interval
        train, val = ((counts.get(s) or {}).get(r.name, "?") for s in ("train", "val"))
        lines.append(f"| {r.name} | {train} | {val} | {r.images} | {_pct(r.accuracy)} | "
                     f"{_pct(low, 1)} to {_pct(high, 1)} |")
    if len(rows) < len(results):
        lines += ["", f"{len(results) - len(rows)} more classes, none less accurate: `{ARTIFACT}` lists every one."]
    return lines


def _confusions(f: Facts) -> list[str]:
    worst = worst_confusions(f.classes, f.confusion)
    if not worst:
        return ["", "No test image misclassified."]
    return ["", "Most confused (actual as predicted, test images): "
            + ", ".join(f"{a} as {p} {n}" for a, p, n in worst) + "."]


def _recipe(f: Facts) -> list[str]:
    p = f.params
    lines = ["", "## Training recipe", ""]
    if "train.epochs" not in p:
        return [*lines, f"Not recorded on run `{f.run_id}` (the model came from DVC's cache or a remote): "
                        "params.yaml at the commit below has it."]
    arch = {k.removeprefix("model."): v for k, v in p.items()
            if k.startswith("model.") and k not in ("model.arch", "model.parameters")}
    size = f" ({p['model.parameters']} parameters)" if "model.parameters" in p else ""
    lines.append(f"- Architecture: {p.get('model.arch', '?')}, "
                 + ", ".join(f"{k} {v}" for k, v in sorted(arch.items())) + size + ".")
    best = f" (best checkpoint: epoch {f.run_tags['best_epoch']})" if f.run_tags.get("best_epoch") else ""
    augment = "none"
    if p.get("train.augment") == "True":
        found = f.meta.get("augment") or {}
        parts = ([f"shifts of up to {found['shift']} pixels"] if found.get("shift") else []) + (
            ["horizontal flips"] if found.get("flip") else [])
        augment = ", ".join(parts) or "none (the data set defines none)"
    precision = p.get("train.precision_used") or p.get("train.precision", "?")
    lines.append(f"- {p['train.epochs']} epochs{best}, optimizer {p.get('train.optimizer', '?')}, "
                 f"lr {p.get('train.lr', '?')} ({p.get('train.schedule', '?')} schedule), batch size "
                 f"{p.get('train.batch_size', '?')}, augmentation: {augment}, precision {precision}, "
                 f"seed {p.get('train.seed', '?')}.")
    return lines


def _decision(f: Facts) -> list[str]:
    d = f.decision
    lines = ["", "## Champion decision", ""]
    outcome = d.get("outcome")
    if not outcome:
        return [*lines, "None recorded."]
    against = d.get("compared_against", "none")
    head = f"**{outcome}**" if against == "none" else f"**{outcome}** (compared with version {against})"
    text = f"{head}: {d.get('reason', '')}."
    try:
        low, high = (float(x) for x in d["interval"].strip("[]").split(","))
        text += (f" Difference {_points(float(d['difference']))} points ({100 * CONFIDENCE:g}% interval "
                 f"{_points(low)} to {_points(high)}) on the same {d['images']} test images.")
    except (KeyError, ValueError):
        pass  # no comparison (the first champion, another data set's champion)
    return [*lines, text]


def _count(value: Any, *keys: str) -> int | None:
    """A count from a meta.json entry that is either a number or a mapping with one of `keys`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return next((value[k] for k in keys if isinstance(value.get(k), int)), None)
    return None


def _limits(f: Facts, results: list[ClassResult], shown: int | None) -> list[str]:
    """Classes well below the overall accuracy, classes too small to tell, the data's quality
    counts; `shown`: list at most this many classes of each kind."""
    right, n = sum(r.right for r in results), sum(r.images for r in results)
    overall = right / n if n else 0.0
    low_classes = [f"{r.name}: test accuracy {_pct(r.accuracy)}, more than {100 * LOW_CLASS_GAP:g} points below the "
                   f"overall {_pct(overall)}." for r in results if r.images and overall - r.accuracy > LOW_CLASS_GAP]
    small_classes = []
    for r in results:
        low, high = r.interval
        if high - low > WIDE_INTERVAL:
            small_classes.append(f"{r.name}: {r.images} test images, too few to tell: its {100 * CONFIDENCE:g}% "
                                 f"interval is {_pct(low, 1)} to {_pct(high, 1)}.")
    found = []
    for kind, listed in (("below the overall accuracy", low_classes), ("with too few test images", small_classes)):
        cut = listed if shown is None else listed[:shown]
        found += cut
        if len(cut) < len(listed):
            found.append(f"{len(listed) - len(cut)} more classes {kind}: `{ARTIFACT}` lists every one.")
    # Written by preprocess for image folders (near-duplicate groups, uniform images): shown when there.
    near = f.meta.get("near_duplicates")
    groups = _count(near, "groups")
    if groups:
        across = _count(near, "groups_across_splits") if isinstance(near, dict) else None
        where = f", {across} of them across splits" if across is not None else ""
        found.append(f"{groups} groups of near-duplicate images (the same picture resized or re-encoded){where}.")
    blank = f.meta.get("blank_images")
    count = _count(blank, "count")
    if count:
        total = _count(blank, "images") if isinstance(blank, dict) else None
        of = f" of {total}" if total else ""
        found.append(f"{count}{of} images came out (nearly) uniform after preprocessing.")
    lines = ["", "## Known limits", ""]
    return [*lines, *(f"- {x}" for x in found)] if found else [*lines, "None found by the card's checks."]


def _reproduce(f: Facts) -> list[str]:
    commit = f.run_tags.get("git_commit") or "unknown"
    return ["", "## Reproduce", "",
            f"- `imgclf-trace models:/{f.name}/{f.version}` prints its lineage and the commands that restore it.",
            f"- Git commit `{commit}`; MLflow run `{f.run_id}`; this card: `{ARTIFACT}` on that run."]


def build(f: Facts, class_rows: int | None = None) -> str:
    """The card. `class_rows`: show only this many classes in the table (the least accurate) and
    in each list of limits (for a description that must stay under DESCRIPTION_LIMIT); None shows
    every class."""
    results = per_class(f.classes, f.confusion)
    lines = [*_what(f, results), *_data(f), *_table(f, results, class_rows), *_confusions(f), *_recipe(f),
             *_decision(f), *_limits(f, results, class_rows), *_reproduce(f)]
    return "\n".join(lines) + "\n"


def description(f: Facts, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as the version's description: whole when it fits in `limit` characters, else with
    its class lists cut (the table to its least accurate classes); the whole card is the artifact."""
    card = build(f)
    rows = len(f.classes)
    while len(card) > limit and rows > 0:
        rows = rows // 2 if rows > 8 else rows - 1
        card = build(f, class_rows=rows)
    if len(card) > limit:  # only with absurdly long names: cut, and say where the rest is
        tail = f"\n\n(cut at {limit} characters: the whole card is `{ARTIFACT}`)\n"
        card = card[: limit - len(tail)] + tail
    return card
