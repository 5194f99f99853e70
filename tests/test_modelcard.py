"""The model card of a registered version (imgclf.modelcard, imgclf.champion.record_card): the
card from fixed figures, line by line, each figure computed here independently (Clopper-Pearson
bounds by bisection of binomial tails summed by hand); the description kept under MLflow's
limit; and, on a real MLflow store (SQLite), the card on the version and its run after the
champion decision, written once per (champion, test images), and a version from before cards.
The card in the MLflow UI: tests/test_mlflow_ui.py.
"""

from __future__ import annotations

import logging

import numpy as np

from imgclf import champion, modelcard
from imgclf.modelcard import Facts
from test_champion import CLASSES as TOY
from test_champion import Pipeline, _processed, _right_first, name, store  # noqa: F401  (fixtures: store, name)
from test_promotion import _bisect, _lower_tail, _upper_tail


def _cp(right: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% bounds by definition: each tail 2.5%."""
    low = 0.0 if right == 0 else _bisect(lambda p: _upper_tail(right, n, p) - 0.025)
    high = 1.0 if right == n else _bisect(lambda p: 0.025 - _lower_tail(right, n, p))
    return low, high


CLASSES = ["cat", "dog", "fox"]
# Test images of each class (rows) predicted as each class (columns): cat 380 of 400 right,
# dog 280 of 400, fox 18 of 20.
CONFUSION = [[380, 15, 5], [100, 280, 20], [1, 1, 18]]
META = {
    "dataset": "pets", "title": "Pets at home", "format": "folder", "classes": CLASSES, "shape": [3, 32, 32],
    "counts_per_class": {"train": {"cat": 1500, "dog": 1400, "fox": 70}, "val": {"cat": 170, "dog": 160, "fox": 9}},
    "val_fraction": 0.1, "test_fraction": 0.2, "seed": 42, "augment": {"shift": 4, "flip": True},
    "version": {"dvc_md5": "0123abcd.dir", "content_sha256": "ffff"},
    # Written by preprocess's quality checks (their final names may differ: the card reads both shapes).
    "near_duplicates": {"groups": 3, "groups_across_splits": 1, "images": 7},
    "blank_images": {"count": 5, "images": 4172},
}
PARAMS = {"train.epochs": "9", "train.optimizer": "sgd", "train.lr": "0.2", "train.schedule": "onecycle",
          "train.batch_size": "256", "train.augment": "True", "train.precision": "auto",
          "train.precision_used": "bf16", "train.seed": "0", "model.arch": "cnn", "model.channels": "[16, 32]",
          "model.hidden": "128", "model.dropout": "0.0", "model.batch_norm": "True", "model.parameters": "25000",
          "data.dataset": "pets"}
TAGS = {"git_commit": "c0ffee", "data_version": "4567.dir", "data_source_version": "0123abcd.dir", "best_epoch": "8"}
DECISION = {"outcome": "promoted", "reason": "significantly better (p=0.00123 < 0.05)", "compared_against": "4",
            "difference": "0.031000", "interval": "[0.012300, 0.049900]", "images": "820"}


def _facts(**changes) -> Facts:
    base = dict(name="pets-classifier", version="5", model_key="cnn", run_id="r1", classes=CLASSES,
                confusion=CONFUSION, meta=META, params=PARAMS, run_tags=TAGS, decision=DECISION)
    return Facts(**{**base, **changes})


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def test_card_from_fixed_figures_reads_line_by_line():
    card = modelcard.build(_facts())
    lines = card.splitlines()
    right, n = 380 + 280 + 18, 820
    low, high = _cp(right, n)
    rows = {}
    for cls, r, k, train, val in (("cat", 380, 400, 1500, 170), ("dog", 280, 400, 1400, 160), ("fox", 18, 20, 70, 9)):
        lo, hi = _cp(r, k)
        rows[cls] = f"| {cls} | {train} | {val} | {k} | {_pct(r / k)} | {_pct(lo, 1)} to {_pct(hi, 1)} |"
    expected = [
        "# Model card: pets-classifier version 5",
        "`cnn` classifies 32x32 colour images of Pets at home (`pets`) into 3 classes: cat, dog, fox.",
        f"**Test accuracy: {_pct(right / n)}** (95% interval {_pct(low)} to {_pct(high)}, exact) on 820 test images.",
        "- Data version: dvc_md5 `0123abcd.dir`; processed data (DVC) `4567.dir`.",
        "- Split: test: 0.2, validation: 0.1 of the rest, by each image's content hash (SHA-256) and seed 42, so an "
        "image keeps its split when others are added.",
        "| class | train | val | test | test accuracy | 95% interval |",
        *rows.values(),
        "Most confused (actual as predicted, test images): dog as cat 100, dog as fox 20, cat as dog 15, "
        "cat as fox 5, fox as cat 1.",
        "- Architecture: cnn, batch_norm True, channels [16, 32], dropout 0.0, hidden 128 (25000 parameters).",
        "- 9 epochs (best checkpoint: epoch 8), optimizer sgd, lr 0.2 (onecycle schedule), batch size 256, "
        "augmentation: shifts of up to 4 pixels, horizontal flips, precision bf16, seed 0.",
        "**promoted** (compared with version 4): significantly better (p=0.00123 < 0.05). Difference +3.10 points "
        "(95% interval +1.23 to +4.99) on the same 820 test images.",
        f"- dog: test accuracy 70.00%, more than 10 points below the overall {_pct(right / n)}.",
        f"- fox: 20 test images, too few to tell: its 95% interval is {_pct(_cp(18, 20)[0], 1)} to "
        f"{_pct(_cp(18, 20)[1], 1)}.",
        "- 3 groups of near-duplicate images (the same picture resized or re-encoded), 1 of them across splits.",
        "- 5 of 4172 images came out (nearly) uniform after preprocessing.",
        "- `imgclf-trace models:/pets-classifier/5` prints its lineage and the commands that restore it.",
        "- Git commit `c0ffee`; MLflow run `r1`; this card: `model_card/model_card.md` on that run.",
    ]
    missing = [line for line in expected if line not in lines]
    assert not missing, f"{missing}\n--- card:\n{card}"
    # Sections in order, the table's rows in class order, cat not among the limits.
    heads = [line for line in lines if line.startswith("## ")]
    assert heads == ["## Data", "## Test results", "## Training recipe", "## Champion decision", "## Known limits",
                     "## Reproduce"]
    assert [lines.index(rows[c]) for c in CLASSES] == sorted(lines.index(rows[c]) for c in CLASSES)
    assert not any(line.startswith("- cat:") for line in lines)
    assert modelcard.build(_facts()) == card  # no clock, no randomness: the same facts, the same bytes


def test_card_of_a_built_in_set_without_recipe_decision_or_quality_counts():
    meta = {k: v for k, v in META.items() if k not in ("near_duplicates", "blank_images", "test_fraction")}
    meta.update(format="idx", shape=[1, 28, 28], version={"checksums": "9a9a"})
    confusion = [[400, 0, 0], [0, 400, 0], [0, 0, 400]]
    card = modelcard.build(_facts(meta=meta, confusion=confusion, params={}, decision={},
                                  run_tags={"git_commit": "c0ffee"}))
    lines = card.splitlines()
    for line in ("- Data version: checksums `9a9a`; processed data (DVC) `unknown`.",
                 "- Split: the data set's official test split, never trained on; validation: 0.1 of the training "
                 "images, stratified by class (seed 42).",
                 "No test image misclassified.",
                 "Not recorded on run `r1` (the model came from DVC's cache or a remote): params.yaml at the commit "
                 "below has it.",
                 "None recorded.",
                 "None found by the card's checks."):
        assert line in lines, f"{line!r} not in:\n{card}"
    assert "near-duplicate" not in card and "uniform" not in card
    # An older meta.json's plain counts read too.
    older = modelcard.build(_facts(meta={**META, "near_duplicates": 2, "blank_images": 0}))
    assert "- 2 groups of near-duplicate images (the same picture resized or re-encoded)." in older.splitlines()
    assert "uniform" not in older


def test_description_stays_under_the_stores_limit():
    many = [f"class-{i:03d}" for i in range(120)]
    confusion = np.full((120, 120), 1, dtype=int)
    np.fill_diagonal(confusion, np.arange(120) + 100)
    facts = _facts(classes=many, confusion=confusion.tolist(), meta={**META, "classes": many})
    card = modelcard.build(facts)
    assert len(card) > modelcard.DESCRIPTION_LIMIT
    short = modelcard.description(facts)
    assert len(short) <= modelcard.DESCRIPTION_LIMIT
    lines = short.splitlines()
    # Title and test accuracy as in the whole card; the table keeps the least accurate classes.
    assert lines[0] == card.splitlines()[0]
    assert [x for x in lines if x.startswith("**Test accuracy")] == [x for x in card.splitlines()
                                                                    if x.startswith("**Test accuracy")]
    shown = [x.split(" | ")[0].removeprefix("| ") for x in lines if x.startswith("| class-")]
    assert shown and shown == many[: len(shown)]  # class-000 is the least accurate (100 of 219)
    assert f"{120 - len(shown)} more classes, none less accurate: `model_card/model_card.md` lists every one." in lines
    assert modelcard.description(_facts()) == modelcard.build(_facts())  # a short card goes whole


# --- on a real MLflow store ---------------------------------------------------------------------

def _confusion(actual: list[str], predicted: list[int], classes: list[str]) -> list[list[int]]:
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for a, p in zip(actual, predicted):
        counts[classes.index(a), p] += 1
    return counts.tolist()


def test_card_is_on_the_version_and_its_run_once_per_pair(store, name, tmp_path, caplog):  # noqa: F811
    import mlflow
    from mlflow import MlflowClient

    processed, meta, actual = _processed(tmp_path, TOY)
    meta = {**meta, "title": "Toy", "val_fraction": 0.1, "seed": 42}
    pipe = Pipeline(store, name, processed, meta, actual)
    digest = champion.test_digest(processed)
    client = MlflowClient()

    def evaluate_and_card(right):
        decided = pipe.evaluate(right)
        confusion = _confusion(actual, _right_first(actual, right, TOY), TOY)
        return decided, champion.record_card(name, decided.version, pipe.run_id, "cnn", TOY, confusion, meta, digest)

    first, wrote = evaluate_and_card({"a": 80, "b": 80, "c": 80, "d": 80})
    assert wrote and first.outcome == "first"
    version = client.get_model_version(name, first.version)
    artifact = mlflow.artifacts.load_text(f"runs:/{pipe.run_id}/{modelcard.ARTIFACT}")
    assert version.description == artifact
    assert artifact.splitlines()[0] == f"# Model card: {name} version {first.version}"
    low, high = _cp(320, 400)
    assert (f"**Test accuracy: 80.00%** (95% interval {_pct(low)} to {_pct(high)}, exact) on 400 test images."
            in artifact.splitlines())
    assert "**first**: there was no champion." in artifact.splitlines()
    assert version.tags[champion.CARD_TAG] == f"none {digest}"

    better, wrote = evaluate_and_card({"a": 98, "b": 98, "c": 98, "d": 98})
    assert wrote and better.outcome == "promoted"
    card = client.get_model_version(name, better.version).description
    assert f"**promoted** (compared with version {first.version}): " in card
    assert "Difference +18.00 points" in card

    # The same pair again: the decision's record stands, and so does the card (no new artifact
    # either: the run's file keeps its bytes).
    caplog.set_level(logging.INFO, logger="imgclf.champion")
    confusion = _confusion(actual, _right_first(actual, {c: 98 for c in TOY}, TOY), TOY)
    before = client.get_model_version(name, better.version)
    assert not champion.record_card(name, better.version, pipe.run_id, "cnn", TOY, confusion, meta, digest)
    after = client.get_model_version(name, better.version)
    assert after.description == before.description == card
    assert after.last_updated_timestamp == before.last_updated_timestamp
    assert "its model card (compared against" in caplog.text and "stands" in caplog.text
    # Other test images (a changed data version) are another pair: a new card.
    assert champion.record_card(name, better.version, pipe.run_id, "cnn", TOY, confusion, meta, "other-digest")


def test_a_version_from_before_cards_gets_one_and_keeps_a_hand_written_description(store, name, tmp_path, caplog):  # noqa: F811
    import mlflow
    from mlflow import MlflowClient

    processed, meta, actual = _processed(tmp_path, TOY)
    pipe = Pipeline(store, name, processed, meta, actual)
    client = MlflowClient()
    old = pipe.evaluate({"a": 90, "b": 90, "c": 90, "d": 90})  # decided, no card: the pipeline before cards
    assert champion.CARD_TAG not in client.get_model_version(name, old.version).tags
    assert client.get_model_version(name, old.version).description in ("", None)
    client.update_model_version(name, old.version, description="Trained by Ana on the March export.")

    confusion = _confusion(actual, _right_first(actual, {c: 90 for c in TOY}, TOY), TOY)
    caplog.set_level(logging.WARNING, logger="imgclf.champion")
    assert champion.record_card(name, old.version, pipe.run_id, "cnn", TOY, confusion, meta,
                                champion.test_digest(processed))
    version = client.get_model_version(name, old.version)
    assert version.description == "Trained by Ana on the March export."
    assert "written by hand and stays" in caplog.text
    card = mlflow.artifacts.load_text(f"runs:/{pipe.run_id}/{modelcard.ARTIFACT}")
    # meta.json of a minimal processed set (no title, counts or split keys) still gives a card.
    assert card.startswith(f"# Model card: {name} version {old.version}\n")
    assert "images of toy (`toy`) into 4 classes: a, b, c, d." in card

    # A card whose writing stopped before its tag (the description is a card, no tag): replaced.
    client.delete_model_version_tag(name, old.version, champion.CARD_TAG)
    client.update_model_version(name, old.version, description=f"{modelcard.TITLE}{name} version {old.version}\n")
    assert champion.record_card(name, old.version, pipe.run_id, "cnn", TOY, confusion, meta,
                                champion.test_digest(processed))
    assert client.get_model_version(name, old.version).description == card
