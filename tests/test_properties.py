"""Property-based tests: whatever a user or a corrupted disk feeds the readers and the params
schema, the only failure is the library's own one-line error (ConfigError / DataError), never
a traceback from deep inside YAML, pydantic, numpy or struct."""

from __future__ import annotations

import copy
import io
import math
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fixtures import ROOT, save_processed
from imgclf import checkpoint, config
from imgclf.data import idx
from imgclf.data.dataset import Split, load_split
from imgclf.errors import ConfigError, DataError
from imgclf.models import build_model

# One failure per test is enough to act on, and shrinking a second one only costs time.
PROPERTY = settings(max_examples=80, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow])

REAL_PARAMS = config.read_params(ROOT / "params.yaml")
SECTIONS: dict[str, type[config.Section]] = {
    "download": config.DownloadConfig,
    "datasets.fashion_mnist": config.DatasetConfig,
    "datasets.cifar10": config.DatasetConfig,
    "datasets.fashion_png": config.DatasetConfig,
    "preprocess": config.PreprocessConfig,
    # `train` alone lacks the keys each model sets (epochs, lr): load_train checks it, merged.
    "evaluate": config.EvaluateConfig,
    "report": config.ReportConfig,
    "mlflow": config.MlflowConfig,
}


def assert_one_line(exc: Exception) -> None:
    message = str(exc)
    assert message, f"{type(exc).__name__} with an empty message"
    # splitlines() also splits on \r, \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029.
    assert message.splitlines() == [message], f"not one line: {message!r}"


# --- values a YAML file (or `dvc exp run -S`) can produce ---------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
)
# YAML keys need not be strings: `1:`, `null:`, `on:` (a boolean in YAML 1.1) and `.5:` are keys.
keys = st.one_of(st.text(max_size=12), st.integers(-3, 3), st.booleans(), st.none(), st.floats(-1, 1))
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)

# Checkpoint fields size the model that is built before its weights are checked: unbounded
# integers there would make a test allocate terabytes, not find a bug.
small_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.floats(-2, 2), st.just(float("nan")),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _slots(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key-or-index) in a nested params structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield node, key
            yield from _slots(value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield node, i
            yield from _slots(value)


def _model_keys(params: dict[Any, Any]) -> list[Any]:
    models = params.get("models")
    return list(models) if isinstance(models, dict) else []


def check_every_loader(params: dict[Any, Any]) -> None:
    """Run every public loader of the schema on params: each either succeeds or raises a
    one-line ConfigError. Any other exception fails the test (and hypothesis shows why)."""
    calls: list[Callable[[], Any]] = [lambda key=key, model=model: config.load_section(key, model, params)
                                      for key, model in SECTIONS.items()]
    calls += [lambda: config.load_dataset_name(params), lambda: config.model_names(params),
              lambda: config.validate_all(params)]
    for name in {"mlp", "cnn", *(k for k in _model_keys(params) if isinstance(k, str))}:
        calls += [lambda name=name: config.load_model(name, params),
                  lambda name=name: config.load_train(name, params)]
    for call in calls:
        try:
            call()
        except ConfigError as exc:
            assert_one_line(exc)


def test_the_real_params_file_loads_cleanly():
    # The baseline the mutations start from must itself be valid, or they test nothing.
    for key, model in SECTIONS.items():
        config.load_section(key, model, REAL_PARAMS)
    for name in config.model_names(REAL_PARAMS):
        config.load_train(name, REAL_PARAMS)


@PROPERTY
@given(st.data())
def test_mutated_params_fail_only_with_one_line_config_errors(data):
    params = copy.deepcopy(REAL_PARAMS)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        container, key = data.draw(st.sampled_from([(params, None), *_slots(params)]), label="where")
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        if key is None or action == "add":
            target = params if key is None else container[key]
            if isinstance(target, dict):
                known = sorted(str(k) for k in target)
                new_key = data.draw(st.one_of(keys, st.sampled_from(known)) if known else keys, label="new key")
                target[new_key] = data.draw(json_like, label="value")
            elif isinstance(target, list):
                target.append(data.draw(json_like, label="value"))
        elif action == "delete":
            del container[key]
        else:
            container[key] = data.draw(json_like, label="value")
    check_every_loader(params)


@PROPERTY
@given(st.dictionaries(st.one_of(st.sampled_from([*SECTIONS, "models"]), keys), json_like, max_size=6))
@example({1: "x", "models": {}})  # YAML allows mixed key types; a missing section must not crash
@example({"train": {"lr\nx": 1}, "models": {"a": {"arch": "mlp", "hidden": [1], "x\ny": 1}}})
def test_random_documents_fail_only_with_one_line_config_errors(document):
    check_every_loader(document)


# Every registered architecture and every key any of them takes, so a new one is exercised too.
ARCHS = sorted(config.ARCHITECTURES)
ARCH_KEYS = sorted({key for cls in config.ARCHITECTURES.values() for key in cls.model_fields})


@PROPERTY
@given(st.dictionaries(st.sampled_from([*ARCHS, "x"]), st.dictionaries(
    st.sampled_from([*ARCH_KEYS, "extra"]),
    st.one_of(st.sampled_from(ARCHS), json_like), max_size=6), max_size=3))
def test_random_model_sections_fail_only_with_one_line_config_errors(models):
    # Random documents rarely reach the per-model paths (arch dispatch, train overrides).
    params = copy.deepcopy(REAL_PARAMS)
    params["models"] = models
    check_every_loader(params)


# --- params.yaml as text -------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    # Module-scoped: hypothesis runs many examples per test call, each rewriting its files.
    return tmp_path_factory.mktemp("properties")


def _check_read_params(path: Path) -> None:
    try:
        params = config.read_params(path)
    except ConfigError as exc:
        assert_one_line(exc)
    else:
        assert isinstance(params, dict)


@PROPERTY
@given(st.text(max_size=200))
@example("train:\n  lr: 0.1\n  bad: [1, 2\n")
@example("when: 2001-13-40\n")  # looks like a YAML date, is not one
@example("n: " + "9" * 5000 + "\n")  # beyond Python's int-from-string limit
@example("[" * 5000)  # nesting deeper than the recursion limit
@example("train: &a [*a]\n")  # a self-referencing alias
def test_read_params_on_random_text(scratch, text):
    path = scratch / "params.yaml"
    path.write_text(text, encoding="utf-8")
    _check_read_params(path)


@PROPERTY
@given(st.binary(max_size=200))
@example(b"train:\n  lr: \xff\xfe\n")  # not UTF-8
def test_read_params_on_random_bytes(scratch, data):
    path = scratch / "params.yaml"
    path.write_bytes(data)
    _check_read_params(path)


# --- the IDX reader --------------------------------------------------------------------------

def _check_decode(data: bytes) -> None:
    try:
        array = idx.decode(data)
    except DataError as exc:
        assert_one_line(exc)
        return
    # Accepted: the array is exactly what the header says, filled with exactly the payload.
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    assert data[:3] == b"\x00\x00\x08"
    assert array.dtype == np.uint8 and array.shape == shape
    assert array.tobytes() == data[4 + 4 * ndim :]


@st.composite
def idx_like(draw) -> bytes:
    """IDX headers with plausible and hostile sizes, and payloads that fit them or nearly do."""
    type_code = draw(st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D]))
    dims = draw(st.lists(st.one_of(st.integers(0, 5), st.sampled_from([65536, 2**31, 2**32 - 1])),
                         min_size=1, max_size=70))
    size = math.prod(dims)
    n = size if size <= 200 and draw(st.booleans()) else draw(st.integers(0, 64))
    header = bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + draw(st.binary(min_size=n, max_size=n))


@PROPERTY
@given(st.binary(max_size=80))
@example(b"")
@example(b"\x00\x00\x08\x00")
def test_idx_decode_random_bytes(data):
    _check_decode(data)


@PROPERTY
@given(idx_like())
@example(bytes([0, 0, 8, 4]) + (65536).to_bytes(4, "big") * 4)  # 65536**4 wraps to 0 in int64
@example(bytes([0, 0, 8, 65]) + (1).to_bytes(4, "big") * 65 + b"x")  # numpy holds at most 64 dims
def test_idx_decode_forged_headers(data):
    _check_decode(data)


# --- processed .npy files ------------------------------------------------------------------

META = {"classes": [f"class{i}" for i in range(10)], "shape": [1, 4, 4]}
GOOD = Split(np.zeros((3, 1, 4, 4), dtype=np.uint8), np.array([0, 9, 3], dtype=np.int64))


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("arr_0.npy", _npy(GOOD.images))
    return buffer.getvalue()


arrays = hnp.arrays(
    dtype=st.one_of(hnp.scalar_dtypes(), hnp.array_dtypes(max_size=3)),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
)
near_misses = st.one_of(  # right dtype, wrong shape; right shape, wrong dtype; bad labels
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=5, min_side=1, max_side=4)),
    hnp.arrays(st.sampled_from([np.int8, np.float32, np.int64, np.uint16]), (3, 1, 4, 4)),
    hnp.arrays(st.sampled_from([np.int64, np.int32, np.int8]), st.sampled_from([(3,), (2,), (3, 1)]),
               elements=st.integers(-2, 12)),
)
npy_contents = st.one_of(
    st.binary(max_size=200),
    arrays.map(_npy),
    near_misses.map(_npy),
    # A valid file cut short, or with a byte of its header or data changed.
    st.tuples(arrays.map(_npy), st.integers(0, 300)).map(lambda t: t[0][: t[1]]),
    st.tuples(st.just(_npy(GOOD.images)), st.integers(0, 200), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]),
    st.just(_npy(np.array([{"x": 1}, None], dtype=object), allow_pickle=True)),
    st.just(_zip()),
)


@PROPERTY
@given(st.sampled_from(["images", "labels"]), npy_contents)
@example("images", b"")  # a file left empty by a full disk
@example("images", _zip())  # np.load returns an archive object, not an array, for zip bytes
@example("labels", b"PK\x03\x04 not really a zip")
@example("labels", _npy(GOOD.labels).replace(b"), }", b"), J"))  # a damaged header: tokenizer error
@example("images", _npy_header((10**13, 1, 4, 4)) + bytes(48))  # a forged size: 145 TiB
def test_load_split_on_random_npy_content(scratch, kind, content):
    directory = scratch / "processed"
    directory.mkdir(exist_ok=True)
    save_processed(directory, {"train": GOOD}, META)
    (directory / f"train_{kind}.npy").write_bytes(content)
    try:
        split = load_split(directory, "train", META)
    except DataError as exc:
        assert_one_line(exc)
        return
    # Accepted: only what the stages can use.
    assert split.images.dtype == np.uint8 and split.images.shape[1:] == (1, 4, 4)
    assert split.labels.dtype == np.int64 and split.labels.shape == (len(split.images),)
    assert ((split.labels >= 0) & (split.labels < 10)).all()


# --- checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_state(scratch) -> dict[str, Any]:
    """The plain-data content of a real (tiny) checkpoint, the start of every mutation."""
    import torch

    cfg = config.model_from_dict({"arch": "mlp", "hidden": [4]})
    meta = {"shape": [1, 4, 4], "classes": META["classes"], "mean": [0.5], "std": [0.25]}
    path = scratch / "model.pt"
    model = build_model(cfg, (1, 4, 4), 10, log_probs=True)
    checkpoint.save(path, model, cfg=cfg, meta=meta, loss="nll", extra={"epoch": 1})
    checkpoint.load(path)  # the unmutated file is fine
    return torch.load(path, weights_only=True)


@PROPERTY
@given(st.data())
def test_checkpoint_load_on_mutated_plain_data(scratch, saved_state, data):
    # Plain data passes torch's weights_only gate, so what it contains is the pipeline's to check:
    # a checkpoint from another version, a hand-edited or damaged one must be refused in one line.
    import torch

    state = copy.deepcopy(saved_state)
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        slots = [(c, k) for c, k in _slots(state) if c is not state.get("state_dict")]
        container, key = data.draw(st.sampled_from(slots), label="where")
        if data.draw(st.booleans(), label="delete"):
            del container[key]
        else:
            container[key] = data.draw(small_json_like, label="value")
    path = scratch / "mutated.pt"
    torch.save(state, path)
    try:
        checkpoint.load(path)
    except DataError as exc:
        assert_one_line(exc)
