"""Checks of an image folder's decoded images that no single file shows: images that lose their
content when transparency becomes pixels, and near-duplicates across splits.

Both are measured on the pixels the model sees (imgclf.data.folder decodes once and records
what it saw of each image in `Looks`) and recorded in meta.json, the report, MLflow and the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.data import neardup
from imgclf.errors import DataError

log = logging.getLogger(__name__)

# Blank images: how far above the opaque images' share of (nearly) uniform images the whole
# data set's share may be. Twice that share, and at least 5 points more (a few blank photos in
# a folder of thousands are normal; a transparency rule that blanks a fifth of them is not);
# more than half blank is refused whatever the opaque images show.
BLANK_MARGIN, BLANK_CEILING = 0.05, 0.5
# Fewer opaque images than this say nothing about the data set's own share of blank ones.
MIN_BASELINE = 20
EXAMPLES = 5
SPLIT_ORDER = ("test", "val", "train")  # the split that keeps a near-duplicate group: the first


@dataclass
class Looks:
    """What decoding saw of each image, by row: arrays, so a data set's worth costs ~110 bytes
    per image, not a Python object each."""

    transparent: np.ndarray  # bool: the file had transparency
    uniform: np.ndarray  # bool: the pixels the model sees show (nearly) nothing
    prints: np.ndarray  # uint64 (n, neardup.FINGERPRINT_WORDS); zeros where uniform

    @classmethod
    def empty(cls, n: int) -> Looks:
        return cls(np.zeros(n, bool), np.zeros(n, bool), np.zeros((n, neardup.FINGERPRINT_WORDS), np.uint64))

    def record(self, row: int, transparent: bool, uniform: bool, fingerprint: bytes) -> None:
        self.transparent[row], self.uniform[row] = transparent, uniform
        if fingerprint:
            self.prints[row] = np.frombuffer(fingerprint, dtype=np.uint64)


def blank_limit(opaque_share: float | None) -> float:
    """The highest share of (nearly) uniform images accepted, given the opaque images' own."""
    base = opaque_share or 0.0
    return min(BLANK_CEILING, max(2 * base, base + BLANK_MARGIN))


def check_blank(where: str, images: Sequence[tuple[str, int]], looks: Looks, transparency: str,
                stop: bool) -> dict[str, Any]:
    """Count the images (path, row of `looks`) that come out (nearly) uniform; stop (or warn) when
    far more do than the opaque images' share says to expect. Returns the counts for meta.json."""
    total = len(images)
    rows = np.array([row for _, row in images], dtype=np.int64)
    uniform, transparent = looks.uniform[rows], looks.transparent[rows]
    blank = [images[k][0] for k in np.flatnonzero(uniform)]
    opaque = int((~transparent).sum())
    opaque_blank = int((uniform & ~transparent).sum())
    opaque_share = opaque_blank / opaque if opaque >= MIN_BASELINE else None
    share = len(blank) / total if total else 0.0
    summary = {
        "count": len(blank), "share": round(share, 4), "images": total,
        "transparent": total - opaque,
        "transparent_blank": len(blank) - opaque_blank,
        "opaque_share": None if opaque_share is None else round(opaque_share, 4),
        "limit": round(blank_limit(opaque_share), 4), "transparency": transparency, "examples": blank[:EXAMPLES],
    }
    if share <= summary["limit"]:
        if blank:
            log.info("%s: %d of %d images come out (nearly) uniform", where, len(blank), total)
        return summary
    against = (f"against {opaque_share:.0%} of its opaque images" if opaque_share is not None
               else f"with too few opaque images to compare ({opaque})")
    cause = (f"; {summary['transparent_blank']} of them are transparent images composited onto "
             f"{'the contrasting background' if transparency == 'auto' else transparency}"
             if summary["transparent_blank"] else "")
    message = (f"{where}: {len(blank)} of {total} images ({share:.0%}) come out (nearly) uniform, {against} "
               f"(limit {summary['limit']:.0%}){cause}, e.g. {', '.join(blank[:3])}; check the images or the "
               "datasets entry's transparency (auto keeps dark glyphs visible), or set blank_images: warn to go on")
    if stop:
        raise DataError(message)
    log.warning("%s", message)
    return summary


@dataclass(frozen=True)
class NearDuplicates:
    left_out: dict[str, str]  # path -> manifest note, for images kept out of their split
    summary: dict[str, Any]


def near_duplicates(where: str, paths: Sequence[str], splits: np.ndarray, looks: Looks,
                    keep_together: bool) -> NearDuplicates:
    """Group the used images that are near-duplicates, and count the groups that span splits.
    By row of `looks` (rows follow the paths' order): `paths`, and `splits`, each used image's
    split as an index into SPLIT_ORDER (-1: not used). Arrays, not a Python object per image:
    what this adds to preprocess's memory is ~40 bytes per image beyond the fingerprints.

    keep_together: each group is used in one split only, the first of test, val, train that
    holds one of its images; its images in later splits stay in the manifest with their own
    split, marked unused. No image ever changes split (each split is still its content hash's),
    so adding images never moves one; a new near-duplicate in test can only take an existing
    training image out of use, which is what keeps test images unseen.
    """
    candidates = np.flatnonzero((splits >= 0) & ~looks.uniform)  # ascending: by path
    found = [candidates[g] for g in neardup.groups(neardup.pairs(looks.prints, among=candidates))]
    across = [g for g in found if len(set(splits[g].tolist())) > 1]
    left_out: dict[str, str] = {}
    if keep_together:
        for g in across:
            anchor = g[np.argmin(splits[g])]  # the first image of the most protected split
            keep = splits[anchor]
            left_out.update({paths[r]: f"near-duplicate of {paths[anchor]} ({SPLIT_ORDER[keep]})"
                             for r in g if splits[r] != keep})
    summary = {
        "action": "keep_together" if keep_together else "report",
        "groups": len(found), "images": int(sum(len(g) for g in found)),
        "groups_across_splits": len(across), "left_out": len(left_out),
        "examples": [[{"path": paths[r], "split": SPLIT_ORDER[splits[r]]} for r in g] for g in across[:EXAMPLES]],
    }
    if across:
        what = (f"{len(left_out)} image(s) left out so that each group is used in one split" if keep_together
                else "set near_duplicates: keep_together to use each group in one split")
        log.warning("%s: %d near-duplicate group(s) span splits (e.g. %s); %s", where, len(across),
                    ", ".join(f"{paths[r]} ({SPLIT_ORDER[splits[r]]})" for r in across[0][:3]), what)
    elif found:
        log.info("%s: %d near-duplicate group(s), each within one split", where, len(found))
    return NearDuplicates(left_out, summary)
