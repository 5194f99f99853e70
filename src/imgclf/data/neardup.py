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
compared. The cost per image is then about constant, and memory is 112 bytes per image (the
manifest holds ~90-130) plus one band's sort order.

Measured on Fashion-MNIST's 10,000 test images (docs/lineage.md, "Near-duplicates"): 99.9% of
copies resized and 96.1% of copies re-encoded as JPEG (quality 70) are found, and 8 of the
10,000 images are grouped (4 pairs, each within a class); a crop of one pixel per side of
a 28-pixel image moves its frequencies as much as another picture would and is not found. The
candidate step misses a few JPEG copies of very smooth pictures (3 of 60 in tests/test_quality.py),
whose coarse bits sit near their median.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

# Measured on Fashion-MNIST's test images and copies of them (docs/lineage.md): candidates at
# coarse distance <= 4 hold ~98% of JPEG copies and ~100% of resized ones; unrelated candidate
# pairs differ in >= 36 fine bits in 99% of cases, copies in <= 26 in 99%. Thumbnails of
# smooth pictures' JPEG copies differ by at most 0.92 gray levels on average; bench/scale.py's
# generated pictures (a disk on noise) by at least 1.56.
COARSE_DISTANCE = 4
FINE_DISTANCE = 24
THUMB_DISTANCE = 1.0  # mean absolute difference of the 8x8 thumbnails, gray levels
# The hashes see gray only: the same disk in another hue (bench/scale.py's classes) hashes
# alike. A pair must also have nearly the same tint (each channel's mean minus the gray mean,
# which a brighter copy keeps): at most this many levels apart in any channel.
TINT_DISTANCE = 8
FINGERPRINT_WORDS = 14  # one coarse uint64, four fine ones, eight of thumbnail bytes, one of tint
_SIDE = 32
_BANDS = COARSE_DISTANCE + 1


def _dct_rows(n: int, side: int) -> np.ndarray:
    """The first `n` rows of the orthonormal DCT-II matrix of size `side` (scipy.fft.dct's, norm="ortho")."""
    k, x = np.arange(n)[:, None], np.arange(side)[None, :]
    rows = np.sqrt(2 / side) * np.cos(np.pi * (2 * x + 1) * k / (2 * side))
    rows[0] /= np.sqrt(2)
    return rows


# Only the lowest 16x16 frequencies are kept: two small products instead of a full 2-D DCT.
_DCT16 = _dct_rows(16, _SIDE)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    flat = coefficients.reshape(-1)[1:]
    # The DC term is the mean brightness: a brighter copy is still the same picture. It is
    # always 0, so the rest fill whole bytes. The median by partition: np.median costs more
    # than the whole transform at this size.
    middle = len(flat) // 2
    median = np.partition(flat, middle)[middle]
    return np.concatenate([[False], flat > median])


def fingerprint(pixels: np.ndarray) -> np.ndarray:
    """The coarse and fine DCT hashes and the 8x8 thumbnail of one image as the model sees it
    (uint8 (C, H, W)): FINGERPRINT_WORDS uint64."""
    gray = pixels.mean(axis=0, dtype=np.float32)
    small = np.asarray(Image.fromarray(gray, "F").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    freq = _DCT16 @ small @ _DCT16.T
    bits = np.concatenate([_bits(freq[:8, :8]), _bits(freq)])
    thumb = small.reshape(8, _SIDE // 8, 8, _SIDE // 8).mean(axis=(1, 3)).round().clip(0, 255).astype(np.uint8)
    tint = np.zeros(4, dtype=">i2")
    means = pixels.reshape(len(pixels), -1).mean(axis=1)
    tint[:len(means)] = np.round(means - means.mean())
    return np.concatenate([np.packbits(bits).view(">u8"), thumb.reshape(-1).view(">u8"),
                           tint.view(">u8")]).astype(np.uint64)


def _bands(count: int) -> list[tuple[int, int]]:
    """(shift, mask) of each band: 64 bits cut into `count` nearly equal runs."""
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def pairs(prints: np.ndarray, fine_distance: int = FINE_DISTANCE) -> np.ndarray:
    """Index pairs (i < j), shape (n, 2), sorted, of near-duplicate fingerprints ((n,
    FINGERPRINT_WORDS) uint64): coarse hashes at most COARSE_DISTANCE bits apart, and fine ones
    at most `fine_distance` or thumbnails at most THUMB_DISTANCE."""
    prints = np.asarray(prints, dtype=np.uint64).reshape(-1, FINGERPRINT_WORDS)
    hashes, n = prints[:, 0], len(prints)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for shift, mask in _bands(_BANDS):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        # Small buckets all at once: position k against k + d, for each distance d in a bucket
        # (one vectorized step per d). The few large buckets one by one.
        small = np.repeat(sizes <= _SMALL_BUCKET, sizes)
        end = np.repeat(starts + sizes, sizes)
        for d in range(1, int(sizes[sizes <= _SMALL_BUCKET].max(initial=1))):
            k = np.flatnonzero(small[:-d] & (np.arange(d, n) < end[:-d]))
            found.append(_confirmed(prints, order[k], order[k + d], fine_distance))
        for lo, size in zip(starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET]):
            members = order[lo:lo + size]
            a, b = np.triu_indices(size, k=1)
            found.append(_confirmed(prints, members[a], members[b], fine_distance))
    both = np.concatenate(found)
    both = np.sort(both, axis=1)  # (i, j) with i < j
    return np.unique(both, axis=0) if len(both) else both


# Buckets up to this size are compared in vectorized steps; larger ones (similar pictures on a
# plain background) one by one, as all their pairs at once.
_SMALL_BUCKET = 64


def _confirmed(prints: np.ndarray, a: np.ndarray, b: np.ndarray, fine_distance: int) -> np.ndarray:
    """The pairs (a[k], b[k]) that are near duplicates."""
    near = np.bitwise_count(prints[a, 0] ^ prints[b, 0]) <= COARSE_DISTANCE
    a, b = a[near], b[near]
    fine_apart = np.bitwise_count(prints[a, 1:5] ^ prints[b, 1:5]).sum(axis=1)
    thumbs = prints[:, 5:13]
    ta = np.ascontiguousarray(thumbs[a]).astype(">u8").view(np.uint8).astype(np.int16)
    tb = np.ascontiguousarray(thumbs[b]).astype(">u8").view(np.uint8).astype(np.int16)
    thumb_apart = np.abs(ta - tb).reshape(len(a), -1).mean(axis=1) if len(a) else np.zeros(0)
    tint_a = np.ascontiguousarray(prints[a, 13:]).astype(">u8").view(">i2").astype(np.int32).reshape(len(a), 4)
    tint_b = np.ascontiguousarray(prints[b, 13:]).astype(">u8").view(">i2").astype(np.int32).reshape(len(b), 4)
    same_tint = np.abs(tint_a - tint_b).max(axis=1, initial=0) <= TINT_DISTANCE
    keep = ((fine_apart <= fine_distance) | (thumb_apart <= THUMB_DISTANCE)) & same_tint
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


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
