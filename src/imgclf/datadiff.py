"""`imgclf-data-diff`: what changed in an image folder between two versions of the project.

    imgclf-data-diff OLD [NEW] [--json] [--repo PATH]

OLD and NEW are git revisions (NEW defaults to the working tree). Each version's
`data/processed/manifest.csv` (every image's path, class, split and content SHA-256, written by
preprocess) is read through DVC: from the working tree, the local cache, or the remote, so a
fresh clone with only the `.dvc` files, `dvc.lock` and the remote will do. No image is read.

Images are matched by content, so per class the diff says how many were added, removed,
relabelled (the same picture under another class) and moved between splits. A content's
split is a function of its hash and the split seed alone, so a move means the seed or the
fractions changed (or a near-duplicate group now keeps it out): it is said loudly. Then the
class-count table of both versions.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from imgclf import cli
from imgclf.errors import ConfigError, DataError
from imgclf.paths import ROOT

MANIFEST = "data/processed/manifest.csv"
WORKING_TREE = "working tree"
SPLITS = ("train", "val", "test")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"imgclf-data-diff: {message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="imgclf-data-diff", description=__doc__.splitlines()[0])
    parser.add_argument("old", help="a git revision")
    parser.add_argument("new", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the project's repository (default: this one)")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Image:
    path: str
    label: str
    split: str


def read_manifest(revision: str | None, repo: Path = ROOT) -> dict[str, Image]:
    """content SHA-256 -> the image preprocess used for it (duplicates and skipped rows left
    out), from `revision`'s manifest (None: the working tree's)."""
    if revision is None:
        path = repo / MANIFEST
        if not path.is_file():
            raise DataError(f"{MANIFEST}: not in the working tree (run `dvc repro` or `dvc pull {MANIFEST}`; "
                            "only image folders have a manifest)")
        text = path.read_text(encoding="utf-8")
    else:
        text = _read_at(revision, repo)
    return parse_manifest(text, f"{MANIFEST} at {revision or WORKING_TREE}")


def parse_manifest(text: str, where: str) -> dict[str, Image]:
    """A manifest's used images by content SHA-256 (duplicates and skipped rows left out)."""
    images: dict[str, Image] = {}
    try:
        for row in csv.DictReader(io.StringIO(text)):
            if row["sha256"] and not row["note"]:
                images[row["sha256"]] = Image(row["path"], row["class"], row["split"])
    except (KeyError, csv.Error) as exc:
        raise DataError(f"{where}: not a manifest ({exc})") from None
    return images


def _read_at(revision: str, repo: Path) -> str:
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError
    from dvc.scm import RevError
    from dvc_data.index.index import DataIndexError

    try:
        return dvc.api.read(MANIFEST, repo=str(repo), rev=revision, encoding="utf-8")
    except RevError:
        raise DataError(f"{revision}: not a git revision of this repository") from None
    except (FileNotFoundError, PathMissingError):
        raise DataError(f"{revision}: has no {MANIFEST} (its data set is not an image folder, or its results "
                        "were not committed: dvc.lock names no data/processed there)") from None
    except (DvcException, DataIndexError) as exc:
        # DataIndexError: DVC could not load the folder's listing (its .dir object) from the cache
        # or the remote; its message names the folder, the cause is chained.
        cause = exc.__cause__ or exc
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise DataError(f"{revision}: could not fetch {MANIFEST} from the DVC cache or remote ({reason}); "
                        "check `dvc remote list` and that the remote is reachable") from None


def diff(old: dict[str, Image], new: dict[str, Image]) -> dict[str, Any]:
    """Per class: added, removed, relabelled (in and out) and moved between splits; and the
    images per class and split of both versions."""
    per_class: dict[str, Counter] = defaultdict(Counter)
    relabelled, moved = [], []
    for sha, img in new.items():
        before = old.get(sha)
        if before is None:
            per_class[img.label]["added"] += 1
        elif before.label != img.label:
            per_class[before.label]["relabelled_out"] += 1
            per_class[img.label]["relabelled_in"] += 1
            relabelled.append({"path": img.path, "from": before.label, "to": img.label})
        if before is not None and before.split != img.split:
            per_class[img.label]["moved_split"] += 1
            moved.append({"path": img.path, "from": before.split, "to": img.split})
    for sha, img in old.items():
        if sha not in new:
            per_class[img.label]["removed"] += 1
    return {
        "changes": {c: dict(per_class[c]) for c in sorted(per_class)},
        "relabelled": sorted(relabelled, key=lambda r: r["path"]),
        "moved_split": sorted(moved, key=lambda r: r["path"]),
        "counts": {"old": _counts(old), "new": _counts(new)},
    }


def _counts(images: dict[str, Image]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = defaultdict(Counter)
    for img in images.values():
        table[img.label][img.split] += 1
    return {c: {s: table[c][s] for s in SPLITS} for c in sorted(table)}


def format_diff(result: dict[str, Any]) -> str:
    old, new = result["old"], result["new"]
    lines = [f"data: {old} -> {new}"]
    changes = result["changes"]
    if not changes:
        lines.append("  no image added, removed, relabelled or moved")
    for c, n in changes.items():
        parts = [f"{n[k]} {label}" for k, label in (("added", "added"), ("removed", "removed"),
                                                    ("relabelled_in", "relabelled in"),
                                                    ("relabelled_out", "relabelled out"),
                                                    ("moved_split", "moved split")) if n.get(k)]
        lines.append(f"  {c}: {', '.join(parts)}")
    for r in result["relabelled"][:10]:
        lines.append(f"    relabelled: {r['path']} ({r['from']} -> {r['to']})")
    if result["moved_split"]:
        moved = result["moved_split"]
        lines.append(f"  WARNING: {len(moved)} image(s) changed split (e.g. {moved[0]['path']}: {moved[0]['from']} -> "
                     f"{moved[0]['to']}): the split seed or fractions changed, so test images of {old} may now "
                     "train, and accuracies of the two versions do not compare")
    lines.append(f"  {'class':<20} {'old train/val/test':>20} {'new train/val/test':>20}")
    counts = result["counts"]
    zero = dict.fromkeys(SPLITS, 0)
    for c in sorted(set(counts["old"]) | set(counts["new"])):
        a, b = counts["old"].get(c, zero), counts["new"].get(c, zero)
        lines.append(f"  {c:<20} {'/'.join(str(a[s]) for s in SPLITS):>20} {'/'.join(str(b[s]) for s in SPLITS):>20}")
    return "\n".join(lines)


def compare(old: str, new: str | None, repo: Path = ROOT) -> dict[str, Any]:
    result = diff(read_manifest(old, repo), read_manifest(new, repo))
    return {"old": old, "new": new or WORKING_TREE, **result}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = compare(args.old, args.new, args.repo)
    sys.stdout.write((json.dumps(result, indent=2) if args.json else format_diff(result)) + "\n")


def entry_point() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry_point()
