"""Typed, validated views of `params.yaml`, one frozen model per section.

Each stage loads only the sections it declares in dvc.yaml, so a typo in an unrelated
section never stops it. Validation happens once, before any work, and every problem is
reported as one line naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.errors import ConfigError
from imgclf.paths import PARAMS_FILE
from imgclf.redact import masked, masked_text


class Section(BaseModel):
    # strict: "0.1" is not a number and 1.0 is not an int; `dvc exp run -S` typos fail here.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Every integer that reaches a library has an upper bound: torch and numpy take C integers, and
# 2**64 overflows them with a traceback instead of a message.
PosInt = Annotated[int, Field(gt=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's legacy seeds are 32-bit; torch's wider
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]

# Names become a URL path and a file name under data/raw: only plain names, so no entry in
# params.yaml can write outside data/raw, fetch another resource, or hide as a dot-file.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# A key under `models` becomes DVC stage names (train@<name>) and folders (models/<name>/).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MODEL_NAME_RULE = "letters, digits, '_' and '-', starting with a letter or digit"
# `scheme://user:password@`: urllib would not log in with it anyway (it would send it to the
# DNS resolver as part of a host name), and secrets do not belong in git-tracked params.yaml.
USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")
CHECKSUM = re.compile(r"[0-9a-f]{64}|md5:[0-9a-f]{32}")


def check_checksum(value: Any) -> str:
    if not (isinstance(value, str) and CHECKSUM.fullmatch(value)):
        raise ValueError("must be 64 lowercase hex digits (SHA-256 of the decompressed content) "
                         "or md5:<32 lowercase hex digits> (MD5 of the file as served)")
    return value


# A bare SHA-256 is of the decompressed content, so it survives a mirror's re-compression;
# `md5:` is of the bytes as served, for archives whose only published checksum is that one.
Checksum = Annotated[str, AfterValidator(check_checksum)]


class DownloadConfig(Section):
    # A key of `datasets` (checked against that section by validate_all / load_dataset).
    dataset: Annotated[str, AfterValidator(lambda v: _plain(v, "a key of `datasets`"))]
    timeout_s: PosFloat = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 2

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        # params.yaml files (and `-S download.mirrors=...` habits) from before per-data-set sources.
        moved = [key for key in ("mirrors", "files") if isinstance(raw, dict) and key in raw]
        if moved:
            raise ValueError(f"{' and '.join(moved)} moved to datasets.<name>, one entry per data set "
                             "(see docs/datasets.md)")
        return raw


def _plain(value: str, what: str) -> str:
    if not PLAIN_NAME.fullmatch(value):
        raise ValueError(f"must be {what}: letters, digits, '.', '_', '+', '-'")
    return value


# Image folders live below this directory (relative to the project root): the preprocess stage
# depends on it as a whole, because dvc.yaml cannot name `datasets.<chosen>.folder` itself
# (DVC does not interpolate nested `${...}`). See docs/datasets.md.
IMAGES_ROOT = "data/images"


class Augment(Section):
    """What `train.augment` does for a data set: random shifts of up to `shift` pixels (a
    zero-padded random crop), and horizontal flips only where a mirrored image keeps its class
    (clothes and CIFAR's objects yes, digits and text no)."""

    shift: Annotated[int, Field(ge=0, le=16)] = 0
    flip: bool = False


# How transparency becomes pixels (imgclf.data.images): auto, or a background colour.
TRANSPARENCY_RULE = re.compile(r"auto|#[0-9a-fA-F]{6}")


def is_transparency_rule(value: object) -> bool:
    return isinstance(value, str) and TRANSPARENCY_RULE.fullmatch(value) is not None


def _transparency_rule(value: str) -> str:
    if not is_transparency_rule(value):
        raise ValueError("must be auto (each image on the background that keeps it visible) "
                         "or a colour #rrggbb (e.g. '#ffffff')")
    return value


class ArchiveLimits(Section):
    """`datasets.<name>.archive_limits`: what a downloaded tar or zip may hold before it is
    refused unread. A member is read whole into memory, so its decompressed size is bounded (a
    zip or tar bomb); so are the number of members (each listed one costs memory) and the
    decompressed total. The defaults are far above real image sets (CIFAR-10's largest member:
    31 MB) and far below what would exhaust a machine."""

    max_member_mib: Annotated[int, Field(ge=1, le=4096)] = 256
    max_members: Annotated[int, Field(ge=1, le=100_000_000)] = 1_000_000
    max_total_mib: Annotated[int, Field(ge=1, le=16 * 2**20)] = 64 * 1024


class DatasetConfig(Section):
    """`datasets.<name>`: one data set, built in or a team's own image folder.

    format idx / cifar: the official files (`mirrors` + `files`), `classes` naming the labels.
    format folder: one subfolder per class, either at `folder` (tracked by `dvc add` or
    `dvc import`) or inside a tar/zip archive fetched from `mirrors` + `files` (one file);
    class names come from the folder names, images are converted to `channels` and resized
    to `image_size` by `resize`.
    """

    format: Literal["idx", "cifar", "folder"] = "folder"
    title: Annotated[str, Field(min_length=1, max_length=80)] | None = None  # shown in the report
    classes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2, max_length=1000)] | None = None
    augment: Augment = Augment()
    mirrors: Annotated[list[str], Field(min_length=1)] | None = None
    files: Annotated[dict[str, Checksum], Field(min_length=1)] | None = None
    # --- image folders only ---
    folder: str | None = None
    image_size: Annotated[list[Annotated[int, Field(ge=4, le=1024)]], Field(min_length=2, max_length=2)] | None = None
    channels: Literal[1, 3] | None = None
    # pad: scale to fit, centre, fill the rest with black (nothing cut off, nothing distorted);
    # crop: scale to cover, cut the centre; stretch: scale each side independently.
    resize: Literal["pad", "crop", "stretch"] = "pad"
    # Drawn from the images when the folder has no top-level test/ (then test/ is the test set).
    test_fraction: Fraction = 0.1
    # error: any unreadable or misplaced file stops preprocess, naming it; skip: such files are
    # left out, counted and listed (meta.json, the report, MLflow).
    bad_files: Literal["error", "skip"] = "error"
    # How transparent pixels become pixels (imgclf.data.images): auto puts each image on the
    # background that contrasts with its content (a dark glyph on a transparent background stays
    # visible); "#rrggbb" puts every image on that colour.
    transparency: Annotated[str, AfterValidator(_transparency_rule)] = "auto"
    # error: preprocess stops when far more images come out (nearly) uniform than the data
    # set's own opaque images show (imgclf.data.quality); warn: it logs the count and goes on.
    blank_images: Literal["error", "warn"] = "error"
    # Near-duplicates (the same picture resized, re-encoded or slightly cropped) in different
    # splits: report them, or keep each group in one split (imgclf.data.neardup).
    near_duplicates: Literal["report", "keep_together"] = "keep_together"
    # --- downloaded archives (CIFAR's tarball, a folder's tar or zip) ---
    archive_limits: ArchiveLimits = ArchiveLimits()

    @field_validator("mirrors")
    @classmethod
    def _mirror_schemes(cls, mirrors: list[str] | None) -> list[str] | None:
        for url in mirrors or []:
            if not url.startswith(("file://", "http://", "https://")):
                raise ValueError(f"mirror {url!r} must start with file://, http:// or https://")
        return mirrors

    @field_validator("folder")
    @classmethod
    def _under_images_root(cls, folder: str | None) -> str | None:
        if folder is None:
            return None
        parts = Path(folder).parts
        if Path(folder).is_absolute() or ".." in parts or len(parts) < 3 or "/".join(parts[:2]) != IMAGES_ROOT:
            raise ValueError(f"must be a folder below {IMAGES_ROOT}/, relative to the project root "
                             f"(e.g. {IMAGES_ROOT}/my_photos): the preprocess stage depends on {IMAGES_ROOT}")
        return Path(folder).as_posix()

    @model_validator(mode="after")
    def _consistent(self) -> DatasetConfig:
        self._check_sources()
        if self.format == "folder":
            missing = [k for k in ("image_size", "channels") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required for an image folder "
                                 "(image_size: [height, width], channels: 1 or 3)")
            if self.classes is not None:
                raise ValueError("classes: not allowed for an image folder (its class names are its folder names)")
            return self
        given = [k for k in ("folder", "image_size", "channels", "resize", "test_fraction", "bad_files",
                             "transparency", "blank_images", "near_duplicates")
                 if k in self.model_fields_set]
        if given:
            raise ValueError(f"{given[0]}: only for format folder (format {self.format} has its own "
                             "shapes and official test split)")
        if self.classes is None:
            raise ValueError(f"classes required for format {self.format} (the names of labels 0, 1, ...)")
        return self

    def _check_sources(self) -> None:
        has_download = self.mirrors is not None or self.files is not None
        if self.folder is not None and has_download:
            raise ValueError("give either folder (a DVC-tracked folder) or mirrors and files (an archive), not both")
        if self.folder is None and (self.mirrors is None or self.files is None):
            need = "folder, or mirrors and files" if self.format == "folder" else "mirrors and files"
            raise ValueError(f"{need} required (where the data comes from)")
        if self.format == "folder" and self.files is not None and len(self.files) != 1:
            raise ValueError("files: an image folder comes as one tar or zip archive; name exactly one file")
        check_mirrors(self.mirrors or [])
        check_file_names(list(self.files or {}))
        if self.format == "folder" and self.files is not None:
            (name,) = self.files
            if not name.removesuffix(".gz").endswith((".tar", ".tgz", ".zip")):
                raise ValueError(f"files: {name!r} is not a .tar, .tar.gz, .tgz or .zip archive")


# The checks of a download source, shared by the params schema and imgclf.data.download (which
# library callers may reach without params.yaml). They raise ValueError with the whole message.

def check_mirrors(mirrors: list[str]) -> None:
    # Raised as a whole message rather than per field, so the masked URL, not a `got <value>`
    # echo of the whole list, is what is shown: a password must never reach a log.
    for i, url in enumerate(mirrors):
        if USERINFO.match(url):
            raise ValueError(f"mirrors[{i}] {masked(url)!r} contains a user name or password; "
                             "mirrors must not need credentials")
        # The file name is appended as a path: a query (often a token) or fragment would
        # swallow it, and a token there is a credential in git-tracked params.yaml.
        if "?" in url or "#" in url:
            raise ValueError(f"mirrors[{i}] {masked(url)!r} has a query or fragment ('?' or '#'); "
                             "a mirror is a plain directory URL the file names are appended to")


def check_file_names(names: list[Any]) -> None:
    stored: dict[str, str] = {}
    for name in names:
        if not (isinstance(name, str) and PLAIN_NAME.fullmatch(name)):
            raise ValueError(f"files: {name!r} is not a plain file name "
                             "(letters, digits, '.', '_', '+', '-'; no directories)")
        # x.gz is stored decompressed as x (see imgclf.data.download.stored_name).
        plain = name.removesuffix(".gz")
        if plain in stored:
            raise ValueError(f"files: {stored[plain]!r} and {name!r} would both be stored as {plain!r}")
        stored[plain] = name


class PreprocessConfig(Section):
    val_fraction: Fraction
    seed: Seed


# What a model outputs decides its loss: raw scores for cross_entropy, log_softmax for nll.
# imgclf.engine.make_loss implements each; checkpoints record which one trained the model.
LossKind = Literal["cross_entropy", "nll"]
LOSSES: tuple[str, ...] = get_args(LossKind)


class TrainConfig(Section):
    seed: Seed
    epochs: PosInt
    batch_size: PosInt
    optimizer: Literal["sgd", "adamw"]
    lr: PosFloat
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["onecycle", "constant"] = "onecycle"
    warmup_fraction: Fraction = 0.2
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    augment: bool = False
    loss: LossKind = "cross_entropy"
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    threads: Annotated[int, Field(ge=0, le=1024)] = 0
    # auto: CUDA when torch sees a GPU, else CPU. Asking for cuda without one is an error.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.use_deterministic_algorithms (and CUBLAS_WORKSPACE_CONFIG on CUDA): same bytes out.
    deterministic: bool = True
    # Data-parallel DDP processes on this machine (torchrun). batch_size stays the global
    # batch (split evenly across processes), so lr needs no rescaling when this changes.
    processes: Annotated[int, Field(ge=1, le=64)] = 1

    # Keys of params.yaml files from before, and where they went.
    MOVED: ClassVar[dict[str, str]] = {
        "eval_batch_size": "evaluate.batch_size (one batch size for the validation after each epoch "
                           "and for the evaluate stage)",
    }

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        moved = [key for key in cls.MOVED if isinstance(raw, dict) and key in raw]
        if moved:
            raise ValueError(f"{moved[0]} moved to {cls.MOVED[moved[0]]}")
        return raw

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainConfig:
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} does not split evenly across "
                             f"{self.processes} processes (use a multiple of {self.processes})")
        return self


# Every architecture a key under `models` may name, by its `arch` value; filled in by defining
# an ArchConfig subclass below (imgclf.models registers the nn.Module that each one builds).
ARCHITECTURES: dict[str, type[ArchConfig]] = {}


class ArchConfig(Section):
    """`models.<name>`: an architecture and its constructor arguments, plus per-model `train` overrides.

    A subclass is an architecture: its `arch` literal is the value params.yaml names, and its other
    fields (all but `train`) are the keyword arguments of the nn.Module that imgclf.models builds for it.
    Defining the subclass registers it; validation, checkpoints and error messages follow from that.
    """

    arch: str
    train: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.arch_name()
        if name in ARCHITECTURES:
            raise TypeError(f"architecture {name!r} is defined twice ({ARCHITECTURES[name].__name__}, {cls.__name__})")
        ARCHITECTURES[name] = cls

    @classmethod
    def arch_name(cls) -> str:
        """The `arch` value that selects this architecture (its `arch: Literal[...]`)."""
        (name,) = get_args(cls.model_fields["arch"].annotation)
        return name

    def module_args(self) -> dict[str, Any]:
        """The nn.Module's keyword arguments: every field but `arch` and `train`."""
        return self.model_dump(exclude={"arch", "train"})


class MLPConfig(ArchConfig):
    arch: Literal["mlp"]
    hidden: Annotated[list[PosInt], Field(min_length=1)]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    batch_norm: bool = False


class CNNConfig(ArchConfig):
    arch: Literal["cnn"]
    channels: Annotated[list[PosInt], Field(min_length=1, max_length=4)]
    hidden: PosInt
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    batch_norm: bool = True


def _architecture_of(raw: Any) -> type[ArchConfig] | None:
    arch = raw.get("arch") if isinstance(raw, dict) else None
    # A YAML list or mapping is unhashable: check the type before looking it up.
    return ARCHITECTURES.get(arch) if isinstance(arch, str) else None


def model_from_dict(raw: dict[str, Any]) -> ArchConfig:
    """An architecture config from a plain mapping (as stored in a checkpoint)."""
    config = _architecture_of(raw)
    if config is None:
        got = raw.get("arch") if isinstance(raw, dict) else raw
        raise TypeError(f"arch {got!r} is not one of {', '.join(map(repr, ARCHITECTURES))}")
    return config.model_validate(raw)


class EvaluateConfig(Section):
    # Images per forward pass when only predicting: the evaluate stage, and the train stage's
    # validation after each epoch (dvc.yaml: train depends on this key alone).
    batch_size: PosInt
    top_misclassified: Annotated[int, Field(ge=0, le=1000)]


class ReportConfig(Section):
    samples_per_class: Annotated[int, Field(ge=1, le=32)]
    prediction_grid: Annotated[int, Field(ge=1, le=400)]


class PromotionConfig(Section):
    """`promotion`: when a newly evaluated model replaces the champion (imgclf.promotion). Both
    are scored on today's test images; the challenger is promoted when the lower bound of the
    (1 - alpha) interval of its accuracy gain exceeds -margin, unless a shared class drops by
    more than max_class_drop."""

    # Above 0.2, "significant" would let one noise-only challenger in five through.
    alpha: Annotated[float, Field(gt=0, le=0.2, allow_inf_nan=False)] = 0.05
    margin: Annotated[float, Field(ge=0, le=0.1, allow_inf_nan=False)] = 0.0  # accuracy, 0.01 = 1 point
    max_class_drop: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.05


class MlflowConfig(Section):
    experiment: Annotated[str, Field(min_length=1, max_length=200)]
    # Which key under `models` the evaluate stage registers (null: none). Whether that key
    # exists is checked by the stage, which knows the model names.
    register_model: Annotated[str, Field(min_length=1)] | None = None
    registered_name: Annotated[str, Field(min_length=1, max_length=200)] = "fashion-mnist-classifier"

    @field_validator("registered_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # Letters, digits and . _ - only, so `models:/<name>@champion` needs no quoting anywhere.
        alnum = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        if name[0] not in alnum or not set(name) <= alnum | set("._-"):
            raise ValueError("use letters, digits, '.', '_' and '-', starting with a letter or digit")
        return name

    def registered_as(self, model: str) -> str | None:
        """The registered model whose versions `model`'s evaluate stage adds, or None."""
        return self.registered_name if self.register_model == model else None


S = TypeVar("S", bound=Section)


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a mapping, or a ConfigError saying why it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.name}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}: not valid YAML{where}") from None
    except (ValueError, RecursionError) as exc:
        # YAML's implicit types are built by plain Python: `2001-13-40` looks like a date but is
        # none, a 5000-digit number is past int()'s limit, deep nesting past the recursion limit.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path.name}: a value cannot be read ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _section(params: dict[str, Any], key: str, source: str) -> Any:
    node: Any = params
    walked: list[str] = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(walked) or "top level"
            # YAML keys may be ints, booleans or null (`1:`, `on:`, `~:`): compare them as text.
            options = sorted(str(k) for k in node) if isinstance(node, dict) else []
            hint = _closest(part, options)
            raise ConfigError(f"{source}: missing section {key!r} (not found under {where}){hint}")
        node = node[part]
        walked.append(part)
    return node


def _shown(key: Any) -> str:
    """A key as typed, unless it holds a line break or other unprintable character."""
    return str(key) if str(key).isprintable() else repr(str(key))


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _format_error(exc: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    err = exc.errors(include_url=False)[0]
    # A key is shown as typed unless it holds a line break or other unprintable character.
    loc = [str(p) if str(p).isprintable() else repr(str(p)) for p in err["loc"]]
    path = ".".join([prefix, *loc]) if loc else prefix
    if err["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields)
        return f"{path}: unknown key{_closest(loc[-1], allowed)} (allowed: {', '.join(allowed)})"
    value = err.get("input")
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across keys (model_validator): the message names them
        return f"{path}: {msg}"
    # Masked: a wrongly typed mirror list or URL may carry a password or a token.
    shown = "null" if value is None else masked_text(repr(value))
    return f"{path}: got {shown}: {msg[0].lower() + msg[1:]}"


def load_section(key: str, model: type[S], params: dict[str, Any] | None = None) -> S:
    """Validate one section of params.yaml (`key` may be dotted) into its typed config."""
    params = read_params() if params is None else params
    raw = _section(params, key, PARAMS_FILE.name)
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {masked_text(repr(raw))}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, key, model)) from None


def load_model(name: str, params: dict[str, Any] | None = None) -> ArchConfig:
    """The architecture config of `models.<name>`."""
    params = read_params() if params is None else params
    raw = _section(params, f"models.{name}", PARAMS_FILE.name)
    if not isinstance(raw, dict):
        raise ConfigError(f"models.{_shown(name)}: expected a mapping, got {raw!r}")
    config = _architecture_of(raw)
    if config is None:
        raise ConfigError(f"models.{_shown(name)}.arch: got {raw.get('arch')!r}: "
                          f"must be one of {', '.join(map(repr, ARCHITECTURES))}")
    try:
        return config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, f"models.{_shown(name)}", config)) from None


def load_train(name: str, params: dict[str, Any] | None = None) -> TrainConfig:
    """`train`, with the per-model overrides of `models.<name>.train` applied."""
    params = read_params() if params is None else params
    base = _section(params, "train", PARAMS_FILE.name)
    model = load_model(name, params)
    if not isinstance(base, dict):
        raise ConfigError(f"train: expected a mapping, got {base!r}")
    merged = {**base, **model.train}
    prefix = "train"
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        if (loc and str(loc[0]) in model.train) or (not loc and set(TrainConfig.MOVED) & set(model.train)):
            prefix = f"models.{_shown(name)}.train"
        raise ConfigError(_format_error(exc, prefix, TrainConfig)) from None


def load_dataset_name(params: dict[str, Any] | None = None) -> str:
    """`download.dataset` alone (a key of `datasets`), for stages that read only which data set it is."""
    params = read_params() if params is None else params
    name = _section(params, "download.dataset", PARAMS_FILE.name)
    known = [str(k) for k in _datasets(params)]
    if not isinstance(name, str) or name not in known:
        raise ConfigError(f"download.dataset: got {name!r}: must be a key of datasets "
                          f"({', '.join(known)}){_closest(str(name), known)}")
    return name


def load_dataset(name: str, params: dict[str, Any] | None = None) -> DatasetConfig:
    """`datasets.<name>`: where one data set comes from and how to read it."""
    return load_section(f"datasets.{name}", DatasetConfig, params)


def _datasets(params: dict[str, Any]) -> dict[Any, Any]:
    sources = _section(params, "datasets", PARAMS_FILE.name)
    if not isinstance(sources, dict) or not sources:
        raise ConfigError("datasets: expected a non-empty mapping of data set name -> description")
    return sources


def _validate_datasets(params: dict[str, Any], chosen: str) -> None:
    # The chosen data set's entry first (its error is the one that stops this run), then the
    # others, so a typo in an entry not used today still fails now rather than on the switch.
    load_dataset(chosen, params)
    for name in _datasets(params):
        # A name becomes a folder under data/ and a tag value: only plain names.
        if not (isinstance(name, str) and PLAIN_NAME.fullmatch(name)):
            raise ConfigError(f"datasets.{_shown(name)}: not a usable data set name "
                              "(letters, digits, '.', '_', '+' and '-', starting with a letter or digit)")
        if name != chosen:
            load_dataset(name, params)


def _check_overrides_leave_a_use(params: dict[str, Any], names: list[str]) -> None:
    """A key of `train` that every model overrides moves nothing: `-S train.<key>=...` would rerun
    every model and change none. Such a value belongs under the models, not in `train`."""
    base = _section(params, "train", PARAMS_FILE.name)
    overrides = [load_model(name, params).train for name in names]
    for key in base:
        if all(key in o for o in overrides):
            raise ConfigError(f"train.{_shown(key)}: every model overrides it ({', '.join(names)}), so it changes "
                              f"nothing; set models.<name>.train.{_shown(key)} instead, or remove an override")


def model_names(params: dict[str, Any] | None = None) -> list[str]:
    """Names under `models`, in file order (the order dvc.yaml's foreach uses)."""
    params = read_params() if params is None else params
    models = _section(params, "models", PARAMS_FILE.name)
    if not isinstance(models, dict) or not models:
        raise ConfigError("models: expected a non-empty mapping of model name -> architecture")
    for name in models:
        # A name becomes DVC stage names (train@<name>) and folders (models/<name>/).
        if not (isinstance(name, str) and MODEL_NAME.fullmatch(name)):
            raise ConfigError(f"models.{_shown(name)}: not a usable model name ({MODEL_NAME_RULE}: "
                              "it names stages and folders)")
    return list(models)


def validate_all(params: dict[str, Any] | None = None) -> list[str]:
    """Validate every section at once; return the model names. Raises the first ConfigError."""
    params = read_params() if params is None else params
    load_section("download", DownloadConfig, params)
    _validate_datasets(params, load_dataset_name(params))
    load_section("preprocess", PreprocessConfig, params)
    names = model_names(params)
    for name in names:
        load_train(name, params)
    _check_overrides_leave_a_use(params, names)
    load_section("evaluate", EvaluateConfig, params)
    load_section("report", ReportConfig, params)
    load_section("mlflow", MlflowConfig, params)
    load_section("promotion", PromotionConfig, params)
    sections = ("download", "datasets", "preprocess", "train", "models", "evaluate", "report", "mlflow",
                "promotion")
    unknown = sorted(set(map(str, params)) - set(sections))
    if unknown:
        raise ConfigError(f"{_shown(unknown[0])}: unknown section{_closest(unknown[0], list(sections))} "
                          f"(allowed: {', '.join(sections)})")
    return names
