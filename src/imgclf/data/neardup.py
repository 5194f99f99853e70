"""Near-duplicates: the same picture saved at another size, JPEG quality or with a small crop.

Their bytes differ, so the content-hash split rule (imgclf.data.folder) may put one copy in
training and another in test, and test accuracy is then overstated. Each image gets perceptual
hashes of the pixels the model sees (DCT hashes: which of the lowest frequencies of its 32x32
gray version lie above their median), so copies that differ only in size or encoding hash
alike: a coarse one (8x8 frequencies, 64 bits) finds candidates; a candidate pair is a near
duplicate when its fine hashes (16x16 frequencies, 256 bits) nearly agree, or when its 8x8
gray thumbnails do (the fine hash's high frequencies are noise in a smooth picture, whose
copies it would miss; the thumbnails alone would confuse similar items on a plain background,
which the fine hash tells apart). Groups are the connected sets of near-duplicate pairs.

Candidates are found without comparing every image with every other: cut into
COARSE_DISTANCE + 1 bit bands, two coarse hashes that differ in at most COARSE_DISTANCE bits
agree exactly on at least one band (pigeonhole), so only images sharing a band's value are
compared. The cost per image is then about constant, and memory is 104 bytes per image (the
manifest holds ~130) plus one band's sort order.

Measured on Fashion-MNIST's 10,000 test images (docs/lineage.md, "Near-duplicates"): 99.9% of
copies resized and 97.8% of copies re-encoded as JPEG (quality 70) are found, and 10 of the
10,000 images are grouped (5 pairs, one of them an exact copy); a crop of one pixel per side of
a 28-pixel image moves its frequencies as much as another picture would and is not found. The
candidate step misses a few JPEG copies of very smooth pictures (3 of 60 in tests/test_quality.py),
whose coarse bits sit near their median.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image
from scipy.fft import dctn

# Measured on Fashion-MNIST's test images and copies of them (docs/lineage.md): candidates at
# coarse distance <= 4 hold ~98% of JPEG copies and ~100% of resized ones; unrelated candidate
# pairs differ in >= 36 fine bits in 99% of cases, copies in <= 26 in 99%. Thumbnails of
# smooth pictures' copies differ by < 1 gray level on average, similar garments' by > 2 in
# 99.9% of candidate pairs.
COARSE_DISTANCE = 4
FINE_DISTANCE = 24
THUMB_DISTANCE = 2.0  # mean absolute difference of the 8x8 thumbnails, gray levels
FINGERPRINT_WORDS = 13  # one coarse uint64, four fine ones, eight of thumbnail bytes
_SIDE = 32
_BANDS = COARSE_DISTANCE + 1


def _bits(coefficients: np.ndarray) -> np.ndarray:
    flat = coefficients.reshape(-1)
    # The DC term is the mean brightness: a brighter copy is still the same picture. It is
    # always 0, so the rest fill whole bytes.
    return np.concatenate([[False], flat[1:] > np.median(flat[1:])])


def fingerprint(pixels: np.ndarray) -> np.ndarray:
    """The coarse and fine DCT hashes of one image as the model sees it (uint8 (C, H, W)):
    FINGERPRINT_WORDS uint64."""
    gray = pixels.astype(np.float32).mean(axis=0)
    small = Image.fromarray(gray, "F").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR)
    freq = dctn(np.asarray(small, dtype=np.float64), type=2, norm="ortho")
    bits = np.concatenate([_bits(freq[:8, :8]), _bits(freq[:16, :16])])
    thumb = np.asarray(Image.fromarray(gray, "F").resize((8, 8), Image.Resampling.BOX)).round().clip(0, 255)
    return np.concatenate([np.packbits(bits).view(">u8"), thumb.astype(np.uint8).reshape(-1).view(">u8")]).astype(np.uint64)


def _bands(count: int) -> list[tuple[int, int]]:
    """(shift, mask) of each band: 64 bits cut into `count` nearly equal runs."""
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def pairs(prints: np.ndarray, fine_distance: int = FINE_DISTANCE) -> np.ndarray:
    """Index pairs (i < j), shape (n, 2), of near-duplicate fingerprints ((n, FINGERPRINT_WORDS)
    uint64): coarse hashes at most COARSE_DISTANCE bits apart, and fine ones at most
    `fine_distance` or thumbnails at most THUMB_DISTANCE."""
    prints = np.asarray(prints, dtype=np.uint64).reshape(-1, FINGERPRINT_WORDS)
    fine = prints[:, 1:5]
    thumbs = np.ascontiguousarray(prints[:, 5:]).astype(">u8").view(np.uint8).reshape(-1, 64).astype(np.int16)
    found: set[tuple[int, int]] = set()
    hashes = prints[:, 0]
    for shift, mask in _bands(_BANDS):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[lo:hi]
            h = hashes[members]
            near = np.triu(np.bitwise_count(h[:, None] ^ h[None, :]) <= COARSE_DISTANCE, k=1)
            a, b = np.nonzero(near)
            if not len(a):
                continue
            fine_apart = np.bitwise_count(fine[members[a]] ^ fine[members[b]]).sum(axis=1)
            thumb_apart = np.abs(thumbs[members[a]] - thumbs[members[b]]).mean(axis=1)
            keep = (fine_apart <= fine_distance) | (thumb_apart <= THUMB_DISTANCE)
            for i, j in zip(members[a[keep]].tolist(), members[b[keep]].tolist()):
                found.add((i, j) if i < j else (j, i))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def groups(n: int, matched: np.ndarray) -> list[list[int]]:
    """Connected sets (two or more members, each sorted) of indices 0..n-1 linked by `matched` pairs."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in matched.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    return sorted(m for m in members.values() if len(m) > 1)
