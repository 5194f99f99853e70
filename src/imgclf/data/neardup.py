"""Near-duplicates: the same picture saved at another size or JPEG quality, or cropped by a hair.

Their bytes differ, so the content-hash split rule (imgclf.data.folder) may put one copy in
training and another in test, and test accuracy is then overstated. Each image gets perceptual
hashes of the pixels the model sees (DCT hashes: which of the lowest frequencies of its 32x32
gray version lie above their median), so copies that differ only in size or encoding hash
alike: a coarse one (8x8 frequencies, 64 bits) finds candidates; a candidate pair is a near
duplicate when its fine hashes (16x16 frequencies, 256 bits) nearly agree, or when its 8x8
gray thumbnails do (the fine hash's high frequencies are noise in a smooth picture, whose
copies it would miss; the thumbnails alone would confuse similar items on a plain background,
which the fine hash tells apart). Groups are the connected sets of near-duplicate pairs.

Candidates are found without comparing every image with every other: with the 64 coarse bits
dealt into COARSE_DISTANCE + 1 bands, two hashes at most COARSE_DISTANCE bits apart agree
exactly on at least one band (pigeonhole), so only images sharing a band's value are compared,
each pair once. Memory is the fingerprints (112 bytes per image, in imgclf.data.quality.Looks),
one band's sort order and bounded blocks of pairs: it grows with the images, however alike
they are; time grows with the pairs in a bucket, so mostly with the images.

Measured by `make bench-scale` (docs/lineage.md, "Near-duplicates"), on Fashion-MNIST's 10,000
test images: 8 are grouped (4 pairs); 100% of copies resized 3x and 96.8% of copies
re-encoded as JPEG quality 70 are found; of copies cropped after a 4x resize, 84% at 1 pixel
per side (0.9%), 11% at 2 pixels and none at 4: a crop moves every frequency, and more than
about 1% per side is not found. The candidate step misses a few JPEG copies of very smooth
pictures (3 of 60 in tests/test_quality.py), whose coarse bits sit near their median.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

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


@lru_cache(maxsize=8)
def _projection(size: int) -> np.ndarray:
    """(24, size) float32: one side of an image resized to _SIDE (Pillow's bilinear filter, as a
    matrix: the resized identity), then its 16 lowest DCT frequencies (rows 0-15) and its mean
    over 8 runs of 4 (rows 16-23, the thumbnail). Resize, transform and thumbnail are all linear,
    so a batch of images takes two matrix products instead of a resize and a DCT each."""
    eye = Image.fromarray(np.eye(size, dtype=np.float32), "F")
    resize = np.asarray(eye.resize((_SIDE, size), Image.Resampling.BILINEAR), dtype=np.float64).T
    pool = np.kron(np.eye(8), np.full(_SIDE // 8, 8 / _SIDE))
    return np.ascontiguousarray(np.vstack([_dct_rows(16, _SIDE) @ resize, pool @ resize]), dtype=np.float32)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    """(n, k, k) -> (n, k*k) bool: which coefficients lie above their image's median."""
    flat = coefficients.reshape(len(coefficients), -1)[:, 1:]
    # The DC term is the mean brightness: a brighter copy is still the same picture. It is
    # always 0, so the rest fill whole bytes. The median by partition: np.median sorts.
    middle = flat.shape[1] // 2
    median = np.partition(flat, middle, axis=1)[:, middle:middle + 1]
    return np.concatenate([np.zeros((len(flat), 1), bool), flat > median], axis=1)


def fingerprints(pixels: np.ndarray) -> np.ndarray:
    """The coarse and fine DCT hashes, the 8x8 thumbnail and the tint of each image of a batch
    as the model sees them (uint8 (n, C, H, W)): (n, FINGERPRINT_WORDS) uint64.

    Each image's fingerprint is the same in any batch: the products are stacked, one small
    matrix product per image (one large one over the batch would round by its shape).
    """
    n, channels, height, width = pixels.shape
    # The channels' sum, not their mean: integer adds cost a quarter of numpy's mean over an
    # axis. The hashes compare coefficients with their median, so the scale is theirs to ignore;
    # the thumbnail needs gray levels, so the 24x24 products are divided below.
    total = pixels[:, 0].astype(np.uint16)
    for c in range(1, channels):
        total += pixels[:, c]
    out = _projection(height) @ (total.astype(np.float32) @ _projection(width).T)  # (n, 24, 24)
    if channels > 1:
        out /= channels
    freq, thumb = out[:, :16, :16], out[:, 16:, 16:]
    bits = np.concatenate([_bits(freq[:, :8, :8]), _bits(freq)], axis=1)
    thumbs = thumb.round().clip(0, 255).astype(np.uint8).reshape(n, 64)
    sums = pixels.reshape(n, channels, -1).sum(axis=2, dtype=np.int64)
    tint = np.zeros((n, 4), dtype=">i2")
    tint[:, :channels] = np.round((sums - sums.mean(axis=1, keepdims=True)) / (height * width))
    return np.concatenate([np.packbits(bits, axis=1).view(">u8"), thumbs.view(">u8"), tint.view(">u8")],
                          axis=1).astype(np.uint64)


def pairs(prints: np.ndarray, fine_distance: int = FINE_DISTANCE, among: np.ndarray | None = None) -> np.ndarray:
    """Index pairs (i < j), shape (n, 2), sorted, of near-duplicate fingerprints ((N,
    FINGERPRINT_WORDS) uint64): coarse hashes at most COARSE_DISTANCE bits apart, and fine ones
    at most `fine_distance` or thumbnails at most THUMB_DISTANCE. `among`: the rows to compare
    (default all); the pairs are then positions in it."""
    prints = np.asarray(prints, dtype=np.uint64).reshape(-1, FINGERPRINT_WORDS)
    rows = np.arange(len(prints)) if among is None else np.asarray(among, dtype=np.int64)
    hashes, n = prints[rows, 0], len(rows)
    masks = _bands(_BANDS)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for band, mask in enumerate(masks):
        keys = hashes & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        del sorted_keys
        sizes = np.diff(np.r_[starts, n])
        earlier = masks[:band]
        # Small buckets all at once: position k against k + d, for each distance d in a bucket
        # (one vectorized step per d), the candidates chosen on the sorted hashes before
        # anything is gathered. The few large buckets one by one.
        small = np.repeat(sizes <= _SMALL_BUCKET, sizes)
        end = np.repeat(starts + sizes, sizes)
        ranked = hashes[order]
        for d in range(1, int(sizes[sizes <= _SMALL_BUCKET].max(initial=1))):
            k = np.flatnonzero(_candidates(ranked[:-d] ^ ranked[d:], earlier) & small[:-d]
                               & (np.arange(d, n) < end[:-d]))
            found.append(_confirmed(prints, rows, order[k], order[k + d], fine_distance))
        del small, end, ranked
        for lo, size in zip(starts[sizes > _SMALL_BUCKET], sizes[sizes > _SMALL_BUCKET]):
            found.append(_large_bucket(prints, rows, hashes, order[lo:lo + size], earlier, fine_distance))
    both = np.concatenate(found)
    both = np.sort(both, axis=1)  # (i, j) with i < j
    return np.unique(both, axis=0) if len(both) else both


# Buckets up to this size are compared in vectorized steps; larger ones (similar pictures:
# generated ones put 650 of 150,000 in one) one by one, in blocks.
_SMALL_BUCKET = 64
_BLOCK_PAIRS = 1 << 18  # pairs of a large bucket tested at once: ~10 MB of temporary arrays


def _bands(count: int) -> list[np.uint64]:
    """The mask of each band: the 64 bits dealt round-robin into `count` bands. Neighbouring bits
    (neighbouring frequencies) go to different bands: runs of them agree in similar pictures,
    and buckets by runs held 5x more pairs (bench/scale.py's generated pictures)."""
    return [np.uint64(sum(1 << bit for bit in range(k, 64, count))) for k in range(count)]


def _candidates(xor: np.ndarray, earlier: list[np.uint64]) -> np.ndarray:
    """Which pairs, by the XOR of their coarse hashes, this band must test: at most
    COARSE_DISTANCE bits apart, and not already tested by an earlier band (one they agree on).
    Similar pictures agree on several bands; each pair is confirmed once."""
    keep = np.bitwise_count(xor) <= COARSE_DISTANCE
    for mask in earlier:
        keep &= (xor & mask) != 0
    return keep


def _large_bucket(prints: np.ndarray, rows: np.ndarray, hashes: np.ndarray, members: np.ndarray,
                  earlier: list[np.uint64], fine_distance: int) -> np.ndarray:
    """The near-duplicate pairs among one large bucket's members, block by block: each block of
    members against every later member, at most _BLOCK_PAIRS pairs at once, so memory stays
    bounded whatever the bucket's size."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    ranked = hashes[members]
    step = max(1, _BLOCK_PAIRS // len(members))
    for lo in range(0, len(members) - 1, step):
        hi = min(lo + step, len(members) - 1)
        i, j = np.nonzero(_candidates(ranked[lo:hi, None] ^ ranked[None, lo + 1:], earlier))
        i, j = i + lo, j + lo + 1
        later = j > i  # each pair once: the later member against the earlier
        found.append(_confirmed(prints, rows, members[i[later]], members[j[later]], fine_distance))
    return np.concatenate(found)


def _confirmed(prints: np.ndarray, rows: np.ndarray, a: np.ndarray, b: np.ndarray, fine_distance: int) -> np.ndarray:
    """The pairs (a[k], b[k]) of positions in `rows`, candidates by their coarse hashes, whose
    fingerprints are near duplicates.

    The cheap tests first, each on the pairs the previous left: similar pictures (a plain
    background, one layout) can make millions of pairs whose coarse hashes agree. Words are
    read in place: a word's bytes in native order are its big-endian bytes reversed, the same
    reversal for both images, so thumbnails compare byte for byte and tints as int16.
    """
    ra, rb = rows[a], rows[b]
    tint = np.abs(prints[ra, 13:].view(np.int16).astype(np.int32) - prints[rb, 13:].view(np.int16))
    keep = np.flatnonzero(tint.max(axis=1, initial=0) <= TINT_DISTANCE)
    fine = np.bitwise_count(prints[ra[keep], 1:5] ^ prints[rb[keep], 1:5]).sum(axis=1) <= fine_distance
    rest = keep[~fine]
    thumb = np.abs(prints[ra[rest], 5:13].view(np.uint8).astype(np.int16) - prints[rb[rest], 5:13].view(np.uint8))
    found = np.sort(np.concatenate([keep[fine], rest[thumb.mean(axis=1) <= THUMB_DISTANCE]]))
    return np.stack([a[found], b[found]], axis=1).astype(np.int64)


def groups(matched: np.ndarray) -> list[np.ndarray]:
    """Connected sets (two or more members, each ascending; in order of their first member) of
    the indices linked by `matched` pairs. Only linked indices are held: memory grows with the
    pairs, not with the images."""
    nodes, linked = np.unique(np.asarray(matched, dtype=np.int64), return_inverse=True)
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in linked.reshape(-1, 2).tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(nodes)):
        members[root(i)].append(i)
    return [nodes[m] for m in sorted(members.values())]
