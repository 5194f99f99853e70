"""Image folders (one subfolder per class, the torchvision ImageFolder convention) read into
the processed splits, with a split rule that survives data changes.

Layout: `<root>/<class>/**/<image>`, or `<root>/train/<class>/...` plus `<root>/test/<class>/...`
(then the test set is exactly test/). The root is a DVC-tracked folder, or a tar/zip archive
read member by member (nothing is extracted to disk; links and escaping names are refused).

Splits: each image's split comes from a hash of its *content* and the split seed alone, so
adding, removing or relabelling other images never moves it, and exact duplicates (same bytes)
always land together, which keeps test images out of training. Within a split only the first
copy (by path) is used; the others are counted. Classes keep their proportions in expectation.

Bad files (unreadable, truncated, empty, not an image, a decompression bomb, a link out of the
folder, a file outside any class folder, one image filed under two classes) stop preprocessing
with one line naming them, or with `bad_files: skip` are left out, counted and listed. Folder
clutter (hidden files, .DS_Store, Thumbs.db, desktop.ini, __MACOSX) is ignored silently.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from numpy.lib.format import open_memmap
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from imgclf.data import neardup, quality
from imgclf.data.archive import DEFAULT_LIMITS, READ_ERRORS, Limits, Tally, read_bounded, why, zip_problem
from imgclf.data.dataset import SPLITS, ChannelStats, Split, map_split, write_split
from imgclf.data.images import LEGACY_TRANSPARENCY, TRANSPARENCY_AUTO, ImageError, decode_with_alpha, is_uniform
from imgclf.diskspace import preallocate, require_free
from imgclf.errors import DataError
from imgclf.redact import is_utf8, printable, quoted, shown

log = logging.getLogger(__name__)

CLUTTER = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "System Volume Information"})
SPLIT_DIRS = ("train", "test")
MANIFEST_COLUMNS = ("path", "class", "split", "sha256", "note")
SCRATCH = ".decoded.npy"  # every candidate image, decoded once, in path order; removed after the split
_CHUNK = 32  # images per task sent to a decoding process
_IN_FLIGHT = 4  # tasks queued per decoding process: enough to keep it busy, few enough to bound memory


# A name that is not UTF-8 could not be written to the manifest, meta.json or MLflow as it is;
# it is a bad file like any other, shown and listed in its escaped form (\xNN per byte).
NOT_UTF8 = "file name is not valid UTF-8 (rename it)"


def is_clutter(name: str) -> bool:
    return name.startswith(".") or name in CLUTTER


@dataclass(frozen=True, slots=True)  # slots: one per file, ~100 bytes less each without a __dict__
class Entry:
    """One file of the tree: its path below the root, and why it cannot be used (if known yet)."""

    path: str
    problem: str | None = None


@dataclass
class Tree:
    """What a folder or archive holds, and how to read its files' bytes."""

    where: str
    entries: list[Entry]
    root: Path | None = None  # a folder: workers read files themselves
    archive: Path | None = None  # an archive: members are read one at a time, never all at once
    limits: Limits = DEFAULT_LIMITS  # an archive's: what one member may decompress to
    # An archive's usable members: path below its root -> where the member is (a tar: its
    # header's offset; a zip: its name). Of equal names the last counts, as on extraction.
    members: dict[str, int | str] = field(default_factory=dict)

    def sources(self, paths: list[str]) -> Iterator[tuple[int, Path | bytes]]:
        """(index in `paths`, what a worker decodes: a file's path or a member's bytes) for each path.

        A folder's files come in the order given; an archive's members in the order it stores
        them, since a compressed tar can only be read front to back.
        """
        if self.root is not None:
            yield from ((i, self.root / path) for i, path in enumerate(paths))
            return
        assert self.archive is not None
        try:
            limit, key = self.limits.member_bytes, self.limits.key
            if zipfile.is_zipfile(self.archive):
                with zipfile.ZipFile(self.archive) as zf:
                    for i, path in enumerate(paths):
                        with zf.open(str(self.members[path])) as fh:
                            yield i, read_bounded(fh, limit, self.where, path, key)
                return
            wanted = {self.members[path]: i for i, path in enumerate(paths)}
            with tarfile.open(self.archive, "r:*") as tar:
                while (member := tar.next()) is not None:
                    # TarFile keeps every header it has read; these are read once, front to back.
                    tar.members.clear()
                    if member.offset in wanted:
                        with tar.extractfile(member) as fh:
                            yield wanted[member.offset], read_bounded(fh, limit, self.where, member.name, key)
        except READ_ERRORS as exc:
            raise DataError(f"{self.where}: not a readable tar or zip archive ({why(exc)})") from None


def scan_folder(root: Path, name: str | None = None) -> Tree:
    """`name`: how messages call the folder (default: its path)."""
    where = name or str(root)
    if not root.is_dir():
        raise DataError(f"{where}: no such folder (track it with `dvc add`, or `dvc pull` / `dvc import` it)")
    real_root = root.resolve()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_clutter(d))
        for name in [d for d in dirnames if (here / d).is_symlink()]:
            dirnames.remove(name)  # never walked into: it could loop or leave the folder
            entries.append(Entry((here / name).relative_to(root).as_posix(), "a symlinked folder (not followed)"))
        for name in sorted(f for f in filenames if not is_clutter(f)):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if not is_utf8(rel):
                entries.append(Entry(rel, NOT_UTF8))
            elif path.is_symlink() and not path.resolve().is_relative_to(real_root):
                entries.append(Entry(rel, "a symlink pointing outside the folder"))
            elif not path.is_file():
                entries.append(Entry(rel, "not a regular file"))
            else:
                entries.append(Entry(rel))
    return Tree(where, sorted(entries, key=lambda e: e.path), root=root)


def scan_archive(archive: Path, limits: Limits = DEFAULT_LIMITS) -> Tree:
    """A tar (any compression) or zip archive's members, listed without keeping their bytes;
    refused in one line past `limits` (member size, member count, total size)."""
    entries: dict[str, Entry] = {}
    members: dict[str, int | str] = {}
    tally = Tally(archive.name, limits)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    tally.add(info.filename, info.file_size)
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    _add_member(entries, members, info.filename, info.is_dir(), is_link, info.filename,
                                None if info.is_dir() else zip_problem(info))
        else:
            with tarfile.open(archive, "r:*") as tar:
                while (m := tar.next()) is not None:
                    tar.members.clear()  # as in Tree.sources: only the offsets are kept
                    tally.add(m.name, m.size if m.isfile() else 0)
                    _add_member(entries, members, m.name, m.isdir(), not (m.isfile() or m.isdir()), m.offset)
    except READ_ERRORS as exc:
        raise DataError(f"{archive.name}: not a readable tar or zip archive ({why(exc)})") from None
    listed = sorted(entries.values(), key=lambda e: e.path)
    # Archives usually wrap everything in one folder (photos/cats/1.jpg): a data set has at
    # least two classes, so a single top-level folder is such a wrapper.
    tops = {PurePosixPath(e.path).parts[0] for e in listed}
    if len(tops) == 1 and all(len(PurePosixPath(e.path).parts) > 2 for e in listed) and tops.isdisjoint(SPLIT_DIRS):
        (top,) = tops
        cut = len(top) + 1
        listed = [Entry(e.path[cut:], e.problem) for e in listed]
        members = {k[cut:]: v for k, v in members.items()}
    return Tree(archive.name, listed, archive=archive, members=members, limits=limits)


def _add_member(entries: dict[str, Entry], members: dict[str, int | str], name: str, is_dir: bool, is_link: bool,
                member: int | str, unreadable: str | None = None) -> None:
    parts = PurePosixPath(name).parts
    if not is_utf8(name):
        if not is_dir:
            entries[name] = Entry(name, NOT_UTF8)
    elif name.startswith(("/", "\\")) or ".." in parts:  # before the clutter rule: ".." starts with a dot
        entries[name] = Entry(name, "a member path outside the archive")
    elif is_dir or not parts or any(is_clutter(p) for p in parts):
        return
    elif is_link:
        entries[name] = Entry(name, "a link or special member (never followed)")
    elif unreadable:
        entries[name] = Entry(name, unreadable)
    else:
        path = PurePosixPath(*parts).as_posix()
        members[path] = member
        entries[path] = Entry(path)


@dataclass(frozen=True, slots=True)  # as Entry
class Image:
    path: str
    label: str
    split: str | None  # fixed by a train/test layout, else drawn from the hash


def _labelled(tree: Tree) -> tuple[list[Image], list[tuple[str, str]]]:
    """Each usable entry with its class (and fixed split); the problems found so far."""
    problems = [(e.path, e.problem) for e in tree.entries if e.problem]
    entries = [e for e in tree.entries if not e.problem]
    tops = {PurePosixPath(e.path).parts[0] for e in entries if len(PurePosixPath(e.path).parts) > 1}
    layout = bool(tops & set(SPLIT_DIRS))
    if layout and not set(SPLIT_DIRS) <= tops:
        have, lack = sorted(tops & set(SPLIT_DIRS))[0], sorted(set(SPLIT_DIRS) - tops)[0]
        raise DataError(f"{tree.where}: has a top-level {have}/ but no {lack}/ (a split layout needs both "
                        "train/ and test/, each with one folder per class)")
    images = []
    depth = 2 if layout else 1
    for e in entries:
        parts = PurePosixPath(e.path).parts
        if len(parts) <= depth or (layout and parts[0] not in SPLIT_DIRS):
            where = "train/ or test/ class folder" if layout else "class folder"
            problems.append((e.path, f"outside any {where}"))
            continue
        images.append(Image(e.path, parts[depth - 1], parts[0] if layout else None))
    return images, problems


# What preprocess learns of a decoded image beyond its pixels (imgclf.data.quality): whether the
# file had transparency, whether the pixels the model sees show (nearly) nothing, and its
# perceptual fingerprint as bytes (empty for a uniform image: nothing to match). Bytes, not an
# array: ~100 of them cross from the decoding process per image.
Seen = tuple[bool, bool, bytes]
# index, content SHA-256, pixels, problem, what was seen
Decoded = tuple[int, str, "np.ndarray | None", "str | None", "Seen | None"]
Job = tuple[int, Path | bytes, tuple[int, int, int], str, str]


def _decode_job(job: Job) -> Decoded:
    """One image decoded, its fingerprint still to come (_decode_chunk)."""
    i, source, shape, resize, transparency = job
    try:
        data = source if isinstance(source, bytes) else source.read_bytes()
        pixels, transparent = decode_with_alpha(data, shape, resize=resize, transparency=transparency)
        return i, hashlib.sha256(data).hexdigest(), pixels, None, (transparent, is_uniform(pixels), b"")
    except ImageError as exc:
        return i, hashlib.sha256(data).hexdigest(), None, str(exc), None
    except OSError as exc:
        return i, "", None, f"unreadable ({exc.strerror or exc})", None


def _decode_chunk(jobs: list[Job]) -> list[Decoded]:
    """A chunk's images decoded, then the ones with content fingerprinted in one batch: ~10 µs
    per 64x64 RGB image, where one at a time cost ~70 (imgclf.data.neardup.fingerprints)."""
    done = [_decode_job(job) for job in jobs]
    rows = [k for k, (_, _, pixels, _, seen) in enumerate(done) if pixels is not None and not seen[1]]
    if rows:
        prints = neardup.fingerprints(np.stack([done[k][2] for k in rows]))
        for k, fingerprint in zip(rows, prints):
            i, sha, pixels, problem, (transparent, uniform, _) = done[k]
            done[k] = (i, sha, pixels, problem, (transparent, uniform, fingerprint.tobytes()))
    return done


def _one_blas_thread() -> None:
    """A decoding process uses one BLAS thread (for the fingerprints' matrix products): there is
    one process per CPU, and a BLAS thread of each spinning beside the other processes made
    preprocess ~50% slower on 2 CPUs."""
    threadpool_limits(1, user_api="blas")


def decode_all(tree: Tree, images: list[Image], shape: tuple[int, int, int], resize: str,
               workers: int, transparency: str = LEGACY_TRANSPARENCY) -> Iterator[Decoded]:
    """(index into `images`, content SHA-256, pixels or None, problem or None, Seen or None) per
    image, decoded on `workers` processes; what comes out does not depend on how many.

    At most a few chunks per worker are in flight: `Pool.imap` would pull every job from its
    iterator at once, which for an archive means every member's bytes in memory.
    """
    jobs = ((i, source, shape, resize, transparency) for i, source in tree.sources([img.path for img in images]))
    bar = tqdm(total=len(images), desc=f"decode {tree.where}", unit="img", mininterval=1.0, leave=False)
    pool = None
    try:
        if workers <= 1 or len(images) < 2 * _CHUNK:
            with threadpool_limits(1, user_api="blas"):
                while chunk := list(itertools.islice(jobs, _CHUNK)):
                    for result in _decode_chunk(chunk):
                        bar.update()
                        yield result
            return
        # fork: the workers need nothing but this module, already imported. Frozen first, the
        # parent's objects (a few hundred bytes per image) are never touched by the workers'
        # garbage collector, so their pages stay shared instead of being copied into each worker.
        gc.freeze()
        try:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_one_blas_thread)
        finally:
            gc.unfreeze()
        pending: deque = deque()
        while chunk := list(itertools.islice(jobs, _CHUNK)):
            pending.append(pool.apply_async(_decode_chunk, (chunk,)))
            if len(pending) >= _IN_FLIGHT * workers:
                for result in pending.popleft().get():
                    bar.update()
                    yield result
        while pending:
            for result in pending.popleft().get():
                bar.update()
                yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def split_of(sha256: str, seed: int, val_fraction: float, test_fraction: float | None) -> str:
    """train / val / test for one image content; `test_fraction` None: the test set is fixed."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{sha256}".encode()).digest()[:8], "big") / 2**64
    if test_fraction is not None:
        if u < test_fraction:
            return "test"
        u = (u - test_fraction) / (1 - test_fraction)
    return "val" if u < val_fraction else "train"


@dataclass
class FolderData:
    splits: dict[str, Split]
    classes: list[str]
    manifest: str
    skipped: list[dict[str, str]]
    duplicates: int
    content_sha256: str  # of the manifest's used rows: changes exactly when the data used changes
    fixed_test: bool  # the folder has train/ and test/: its test set is test/
    stats: tuple[list[float], list[float]]  # per-channel mean and std of the training split
    blank: dict = field(default_factory=dict)  # imgclf.data.quality.BlankCount as a dict
    near_duplicates: dict = field(default_factory=dict)  # imgclf.data.quality.near_duplicate_summary


@dataclass(frozen=True)
class ReadPlan:
    shape: tuple[int, int, int]
    resize: str
    val_fraction: float
    test_fraction: float
    test_fraction_given: bool
    seed: int
    skip_bad: bool
    workers: int
    # The defaults of DatasetConfig's keys of the same names.
    transparency: str = TRANSPARENCY_AUTO  # imgclf.data.images
    blank_images: str = "error"  # error | warn (imgclf.data.quality)
    near_duplicates: str = "keep_together"  # or report (imgclf.data.quality)


def read_tree(tree: Tree, plan: ReadPlan, out_dir: Path | None = None) -> FolderData:
    """Decode, check and split the tree's images.

    With `out_dir` (the preprocess stage's temporary output directory) the splits are written
    there as `{train,val,test}_{images,labels}.npy`, streaming: each image is decoded once, into
    a memory-mapped scratch file in `out_dir` (removed at the end), and each split is then
    gathered from it block by block, so memory holds a few blocks and per-image bookkeeping,
    never the data set. FolderData.splits then maps the written files (read-only). Without
    `out_dir` the same happens in a temporary directory and the splits come back in memory.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="imgclf-folder-") as tmp:
            data = read_tree(tree, plan, Path(tmp))
            data.splits = {k: Split(np.array(s.images), np.array(s.labels)) for k, s in data.splits.items()}
            return data
    images, problems = _labelled(tree)
    layout = any(img.split for img in images)
    if layout and plan.test_fraction_given:
        raise DataError(f"{tree.where}: has train/ and test/ folders, so its test set is test/; "
                        "remove test_fraction from its datasets entry")
    scratch_path = out_dir / SCRATCH
    try:
        # The scratch copy plus the splits gathered from it (at most every image again).
        per_image = int(np.prod(plan.shape))
        require_free(out_dir, 2 * len(images) * (per_image + 8) + (1 << 20),
                     f"preprocessing {len(images):,} images of {'x'.join(map(str, plan.shape))}")
        scratch = open_memmap(scratch_path, mode="w+", dtype=np.uint8, shape=(len(images), *plan.shape))
        preallocate(scratch_path)
        decoded: dict[str, tuple[str, int]] = {}  # path -> (content SHA-256, row of scratch)
        looks = quality.Looks.empty(len(images))  # by scratch row, as the pixels
        for i, sha, pixels, problem, seen in decode_all(tree, images, plan.shape, plan.resize, plan.workers,
                                                         plan.transparency):
            if problem:
                problems.append((images[i].path, problem))
            else:
                scratch[i] = pixels
                decoded[images[i].path] = (sha, i)
                looks.record(i, *seen)
        good = [img for img in images if img.path in decoded]
        problems += _conflicting_labels(good, decoded)
        bad = {path for path, _ in problems}
        if problems and not plan.skip_bad:
            problems.sort()
            names = "; ".join(f"{shown(p)}: {why}" for p, why in problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DataError(f"{tree.where}: {len(problems)} bad file(s): {names}{more}; fix or remove them, "
                            "or set bad_files: skip in its datasets entry to leave them out")
        good = [img for img in good if img.path not in bad]
        classes = sorted({img.label for img in good})
        if len(classes) < 2:
            raise DataError(f"{tree.where}: found {len(classes)} class folder(s) with usable images; "
                            "a classifier needs at least 2 (one subfolder per class)")
        blank = quality.check_blank(tree.where, [(img.path, decoded[img.path][1]) for img in good], looks,
                                    plan.transparency, plan.blank_images == "error")
        data = _assemble(tree, good, decoded, classes, sorted(problems), plan, layout, scratch, out_dir, looks)
        data.blank = blank
        return data
    finally:
        scratch_path.unlink(missing_ok=True)  # a mapped scratch file lives on until unmapped


def _conflicting_labels(good: list[Image], decoded: dict[str, tuple[str, int]]) -> list[tuple[str, str]]:
    by_sha: dict[str, list[Image]] = defaultdict(list)
    for img in good:
        by_sha[decoded[img.path][0]].append(img)
    out = []
    for copies in by_sha.values():
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            paths = ", ".join(c.path for c in copies)
            out += [(c.path, f"the same image is filed under classes {', '.join(labels)} ({paths})") for c in copies]
    return out


def _assemble(tree: Tree, good: list[Image], decoded: dict[str, tuple[str, int]], classes: list[str],
              problems: list[tuple[str, str]], plan: ReadPlan, layout: bool, scratch: np.ndarray,
              out_dir: Path, looks: quality.Looks) -> FolderData:
    index = {c: i for i, c in enumerate(classes)}
    test_fraction = None if layout else plan.test_fraction
    # The test copy of an image wins over its training copies (so none of them trains), then the
    # first by path.
    order = sorted(good, key=lambda img: (img.split != "test", img.path))
    first: dict[str, Image] = {}
    rows, members = [], defaultdict(list)
    for img in order:
        sha = decoded[img.path][0]
        kept = first.setdefault(sha, img)
        split = "test" if (kept.split == "test") else split_of(sha, plan.seed, plan.val_fraction, test_fraction)
        note = "" if kept is img else f"duplicate of {kept.path}"
        rows.append((img.path, img.label, split, sha, note))
        if kept is img:
            members[split].append(img)
    # By scratch row (path order): each image's path, and its split where it is used.
    paths, splits = [""] * len(scratch), np.full(len(scratch), -1, dtype=np.int8)
    for path, _, split, _, note in rows:
        paths[decoded[path][1]] = path
        if not note:
            splits[decoded[path][1]] = quality.SPLIT_ORDER.index(split)
    near = quality.near_duplicates(tree.where, paths, splits, looks, plan.near_duplicates == "keep_together")
    del paths, splits
    if near.left_out:
        rows = [(*r[:4], near.left_out[r[0]]) if r[0] in near.left_out else r for r in rows]
        for name in SPLITS:
            members[name] = [img for img in members[name] if img.path not in near.left_out]
    rows += [(_written(path), "", "", "", f"skipped: {why}") for path, why in problems]
    _check_every_class_split(tree, classes, members)
    # Scratch rows follow the sorted paths, so each split's rows (sorted by path) ascend: the
    # gather reads the scratch file front to back.
    row_labels = np.full(len(scratch), -1, dtype=np.int64)
    for img in good:
        row_labels[decoded[img.path][1]] = index[img.label]
    stats = ChannelStats(plan.shape[0])
    splits = {}
    for name in SPLITS:
        chosen = np.array(sorted(decoded[img.path][1] for img in members[name]), dtype=np.int64)
        write_split(out_dir, name, scratch, row_labels, chosen, stats if name == "train" else None)
        splits[name] = map_split(out_dir, name)
    rows.sort()
    used = hashlib.sha256()  # row by row: the joined text would be ~100 bytes per image at once
    for r in rows:
        if r[3] and not r[4]:
            used.update(f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\n".encode())
    duplicates = sum(1 for r in rows if r[4].startswith("duplicate"))
    if duplicates:
        log.info("%s: %d exact duplicate file(s) found; each duplicate stays in its original's split, unused",
                 tree.where, duplicates)
    return FolderData(splits, classes, _manifest_csv(rows), [{"path": _written(p), "reason": why} for p, why in problems],
                      duplicates, used.hexdigest(), layout, stats.result(), near_duplicates=near.summary)


def _written(path: str) -> str:
    """A skipped file's path as the manifest and meta.json (UTF-8 files) hold it."""
    return path if is_utf8(path) else printable(path)


def _check_every_class_split(tree: Tree, classes: list[str], members: dict[str, list[Image]]) -> None:
    counts = {name: Counter(img.label for img in members[name]) for name in ("train", "val", "test")}
    for c in classes:
        have = {name: counts[name][c] for name in counts}
        if not all(have.values()):
            raise DataError(f"{tree.where}: class {quoted(c)} has too few images to split (train {have['train']}, "
                            f"val {have['val']}, test {have['test']}); every split needs at least one: "
                            "add images or raise preprocess.val_fraction / test_fraction")


def _manifest_csv(rows: list[tuple[str, ...]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def per_class_counts(labels: dict[str, np.ndarray], classes: list[str]) -> dict[str, dict[str, int]]:
    """Images per class of each split, from the splits' labels."""
    return {name: {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)))}
            for name, y in labels.items()}
