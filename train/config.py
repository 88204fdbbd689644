"""Training configuration: nested dataclasses loaded from YAML, with `--set section.key=value` overrides.

Every value is coerced to the type of its dataclass field, so `lr: 1e-4` (which PyYAML reads as a
string) becomes a float, and anything that cannot be coerced, or any key the dataclasses do not
know, is a `ConfigError` whose message is one line naming the file (or the `--set` argument), the
key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; str() is one line naming the source, the key and the value."""


@dataclass
class DataConfig:
    """Where the prepared shards are and how they are read."""

    dir: str = "data/digits"  # a folder written by `python -m data_prep.prepare`
    num_workers: int = 2  # reader worker processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling in each worker
    read_timeout: float = 600.0  # seconds the reader workers may take for one batch (0: no limit)


@dataclass
class ModelSection:
    """ModelConfig fields except bins, seq_len and n_classes, which come from the data manifest."""

    n_layers: int = 8
    n_heads: int = 8
    d_query: int = 32
    d_value: Optional[int] = None  # None: same as d_query
    d_ff: int = 1024
    dropout: float = 0.0
    attention: str = "causal-linear"  # causal-linear | softmax
    backend: str = "auto"  # auto | torch | fast-transformers | fla
    chunk_size: int = 64
    head: str = "categorical"  # categorical | logistic-mixture
    mixtures: int = 10
    condition: str = "class"  # none | class | caption | both
    caption_len: int = 48
    condition_dropout: float = 0.1
    condition_inject: str = "blocks"  # prefix | input | blocks: how the condition reaches every position
    conv_kernel: int = 0  # causal depthwise convolution over the last N byte embeddings (0: none)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warmup, then cosine down to lr * min_lr_ratio)."""

    name: str = "adamw"  # adamw | radam
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # never applied to norms, embeddings and biases
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # 1.0 = constant learning rate after warmup
    grad_clip: float = 1.0  # global L2 norm; 0 = no clipping (the norm is still logged)


@dataclass
class TrainSection:
    """Length of the run, batch sizes, checkpoints, precision and determinism."""

    run_dir: str = "runs/digits"
    max_steps: Optional[int] = None  # optimizer steps; when set, it takes precedence over epochs
    epochs: Optional[float] = None  # passes over the train split, converted to steps at start
    batch_size: int = 32  # per rank and per micro-step
    grad_accum: int = 1
    eval_every: int = 1000  # steps between exact test-split evaluations (and one at the end)
    eval_at_start: bool = True  # evaluate at step 0 of a fresh run: a baseline and an early check
    eval_batch_size: int = 64
    n_samples: int = 10  # images in the sample grid logged at each evaluation; 0 = none
    sample_every: int = 0  # steps between sample grids; 0 = at each evaluation
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    deterministic: bool = False  # torch.use_deterministic_algorithms: N + resume N == 2N exactly
    max_bad_steps: int = 20  # stop after this many non-finite losses in a row
    # Exponential moving average of the weights (0 = off): evaluation, sample grids and the export
    # use the average; checkpoints keep both. 0.995 averages over the last ~200 steps.
    ema_decay: float = 0.0
    cpu_threads: Optional[int] = None  # torch threads per rank when training on CPU; None: torch's default


@dataclass
class LogConfig:
    """How often scalars go to TensorBoard and the progress bar."""

    every: int = 50
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """The whole training configuration, one field per YAML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    ("optim", "name"): ("adamw", "radam"),
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
}
POSITIVE = {
    ("train", "batch_size"), ("train", "grad_accum"), ("train", "eval_every"),
    ("train", "eval_batch_size"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
    ("train", "max_bad_steps"), ("train", "cpu_threads"), ("log", "every"), ("optim", "lr"),
}


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans (so `mixed_precision: no`
    stays the string "no") and `1e-4` is a float."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 booleans and floats (safe: plain data only)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    """A short readable name for a field type."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce value to the field type tp, or raise ConfigError naming where."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = parse_yaml(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)  # accepts "1e4" and 10000.0
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _section_types(section_cls: type) -> dict[str, Any]:
    """Field name -> resolved type for one section dataclass."""
    return typing.get_type_hints(section_cls)


def _set_value(cfg: TrainConfig, dotted: str, value: Any, source: str) -> None:
    """Set cfg.<section>.<key> = value coerced to the field type; errors name source and key."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: key {dotted!r} must have the form section.key "
                          f"(sections: {', '.join(f.name for f in dataclasses.fields(cfg))})")
    section_name, key = parts
    section = getattr(cfg, section_name, None) if section_name in _section_names() else None
    if section is None:
        raise ConfigError(f"{source}: unknown section {section_name!r} "
                          f"(known: {', '.join(_section_names())})")
    types = _section_types(type(section))
    if key not in types:
        raise ConfigError(f"{source}: unknown key {dotted!r} (known in {section_name}: {', '.join(types)})")
    coerced = _coerce(value, types[key], f"{source}: {dotted}")
    choices = CHOICES.get((section_name, key))
    if choices is not None and coerced not in choices:
        raise ConfigError(f"{source}: {dotted} must be one of {', '.join(choices)}, got {coerced!r}")
    if (section_name, key) in POSITIVE and coerced is not None and not coerced > 0:
        raise ConfigError(f"{source}: {dotted} must be > 0, got {coerced!r}")
    setattr(section, key, coerced)


def _section_names() -> list[str]:
    """Names of the config sections, in order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def parse_override(text: str) -> tuple[str, Any]:
    """Split one `section.key=value` override; the value is parsed as YAML (strings stay raw)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), raw


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a TrainConfig from the defaults, then the YAML file at path, then each override."""
    cfg = TrainConfig()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = parse_yaml(handle.read())
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{line}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        for section_name, values in data.items():
            if section_name not in _section_names():
                raise ConfigError(f"{path}: unknown section {section_name!r} (known: {', '.join(_section_names())})")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section_name!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                _set_value(cfg, f"{section_name}.{key}", value, path)
    for text in overrides or []:
        key, raw = parse_override(text)
        types = _types_for(key)
        # Strings are taken verbatim (YAML would turn "no" or "null"-like words into other types);
        # everything else is parsed as YAML so that lists and numbers work.
        value = raw if types is str else parse_yaml(raw) if raw.strip() else raw
        _set_value(cfg, key, value, f"--set {text}")
    _check_consistency(cfg, path or "<defaults>")
    return cfg


def _types_for(dotted: str) -> Any:
    """The field type of section.key, or None when the key is unknown (reported later)."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in _section_names():
        return None
    return _section_types(type(getattr(TrainConfig(), parts[0]))).get(parts[1])


def _check_consistency(cfg: TrainConfig, source: str) -> None:
    """Checks that involve more than one key."""
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        raise ConfigError(f"{source}: set train.max_steps or train.epochs")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 0:
        raise ConfigError(f"{source}: train.max_steps must be >= 0, got {cfg.train.max_steps}")
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"{source}: train.epochs must be > 0, got {cfg.train.epochs}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"{source}: optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"{source}: optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.data.read_timeout < 0:
        raise ConfigError(f"{source}: data.read_timeout must be >= 0 (0 = no limit), got {cfg.data.read_timeout}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"{source}: train.ema_decay must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict of the config (tuples as lists), suitable for YAML."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def flatten_config(cfg: TrainConfig) -> dict[str, Any]:
    """Flat {"section.key": value} view (TensorBoard hparams reject nested values)."""
    return {f"{section}.{key}": value for section, values in config_to_dict(cfg).items()
            for key, value in values.items()}


def write_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
