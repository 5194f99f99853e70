"""Typed, validated views of `params.yaml`, one frozen model per section.

Each stage loads only the sections it declares in dvc.yaml, so a typo in an unrelated
section never stops it. Validation happens once, before any work, and every problem is
reported as one line naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.errors import ConfigError
from imgclf.paths import PARAMS_FILE


class Section(BaseModel):
    # strict: "0.1" is not a number and 1.0 is not an int; `dvc exp run -S` typos fail here.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DownloadConfig(Section):
    dataset: Literal["fashion_mnist"]
    mirrors: Annotated[list[str], Field(min_length=1)]
    files: Annotated[dict[str, Sha256], Field(min_length=1)]
    timeout_s: PosFloat = 30.0
    retries: Annotated[int, Field(ge=0, le=10)] = 2

    @field_validator("mirrors")
    @classmethod
    def _mirror_schemes(cls, mirrors: list[str]) -> list[str]:
        for url in mirrors:
            if not url.startswith(("file://", "http://", "https://")):
                raise ValueError(f"mirror {url!r} must start with file://, http:// or https://")
        return mirrors


class PreprocessConfig(Section):
    val_fraction: Fraction
    seed: Annotated[int, Field(ge=0)]


class TrainConfig(Section):
    seed: Annotated[int, Field(ge=0)]
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
    loss: Literal["cross_entropy", "nll"] = "cross_entropy"
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    threads: Annotated[int, Field(ge=0)] = 0
    eval_batch_size: PosInt = 1000
    # auto: CUDA when torch sees a GPU, else CPU. Asking for cuda without one is an error.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.use_deterministic_algorithms (and CUBLAS_WORKSPACE_CONFIG on CUDA): same bytes out.
    deterministic: bool = True
    # Data-parallel DDP processes on this machine (torchrun). batch_size stays the global
    # batch (split evenly across processes), so lr needs no rescaling when this changes.
    processes: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainConfig:
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} does not split evenly across "
                             f"{self.processes} processes (use a multiple of {self.processes})")
        return self


class MLPConfig(Section):
    arch: Literal["mlp"]
    hidden: Annotated[list[PosInt], Field(min_length=1)]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    batch_norm: bool = False
    train: dict[str, Any] = Field(default_factory=dict)


class CNNConfig(Section):
    arch: Literal["cnn"]
    channels: Annotated[list[PosInt], Field(min_length=1, max_length=4)]
    hidden: PosInt
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    batch_norm: bool = True
    train: dict[str, Any] = Field(default_factory=dict)


ModelConfig = Annotated[MLPConfig | CNNConfig, Field(discriminator="arch")]


class _ModelHolder(Section):
    model: ModelConfig


def model_from_dict(raw: dict[str, Any]) -> MLPConfig | CNNConfig:
    """An architecture config from a plain mapping (as stored in a checkpoint)."""
    return _ModelHolder.model_validate({"model": raw}).model


class EvaluateConfig(Section):
    batch_size: PosInt
    top_misclassified: Annotated[int, Field(ge=0, le=1000)]


class ReportConfig(Section):
    samples_per_class: Annotated[int, Field(ge=1, le=32)]
    prediction_grid: Annotated[int, Field(ge=1, le=400)]


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


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _format_error(exc: ValidationError, prefix: str, model: type[BaseModel], raw: Any) -> str:
    err = exc.errors(include_url=False)[0]
    # A key is shown as typed unless it holds a line break or other unprintable character.
    loc = [str(p) if str(p).isprintable() else repr(str(p))
           for p in err["loc"] if not (isinstance(p, str) and p in ("mlp", "cnn"))]
    # Drop the wrapper field used to validate one model entry.
    if loc and loc[0] == "model":
        loc = loc[1:]
    path = ".".join([prefix, *loc]) if loc else prefix
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, raw, loc[:-1])
        return f"{path}: unknown key{_closest(loc[-1], allowed)} (allowed: {', '.join(allowed)})"
    value = err.get("input")
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across keys (model_validator): the message names them
        return f"{path}: {msg}"
    shown = "null" if value is None else repr(value)
    return f"{path}: got {shown}: {msg[0].lower() + msg[1:]}"


def _allowed_keys(model: type[BaseModel], raw: Any, loc: list[str]) -> list[str]:
    if model is _ModelHolder and isinstance(raw, dict):
        arch = raw.get("model", {}).get("arch")
        model = {"mlp": MLPConfig, "cnn": CNNConfig}.get(arch, model)
    return sorted(model.model_fields)


def load_section(key: str, model: type[S], params: dict[str, Any] | None = None) -> S:
    """Validate one section of params.yaml (`key` may be dotted) into its typed config."""
    params = read_params() if params is None else params
    raw = _section(params, key, PARAMS_FILE.name)
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, key, model, raw)) from None


def load_model(name: str, params: dict[str, Any] | None = None) -> MLPConfig | CNNConfig:
    """The architecture config of `models.<name>`."""
    params = read_params() if params is None else params
    raw = _section(params, f"models.{name}", PARAMS_FILE.name)
    if not isinstance(raw, dict):
        raise ConfigError(f"models.{name}: expected a mapping, got {raw!r}")
    if raw.get("arch") not in ("mlp", "cnn"):
        raise ConfigError(f"models.{name}.arch: got {raw.get('arch')!r}: must be one of 'mlp', 'cnn'")
    try:
        return _ModelHolder.model_validate({"model": raw}).model
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, f"models.{name}", _ModelHolder, {"model": raw})) from None


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
        if loc and str(loc[0]) in model.train:
            prefix = f"models.{name}.train"
        raise ConfigError(_format_error(exc, prefix, TrainConfig, merged)) from None


def load_dataset_name(params: dict[str, Any] | None = None) -> str:
    """`download.dataset` alone, for stages that read only which data set it is."""
    params = read_params() if params is None else params
    name = _section(params, "download.dataset", PARAMS_FILE.name)
    allowed = DownloadConfig.model_fields["dataset"].annotation.__args__
    if name not in allowed:
        raise ConfigError(f"download.dataset: got {name!r}: must be one of {', '.join(map(repr, allowed))}")
    return name


def model_names(params: dict[str, Any] | None = None) -> list[str]:
    """Names under `models`, in file order (the order dvc.yaml's foreach uses)."""
    params = read_params() if params is None else params
    models = _section(params, "models", PARAMS_FILE.name)
    if not isinstance(models, dict) or not models:
        raise ConfigError("models: expected a non-empty mapping of model name -> architecture")
    return list(models)


def validate_all(params: dict[str, Any] | None = None) -> list[str]:
    """Validate every section at once; return the model names. Raises the first ConfigError."""
    params = read_params() if params is None else params
    load_section("download", DownloadConfig, params)
    load_section("preprocess", PreprocessConfig, params)
    names = model_names(params)
    for name in names:
        load_train(name, params)
    load_section("evaluate", EvaluateConfig, params)
    load_section("report", ReportConfig, params)
    load_section("mlflow", MlflowConfig, params)
    unknown = sorted(set(params) - {"download", "preprocess", "train", "models", "evaluate", "report", "mlflow"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (allowed: download, preprocess, train, models, "
                          "evaluate, report, mlflow)")
    return names
