"""The one train/validation split and the processed-data checks."""

import numpy as np
import pytest

from fixtures import save_processed
from imgclf.data.dataset import Split, channel_stats, load_meta, load_split, stratified_split
from imgclf.errors import DataError


def _labels(per_class=(50, 30, 20)):
    rng = np.random.default_rng(3)
    return rng.permutation(np.repeat(np.arange(len(per_class)), per_class))


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    labels = _labels()
    a = stratified_split(labels, 0.2, seed=7)
    b = stratified_split(labels, 0.2, seed=7)
    c = stratified_split(labels, 0.2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_split_is_stratified_disjoint_and_complete():
    labels = _labels()
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val]).tolist() == [10, 6, 4]


def test_split_refuses_to_empty_a_class():
    with pytest.raises(DataError, match="class 2 has 1 images"):
        stratified_split(np.array([0, 0, 1, 1, 2]), 0.5, seed=0)


def test_stats_are_per_channel_from_the_given_split():
    images = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    images[:, 1] = 255
    images[:2, 2] = 255
    mean, std = channel_stats(images)
    assert mean == [0.0, 1.0, 0.5]
    assert std == [0.0, 0.0, 0.5]


def test_processed_round_trip_and_mismatch_errors(tmp_path):
    images = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1], dtype=np.int64)
    meta = {"classes": ["a", "b"], "shape": [1, 4, 4]}
    save_processed(tmp_path, {"train": Split(images, labels)}, meta)
    loaded = load_split(tmp_path, "train", load_meta(tmp_path))
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 1, 5, 5\)"):
        load_split(tmp_path, "train", {**meta, "shape": [1, 5, 5]})
    with pytest.raises(DataError, match="3 labels outside 0..0"):
        load_split(tmp_path, "train", {**meta, "classes": ["a"]})


def test_pickled_arrays_are_refused(tmp_path):
    meta = {"classes": ["a"], "shape": [1, 1, 1]}
    np.save(tmp_path / "train_images.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.save(tmp_path / "train_labels.npy", np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match="not a plain numeric .npy file"):
        load_split(tmp_path, "train", meta)
