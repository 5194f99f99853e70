"""Images that lose their content when transparency becomes pixels, and near-duplicates across
splits (imgclf.data.quality, imgclf.data.neardup), on real PNG and JPEG files."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgclf.config import ConfigError, DatasetConfig, load_dataset
from imgclf.data import folder, neardup
from imgclf.data.images import decode, is_uniform
from imgclf.errors import DataError

SHAPE = (1, 16, 16)
CLASSES = ("circle", "cross")


def plan(**overrides) -> folder.ReadPlan:
    base = dict(shape=SHAPE, resize="pad", val_fraction=0.2, test_fraction=0.2, test_fraction_given=False,
                seed=42, skip_bad=False, workers=1)
    return folder.ReadPlan(**{**base, **overrides})


def glyph(path: Path, kind: str, i: int, colour=(0, 0, 0), size=48) -> Path:
    """A dark (by default) glyph on a fully transparent background, as icon themes draw them."""
    img = Image.new("RGBA", (size, size), (255, 255, 255, 0))  # transparent white, like many exporters
    draw = ImageDraw.Draw(img)
    off = i % 9
    if kind == "circle":
        draw.ellipse((6 + off, 6 + off, 30 + off, 30 + off), outline=(*colour, 255), width=4)
    else:
        draw.line((6 + off, 6, 40, 40 - off), fill=(*colour, 255), width=4)
        draw.line((40 - off, 6, 6, 40 - off), fill=(*colour, 255), width=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def glyph_folder(root: Path, per_class: int = 25, **kw) -> Path:
    for kind in CLASSES:
        for i in range(per_class):
            glyph(root / kind / f"{i:03d}.png", kind, i, **kw)
    return root


def read(root: Path, **overrides) -> folder.FolderData:
    return folder.read_tree(folder.scan_folder(root), plan(**overrides))


def manifest(data: folder.FolderData) -> dict[str, tuple[str, str, str]]:
    return {r["path"]: (r["class"], r["split"], r["note"]) for r in csv.DictReader(io.StringIO(data.manifest))}


# --- transparency ------------------------------------------------------------------------------

def test_dark_glyphs_on_transparency_stay_visible_by_default(tmp_path):
    data = read(glyph_folder(tmp_path / "icons"))
    assert data.blank["count"] == 0 and data.blank["transparent"] == 50
    for split in data.splits.values():
        for pixels in split.images:
            assert not is_uniform(pixels)
            assert np.median(pixels) == 255  # dark content on the white it was given


def test_a_light_glyph_goes_on_black_and_a_colour_rule_is_obeyed(tmp_path):
    light = glyph(tmp_path / "light.png", "circle", 0, colour=(240, 240, 240)).read_bytes()
    auto = decode(light, SHAPE, transparency="auto")
    assert np.median(auto) == 0 and auto.max() > 200
    grey = decode(light, (3, 16, 16), transparency="#336699")
    assert tuple(grey[:, 0, 0]) == (0x33, 0x66, 0x99)  # a corner: pure background
    # An opaque image is untouched by the rule.
    opaque = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(opaque, "PNG")
    assert decode(opaque.getvalue(), (3, 16, 16), transparency="auto")[:, 0, 0].tolist() == [10, 200, 30]


def test_a_rule_that_blanks_most_images_stops_preprocess_in_one_line(tmp_path):
    root = glyph_folder(tmp_path / "icons")
    with pytest.raises(DataError) as err:
        read(root, transparency="#000000")  # what preprocess did before: dark glyphs on black
    message = str(err.value)
    assert "\n" not in message
    assert "50 of 50 images (100%) come out (nearly) uniform" in message
    assert "composited onto #000000" in message and "blank_images: warn" in message


def test_warn_goes_on_and_counts_the_blank_images(tmp_path, caplog):
    data = read(glyph_folder(tmp_path / "icons"), transparency="#000000", blank_images="warn")
    assert data.blank["count"] == 50 and data.blank["transparent_blank"] == 50
    assert data.blank["examples"][0] == "circle/000.png"
    assert any("come out (nearly) uniform" in r.getMessage() for r in caplog.records)


def test_blank_share_is_judged_against_the_opaque_images(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for k, kind in enumerate(CLASSES):
        for i in range(40):
            (root / kind).mkdir(parents=True, exist_ok=True)
            # A quarter of the opaque photos are blank (say, lens-cap shots): the folder's normal.
            flat = i % 4 == 0
            pixels = np.full((16, 16), 90 + i + 50 * k, np.uint8) if flat else rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / kind / f"p{i:03d}.png")
    data = read(root)
    assert data.blank["count"] == 20 and data.blank["opaque_share"] == 0.25
    # Blank transparent images pushing the share well above the opaque one's are refused.
    for kind in CLASSES:
        for i in range(40):
            # Fully transparent, each with its own hidden colour (distinct files, as exporters write them).
            Image.new("RGBA", (16, 16), (i, 100 * CLASSES.index(kind), 0, 0)).save(root / kind / f"t{i:03d}.png")
    with pytest.raises(DataError, match=r"100 of 160 images \(62%\) come out \(nearly\) uniform, against 25%"):
        read(root)


@pytest.mark.parametrize(("value", "expected"), [
    ("white", "datasets.mine.transparency: got 'white': must be auto"),
    ("#12345", "datasets.mine.transparency: got '#12345': must be auto"),
])
def test_transparency_key_is_validated(value, expected):
    params = {"datasets": {"mine": {"folder": "data/images/mine", "image_size": [8, 8], "channels": 1,
                                    "transparency": value}}}
    with pytest.raises(ConfigError, match=expected):
        load_dataset("mine", params)
    assert DatasetConfig(folder="data/images/mine", image_size=[8, 8], channels=1).transparency == "auto"
    with pytest.raises(ConfigError, match="near_duplicates: got 'drop'"):
        load_dataset("mine", {"datasets": {"mine": {**params["datasets"]["mine"], "transparency": "auto",
                                                     "near_duplicates": "drop"}}})


# --- near-duplicates ---------------------------------------------------------------------------

def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (upscaled noise): structure at every scale, unlike flat test tiles."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def photo_folder(root: Path, n: int = 60, start: int = 0) -> Path:
    for i in range(start, start + n):
        save(picture(i), root / CLASSES[i % 2] / f"{i:03d}.png")
    return root


def test_unrelated_pictures_are_not_grouped(tmp_path):
    data = read(photo_folder(tmp_path / "p", 200), shape=(3, 32, 32))
    assert data.near_duplicates["groups"] == 0 and data.near_duplicates["left_out"] == 0


def test_resized_and_reencoded_copies_are_found_and_kept_in_one_split(tmp_path):
    root = photo_folder(tmp_path / "p", 60)
    for i in range(60):
        original = picture(i)
        save(original.resize((128, 128), Image.Resampling.LANCZOS), root / CLASSES[i % 2] / f"{i:03d}-big.png")
        save(original, root / CLASSES[i % 2] / f"{i:03d}-q75.jpg", "JPEG", quality=75)
    report = read(root, shape=(3, 32, 32), near_duplicates="report")
    # Every resized copy is found; a few JPEG copies of these very smooth pictures are not
    # (their coarse hash bits sit at the median: imgclf.data.neardup).
    assert report.near_duplicates["groups"] == 60 and report.near_duplicates["images"] >= 175
    spanning = report.near_duplicates["groups_across_splits"]
    assert spanning > 0 and report.near_duplicates["left_out"] == 0
    used = {p: split for p, (_, split, note) in manifest(report).items() if not note}
    assert len(used) == 180

    kept = read(root, shape=(3, 32, 32))  # keep_together, the default
    rows = manifest(kept)
    assert {p: s for p, (_, s, _) in rows.items()} == {p: s for p, (_, s, _) in manifest(report).items()}
    grouped = {p for g in neardup_groups(root) for p in g}
    for i in range(60):
        group = [f"{CLASSES[i % 2]}/{i:03d}{suffix}" for suffix in (".png", "-big.png", "-q75.jpg")]
        group = [p for p in group if p in grouped]
        used_splits = {rows[p][1] for p in group if not rows[p][2]}
        assert len(used_splits) == 1, (group, [rows[p] for p in group])
        # The used split is the most protected one: test before val before train.
        assert used_splits.pop() == min((rows[p][1] for p in group), key={"test": 0, "val": 1, "train": 2}.get)
    left = [p for p, (_, _, note) in rows.items() if note.startswith("near-duplicate of")]
    assert len(left) == kept.near_duplicates["left_out"] > 0
    assert sum(len(s.labels) for s in kept.splits.values()) == 180 - len(left)


def neardup_groups(root: Path) -> list[list[str]]:
    """The groups found, as paths, from the images decoded as read() decodes them."""
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    prints = neardup.fingerprints(np.stack([decode((root / p).read_bytes(), (3, 32, 32), resize="pad") for p in paths]))
    return [[paths[i] for i in g] for g in neardup.groups(neardup.pairs(prints))]


def test_adding_images_never_moves_an_existing_images_split(tmp_path):
    root = photo_folder(tmp_path / "p", 60)
    before = {p: s for p, (_, s, _) in manifest(read(root, shape=(3, 32, 32))).items()}
    photo_folder(root, 40, start=60)  # new pictures
    for i in range(0, 60, 3):  # and new copies of old ones
        save(picture(i).resize((100, 100)), root / CLASSES[i % 2] / f"{i:03d}-copy.jpg", "JPEG", quality=80)
    after = {p: s for p, (_, s, _) in manifest(read(root, shape=(3, 32, 32))).items()}
    assert {p: after[p] for p in before} == before


def test_fingerprints_match_copies_not_neighbours():
    a, b = picture(1), picture(2)

    def fp(img: Image.Image, fmt: str = "PNG", **kw) -> np.ndarray:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return neardup.fingerprints(decode(buf.getvalue(), (3, 32, 32))[None])[0]

    prints = np.stack([fp(a), fp(a.resize((200, 200))), fp(a, "JPEG", quality=60), fp(b)])
    assert neardup.pairs(prints).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert [g.tolist() for g in neardup.groups(neardup.pairs(prints))] == [[0, 1, 2]]
    # The same shapes in another hue (the same gray, so the same hashes) are another picture.
    gray = np.asarray(a.convert("L"), dtype=np.int16) * 150 // 255 + 40
    reddish = np.stack([gray + 40, gray - 20, gray - 20], axis=-1).astype(np.uint8)
    bluish = np.stack([gray - 20, gray - 20, gray + 40], axis=-1).astype(np.uint8)
    hues = np.stack([fp(Image.fromarray(reddish)), fp(Image.fromarray(bluish))])
    assert (hues[0, :13] == hues[1, :13]).all()  # hashes and thumbnail alike
    assert neardup.pairs(hues).tolist() == []


def test_a_fingerprint_does_not_depend_on_its_batch():
    # Preprocess fingerprints a chunk of images at once; an image's bits must be its own.
    rng = np.random.default_rng(3)
    for shape in ((1, 28, 28), (3, 64, 48)):
        batch = rng.integers(0, 256, (40, *shape), dtype=np.uint8)
        whole = neardup.fingerprints(batch)
        assert whole.shape == (40, neardup.FINGERPRINT_WORDS) and len(np.unique(whole, axis=0)) == 40
        for k in (0, 17, 39):
            assert (neardup.fingerprints(batch[k:k + 1])[0] == whole[k]).all()
        assert (neardup.fingerprints(batch[5:12]) == whole[5:12]).all()


def test_groups_hold_only_the_linked_images():
    matched = np.array([[9, 12], [5, 9], [20, 30], [100_000_000, 100_000_001]])
    assert [g.tolist() for g in neardup.groups(matched)] == [[5, 9, 12], [20, 30], [100_000_000, 100_000_001]]
    assert neardup.groups(np.zeros((0, 2), np.int64)) == []
    # Pairs among some rows only are positions in those rows.
    rng = np.random.default_rng(4)
    a, b, c = rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    prints = neardup.fingerprints(np.stack([a, b, a, c]))
    assert neardup.pairs(prints).tolist() == [[0, 2]]
    assert neardup.pairs(prints, among=np.array([1, 2, 3])).tolist() == []
    assert neardup.pairs(prints, among=np.array([1, 2, 3, 0])).tolist() == [[1, 3]]
