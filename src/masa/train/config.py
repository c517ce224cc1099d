"""Training run configuration: TOML sections `[model]`, `[data]`, `[train]` checked into dataclasses.

Every key is checked against its dataclass (unknown keys and wrong types raise `ConfigError` naming the
section and the valid keys); values are then validated in each dataclass's `__post_init__`.
Command-line overrides (`train.max_steps=20`) are applied to the raw tables before any checking.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masa.data.tokenizer import TOKENIZER_KINDS
from masa.model import MasaLMConfig
from masa.train.groups import check_multipliers

DTYPES = ("float32", "bfloat16")
PARALLEL = ("ddp", "fsdp")  # under torchrun: replicate the model (DDP) or shard it (FSDP2)
FILLED_MODEL_KEYS = ("vocab_size",)  # set from the tokenizer, never by the user


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what to do."""


@dataclass
class DataConfig:
    """Which text to train on, how to hold out validation text, and how to tokenise it."""

    train: list[str] = field(default_factory=list)  # files or globs relative to data_dir
    valid_files: list[str] = field(default_factory=list)  # whole files held out (never trained on)
    valid_fraction: float = 0.05  # last fraction of each training file held out for validation
    tokenizer: str = "bpe"  # "bpe" (byte-level) or "char"
    vocab_size: int = 8192  # BPE vocabulary size; ignored by "char"
    seq_len: int = 256  # tokens per training window
    data_dir: str = ""  # "" = the repository's data/ folder
    cache_dir: str = ""  # "" = the repository's .cache/masa/ folder

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train is empty: list training files or globs, e.g. ['gutenberg/*.txt']")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(
                f"data.tokenizer {self.tokenizer!r} is unknown: use one of {', '.join(TOKENIZER_KINDS)}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction {self.valid_fraction} must lie in [0, 1), e.g. 0.05")
        if self.valid_fraction == 0.0 and not self.valid_files:
            raise ConfigError(
                "nothing is held out for validation: set data.valid_fraction > 0 or data.valid_files"
            )
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len {self.seq_len} must be >= 1")


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing and hardware settings."""

    batch_size: int = 16  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; when > 0 it wins over token_budget
    token_budget: int = 0  # training tokens; steps = ceil(budget / tokens per step)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_fraction: float = 0.1  # fraction of steps of linear warmup (the paper's 10 %)
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms, biases, coefficients)
    lr_mult: dict[str, float] = field(default_factory=dict)  # kind -> lr multiplier, e.g. {atoms = 2.0}
    wd_mult: dict[str, float] = field(default_factory=dict)  # kind -> decay multiplier (see train.groups)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100  # steps between held-out evaluations (and at the end)
    eval_batches: int = 20  # held-out batches per evaluation
    log_every: int = 10  # steps between metric log lines
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # autocast dtype: "float32" or "bfloat16"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded; needs torchrun)
    compile: bool = False  # torch.compile the model (each block with its shared-atom combine): GPU runs

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.token_budget < 0 or self.max_steps == self.token_budget == 0:
            raise ConfigError(
                "set train.max_steps or train.token_budget to a positive number (max_steps wins)"
            )
        positive = ("batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} is {getattr(self, name)}: it must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every must be >= 0 (0 saves only at the end)")
        if not 0.0 < self.min_lr <= self.lr:
            raise ConfigError(f"need 0 < train.min_lr <= train.lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction {self.warmup_fraction} must lie in [0, 1), e.g. 0.1")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas {self.betas} must lie in [0, 1), e.g. [0.9, 0.999]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        try:
            check_multipliers("lr_mult", self.lr_mult)
            check_multipliers("wd_mult", self.wd_mult)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.parallel not in PARALLEL:
            raise ConfigError(
                f"train.parallel {self.parallel!r} is unknown: use one of {', '.join(PARALLEL)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype {self.dtype!r} is unsupported: use one of {', '.join(DTYPES)}")


@dataclass
class TrainRunConfig:
    """A whole training run: the `[model]` table (MasaLMConfig fields) and the data and train sections."""

    model: dict[str, Any]
    data: DataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        for key in FILLED_MODEL_KEYS:
            if key in self.model:
                raise ConfigError(
                    f"model.{key} is set from the tokenizer: remove it (set data.vocab_size instead)"
                )
        self.model = _checked(MasaLMConfig, "model", self.model, exclude=FILLED_MODEL_KEYS)
        max_len = self.model.get("max_seq_len", self.data.seq_len)
        if max_len < self.data.seq_len:
            raise ConfigError(
                f"model.max_seq_len {max_len} is below data.seq_len {self.data.seq_len}: raise it"
            )
        placeholder = self.data.vocab_size if self.data.tokenizer == "bpe" else 256
        try:
            self.model_config(placeholder)  # surface value errors now, not after tokenizer training
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[model]: {err}") from err

    def model_config(self, vocab_size: int) -> MasaLMConfig:
        """The model's configuration, with the tokenizer's vocabulary size and max_seq_len >= seq_len."""
        values = {"max_seq_len": self.data.seq_len, **self.model, "vocab_size": vocab_size}
        return MasaLMConfig(**values)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainRunConfig:
        """Build from plain tables `{"model": {...}, "data": {...}, "train": {...}}`."""
        sections = ("model", "data", "train")
        for name, table in raw.items():
            if name not in sections:
                raise ConfigError(f"unknown section [{name}]: valid sections are {', '.join(sections)}")
            if not isinstance(table, dict):
                raise ConfigError(f"[{name}] must be a table, got {type(table).__name__}")
        return cls(
            model=dict(raw.get("model", {})),
            data=DataConfig(**_checked(DataConfig, "data", raw.get("data", {}))),
            train=TrainConfig(**_checked(TrainConfig, "train", raw.get("train", {}))),
        )

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainRunConfig:
        """Read a TOML file, apply `section.key=value` overrides, check and validate."""
        return cls.from_dict(apply_overrides(read_toml(path), overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain tables (TOML/JSON-ready) that `from_dict` turns back into an equal config."""
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data), "train": _plain(self.train)}


def _plain(obj: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def _parse_value(text: str) -> Any:
    """A TOML literal (`20`, `1e-3`, `true`, `["a.txt"]`, `"x"`), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_toml(path: str | Path) -> dict[str, Any]:
    """A run config file's tables; a missing file or bad TOML is a ConfigError saying so."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} not found: pass a .toml path or a preset name") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each `section.key=value` override applied (value parsed as TOML).

    A dotted key sets one entry of a sub-table: `train.lr_mult.atoms=2`.
    """
    raw = {name: dict(table) if isinstance(table, dict) else table for name, table in raw.items()}
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value, e.g. train.max_steps=20"
            )
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {item!r}: [{section}] is not a table")
        key, dot, entry = key.strip().partition(".")
        if dot:
            sub = table.get(key, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"override {item!r}: {section}.{key} is not a table")
            table[key] = sub = dict(sub)
            table, key = sub, entry
        table[key] = _parse_value(text.strip())
    return raw


def _checked(cls: type, section: str, table: dict[str, Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """`table` with keys checked against the dataclass `cls` and values coerced to the field types."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    out = {}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in [{section}]: valid keys are {', '.join(valid)}")
        out[key] = _coerce(value, hints[key], f"{section}.{key}")
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (int accepted for float, list for tuple); ConfigError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
    elif tp is bool or tp is str or tp is int:
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif origin is tuple and isinstance(value, (list, tuple)):
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) == len(value):
            return tuple(
                _coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, kinds, strict=True))
            )
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is None and not isinstance(tp, type):
        return value  # an annotation this checker does not know: leave it to __post_init__
    elif origin is None and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
