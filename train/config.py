"""Training configuration: nested dataclasses loaded from YAML, with `--set section.key=value` overrides.

Every value is coerced to the type of its dataclass field, so `lr: 1e-4` (which PyYAML reads as a
string) becomes a float, and anything that cannot be coerced, or any key the dataclasses do not
know, is a `ConfigError` whose message is one line naming the file (or the `--set` argument), the
key and the value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from common.files import atomic_file
from model.attention_ops import BACKEND_NAMES
from model.config import ModelConfig


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
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warmup, then cosine down to lr * min_lr_ratio)."""

    name: str = "adamw"  # adamw | radam | muon (Muon for the blocks' matrices, AdamW for the rest)
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
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (bf16 where the device runs it natively, else no)
    deterministic: bool = False  # torch.use_deterministic_algorithms: N + resume N == 2N exactly
    max_bad_steps: int = 20  # stop after this many non-finite losses in a row
    # Exponential moving average of the weights (0 = off): evaluation, sample grids and the export
    # use the average; checkpoints keep both. 0.995 averages over the last ~200 steps.
    ema_decay: float = 0.0
    cpu_threads: Optional[int] = None  # torch threads per rank when training on CPU; None: torch's default
    # torch.compile of every block's forward and backward (inductor fuses the element-wise work that
    # dominates at these widths): auto = on CUDA only (on a CPU the compilation outweighs a short run)
    compile: str = "auto"  # auto | true | false
    # Triton's compiled kernels and autotuning results and inductor's compiled graphs kept in
    # RUN/.kernel-cache, so that a restart or a requeue does not compile and autotune again (a
    # TRITON_CACHE_DIR or TORCHINDUCTOR_CACHE_DIR set in the environment wins)
    kernel_cache: bool = True
    # how the attention runs, not what the model is (neither is saved with the weights): auto is fla's
    # kernels on CUDA where installed, else the torch form in chunks of chunk_size positions
    backend: str = "auto"  # auto | torch | fast-transformers (causal-linear only) | fla
    chunk_size: int = 64


@dataclass
class LogConfig:
    """Which trackers receive scalars, hyperparameters and sample grids, and how often scalars go."""

    every: int = 50
    progress_bar: bool = True
    # YAML key `with` (a Python keyword, hence the underscore): accelerate trackers, one name or a list
    with_: tuple[str, ...] = ("tensorboard",)


@dataclass
class TrainConfig:
    """The whole training configuration, one field per YAML section; `model` is the model's own config.

    model.bins, model.seq_len and model.n_classes come from the data manifest when the config does not
    set them (`keys_set` records which "section.key" the YAML and --set gave).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**TRAINING_DEFAULTS["model"]))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        self.keys_set: set[str] = set()  # not a config key: no field, so not in the YAML or comparisons


# Where training differs from the model's own defaults: datasets with classes are the rule, and a
# config that leaves model.condition out should not silently train an unconditional model; the row
# embeddings fit any raster data once its row is known (check_against_data resolves "auto").
TRAINING_DEFAULTS = {"model": {"condition": "class", "row_len": "auto"}}
CHOICES = {
    "optim.name": ("adamw", "radam", "muon"),
    "train.mixed_precision": ("no", "bf16", "fp16", "auto"),
    "train.compile": ("auto", "true", "false"),
    "train.backend": BACKEND_NAMES,
}
PATHS = {"data.dir", "train.run_dir"}
# keys of earlier configs that now live elsewhere: the message says where
MOVED = {"model.backend": "train.backend", "model.chunk_size": "train.chunk_size"}
POSITIVE = ("train.batch_size", "train.grad_accum", "train.eval_every", "train.epochs", "train.eval_batch_size",
            "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps", "train.cpu_threads",
            "train.chunk_size", "log.every", "optim.lr")
# what one value must be, checked as it is set (None, where a key allows it, is never out of range);
# checks that involve two keys wait for the final values (_check_consistency)
ALLOWED = {
    **{key: (choices.__contains__, f"one of {', '.join(choices)}") for key, choices in CHOICES.items()},
    **{key: (lambda value: value > 0, "> 0") for key in POSITIVE},
    "train.max_steps": (lambda value: value >= 0, ">= 0"),
    "optim.warmup_steps": (lambda value: value >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda value: 0.0 <= value <= 1.0, "in [0, 1]"),
    "data.read_timeout": (lambda value: value >= 0, ">= 0 (0 = no limit)"),
    "train.ema_decay": (lambda value: 0.0 <= value < 1.0, "in [0, 1) (0 = off)"),
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


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce value to the field type tp, or raise ConfigError naming where."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        for arg in args[:-1]:  # Union[int, str]: the first type the value fits
            with contextlib.suppress(ConfigError):
                return _coerce(value, arg, where)
        return _coerce(value, args[-1], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = parse_yaml(value)
        if args[-1] is Ellipsis:  # any length; a single value stands for a list of one
            return tuple(_coerce(v, args[0], where) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        try:
            number = value if isinstance(value, int) else float(value)  # float() accepts "1e4" and 10000.0
        except (TypeError, ValueError):
            number = None
        # bool is an int subclass, and an integer field takes only whole finite numbers
        if isinstance(value, bool) or number is None or \
                tp is int and not (math.isfinite(number) and number == int(number)):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        return tp(number)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _fields(section_cls: type) -> dict[str, tuple[str, Any]]:
    """Config key -> (field name, resolved type) of one section dataclass; field `with_` is key `with`."""
    hints = typing.get_type_hints(section_cls)
    return {f.name.rstrip("_"): (f.name, hints[f.name]) for f in dataclasses.fields(section_cls)}


def _sections() -> dict[str, type]:
    """Section name -> its dataclass, in order."""
    return {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}


def _set_value(given: dict, dotted: str, value: Any, source: str, text: bool = False) -> None:
    """given[section][key] = value coerced to the field type and checked; errors name source and key.
    text: value is the text of a --set argument."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: key {dotted!r} must have the form section.key "
                          f"(sections: {', '.join(_sections())})")
    section_name, key = parts
    if dotted in MOVED:
        raise ConfigError(f"{source}: {dotted} is now {MOVED[dotted]} (how the model runs, not what it is)")
    if section_name not in _sections():
        raise ConfigError(f"{source}: unknown section {section_name!r} (known: {', '.join(_sections())})")
    fields = _fields(_sections()[section_name])
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {dotted!r} (known in {section_name}: {', '.join(fields)})")
    field_name, field_type = fields[key]
    if text and field_type is not str and value.strip():
        # Strings are taken verbatim (YAML would turn "no" or "null"-like words into other types);
        # everything else is parsed as YAML so that lists and numbers work.
        try:
            value = parse_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: {dotted}: not valid YAML") from None
    if isinstance(value, bool) and "true" in CHOICES.get(dotted, ()):
        value = str(value).lower()  # `compile: true` in YAML is the choice "true"
    coerced = _coerce(value, field_type, f"{source}: {dotted}")
    if dotted in PATHS:  # YAML has no shell to expand ~: a folder named '~' would be made in the cwd
        coerced = os.path.expanduser(coerced)
    is_allowed, allowed = ALLOWED.get(dotted, (None, ""))
    if is_allowed is not None and coerced is not None and not is_allowed(coerced):
        raise ConfigError(f"{source}: {dotted} must be {allowed}, got {coerced!r}")
    if section_name == "model":
        try:  # the model's own checks, one field at a time (none of them involves two fields)
            ModelConfig(**{key: coerced})
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    if dotted == "log.with":  # trackers accelerate supports and whose package is installed here
        installed = {str(tracker) for tracker in get_available_trackers()}
        for name in coerced:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise ConfigError(f"{source}: log.with: unknown tracker {name!r} "
                                  f"(accelerate's: {', '.join(LOGGER_TYPE_TO_CLASS)})")
            if name not in installed:
                raise ConfigError(f"{source}: log.with: tracker {name!r} is not installed here (pip install {name})")
    given.setdefault(section_name, {})[field_name] = coerced


def _read_yaml(path: str) -> dict:
    """The sections of the YAML file at path: {section: {key: value}}, section names checked."""
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
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for section_name, values in data.items():
        if section_name not in _sections():
            raise ConfigError(f"{path}: unknown section {section_name!r} (known: {', '.join(_sections())})")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section_name!r} must be a mapping, got {values!r}")
    return {name: values for name, values in data.items() if values is not None}


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a TrainConfig from the defaults, then the YAML file at path, then each override."""
    given: dict[str, dict[str, Any]] = {}  # section -> field -> coerced value, as the YAML and --set give them
    for section_name, values in (_read_yaml(path) if path is not None else {}).items():
        for key, value in values.items():
            _set_value(given, f"{section_name}.{key}", value, path)
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"--set {text}: expected section.key=value")
        key, raw = text.split("=", 1)
        _set_value(given, key.strip(), raw, f"--set {text}", text=True)
    # built once every value is known, so that the model resolves d_value from the final d_query
    cfg = TrainConfig(**{name: cls(**{**TRAINING_DEFAULTS.get(name, {}), **given.get(name, {})})
                         for name, cls in _sections().items()})
    cfg.keys_set = {f"{name}.{field_name.rstrip('_')}" for name, values in given.items() for field_name in values}
    _check_consistency(cfg, path or "<defaults>")
    return cfg


def _check_consistency(cfg: TrainConfig, source: str) -> None:
    """Checks of the final values that involve two keys (one value's range is checked as it is set: ALLOWED)."""
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        raise ConfigError(f"{source}: set train.max_steps or train.epochs")
    if cfg.optim.name == "muon" and cfg.train.mixed_precision == "fp16":  # accelerate would scale the loss per optimizer
        raise ConfigError(f"{source}: optim.name=muon trains with train.mixed_precision no, bf16 or auto, not fp16")


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict of the config under its YAML keys (tuples as lists), suitable for YAML."""
    return {name: {key.rstrip("_"): list(value) if isinstance(value, tuple) else value
                   for key, value in section.items()} for name, section in dataclasses.asdict(cfg).items()}


def flatten_config(cfg: TrainConfig) -> dict[str, Any]:
    """Flat {"section.key": value} view with lists as text: hyperparameters as trackers record them
    (TensorBoard's hparams take only numbers, strings, booleans and None)."""
    return {f"{section}.{key}": str(value) if isinstance(value, list) else value
            for section, values in config_to_dict(cfg).items() for key, value in values.items()}


def write_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then os.replace)."""
    with atomic_file(path) as stream:
        stream.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode("utf-8"))
