"""Experiment configuration: one frozen dataclass, read from human-editable TOML files.

An experiment is data, not a code path: `experiments/<name>.toml` sets the fields below that differ
from their defaults, and everything else (model, data, training loop) reads only this object.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

# The package's experiments (the repository's experiments/, linked into the package and carried
# by its wheel), wherever the package is installed.
EXPERIMENTS_DIR = Path(str(importlib.resources.files("tinylm_jax") / "experiments"))
# The three experiments of the reference report, in the order `all` runs them.
EXPERIMENT_NAMES = ("baseline", "medium", "wider")
POSITIONAL_ENCODINGS = ("sinusoidal", "none")


class UserError(Exception):
    """A mistake in the user's input: reported as one line on stderr, exit code 2."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "custom"  # label printed in logs and tables (the reference's experiment name)
    # --- data ---
    vocab_size: int = 500  # BPE vocabulary size, special tokens [PAD] and [UNK] included
    seq_len: int = 64  # tokens per training window; also the model's max_seq_len
    train_fraction: float = 0.8  # leading share of the windows used for training; the rest validate
    # --- model ---
    d_model: int = 128  # width of the residual stream and of the token embedding
    n_layers: int = 2  # number of pre-norm Transformer blocks
    n_heads: int = 4  # attention heads per block; d_model must divide evenly among them
    d_ff: int = 256  # hidden width of each block's feed-forward network
    # What tells the model where each token stands: "sinusoidal" adds the reference's fixed sin/cos
    # table to the token embeddings; "none" leaves them as they are (only the causal mask then
    # carries order), to measure the reference's claim that positions are essential.
    positional_encoding: str = "sinusoidal"
    # --- optimiser (AdamW with torch's defaults, as the reference) ---
    lr: float = 3e-4  # initial learning rate
    batch_size: int = 512  # windows per optimiser step
    weight_decay: float = 0.01  # decoupled weight decay, applied to all parameters
    adam_b1: float = 0.9  # AdamW first-moment decay
    adam_b2: float = 0.999  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip_norm: float = 1.0  # gradients are clipped to this global L2 norm before AdamW
    # The reference clipped gradients still multiplied by torch's GradScaler scale, so the true
    # gradient was clipped at grad_clip_norm / scale; these two fields replay that (1 and 0 turn
    # it off).
    grad_scale: float = 1.0  # the GradScaler's initial scale (the reference's: 65536)
    grad_scale_growth_interval: int = 0  # steps between its doublings (reference: 2000); 0: never
    # --- protocol ---
    num_epochs: int = 20  # upper bound on training epochs
    early_stop_patience: int = 1  # stop after this many epochs without a strictly better val PPL
    plateau_factor: float = 0.5  # learning rate multiplier when validation loss plateaus
    plateau_patience: int = 1  # bad epochs tolerated before a cut (torch ReduceLROnPlateau's sense)
    plateau_threshold: float = 1e-4  # relative improvement that counts as better (torch 'rel' mode)
    seed: int = 0  # seeds parameter init and the per-epoch shuffling of training windows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return config_from_dict({**self.to_dict(), **changes}, source="overrides")


_FIELD_TYPES = typing.get_type_hints(ExperimentConfig)
POSITIVE_FIELDS = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                   "batch_size", "num_epochs", "early_stop_patience", "lr", "adam_eps",
                   "grad_clip_norm", "grad_scale")
# (field, smallest allowed value; None: above 0) for fields that must also stay below 1.
FRACTION_FIELDS = (("train_fraction", None), ("plateau_factor", None),
                   ("plateau_threshold", None), ("adam_b1", 0.0), ("adam_b2", None),
                   ("weight_decay", 0.0))
MAX_SEED = 2**31 - 1
# Upper bounds far above any model this kit trains: a typo (an extra zero or ten) is refused in one
# line instead of hanging or crashing inside the tokenizer or XLA. Other integers stop at MAX_SEED.
_LARGEST = {"vocab_size": 2**20, "seq_len": 2**16, "d_model": 2**16, "n_layers": 2**10,
            "n_heads": 2**10, "d_ff": 2**18, "batch_size": 2**20}


# A set trains its members one after another, each a full protocol (45 min to hours on a CPU):
# a larger set is a typo such as 0-40000, refused before thousands of folders are checked.
MAX_SEED_SET = 1000


def check_seed(seed: int, what: str) -> None:
    """Refuse a seed outside [0, MAX_SEED] (numpy's and JAX's seeds alike); `what` names it."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{what} must lie in [0, {MAX_SEED}], got {seed!r}")


def parse_seeds(spec: str) -> list[int]:
    """The random seeds of a set of runs: "0-4", "0,2,7" or "1-3,9", in the order given. Each
    is checked like `--seed`; a malformed spec, an empty range or a repeat is refused."""
    seeds: list[int] = []
    for part in spec.split(","):
        bounds = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part, re.ASCII)
        if bounds is None:
            raise UserError(f"--seeds: '{spec}' is not a list of seeds such as 0-4 or 0,2,7")
        first = int(bounds[1])
        last = first if bounds[2] is None else int(bounds[2])
        for bound in (first, last):  # before the range is expanded, so 0-3000000000 is quick
            check_seed(bound, "--seeds")
        if last < first:
            raise UserError(f"--seeds: the range {part.strip()} is empty")
        repeats = [seed for seed in seeds if first <= seed <= last]
        if repeats:
            raise UserError(f"--seeds: seed {repeats[0]} is given twice")
        if len(seeds) + last - first + 1 > MAX_SEED_SET:
            raise UserError(f"--seeds: '{spec}' asks for more than {MAX_SEED_SET:,} runs")
        seeds += range(first, last + 1)
    return seeds


def _check_type(key: str, value: Any, source: str) -> Any:
    kind = _FIELD_TYPES[key]
    if kind is str:
        if not isinstance(value, str) or not value:
            raise UserError(f"{source}: '{key}' must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{source}: '{key}' must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise UserError(f"{source}: '{key}' must be an integer, got {value!r}")
            value = int(value)
        return value
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{source}: '{key}' must be finite, got {value!r}")
    return value


def config_from_dict(values: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate `values` (unknown keys, types, ranges) and build the config."""
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                        f"valid keys: {', '.join(_FIELD_TYPES)}")
    checked = {key: _check_type(key, value, source) for key, value in values.items()}
    cfg = ExperimentConfig(**checked)
    for key in POSITIVE_FIELDS:
        if getattr(cfg, key) <= 0:
            raise UserError(f"{source}: '{key}' must be positive, got {getattr(cfg, key)!r}")
    check_seed(cfg.seed, f"{source}: 'seed'")
    for key, kind in _FIELD_TYPES.items():
        largest = _LARGEST.get(key, MAX_SEED)
        if kind is int and getattr(cfg, key) > largest:
            raise UserError(f"{source}: '{key}' must be at most {largest}, got {getattr(cfg, key)}")
    for key in ("plateau_patience", "grad_scale_growth_interval"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{source}: '{key}' must be non-negative, got {getattr(cfg, key)!r}")
    for key, lowest in FRACTION_FIELDS:
        value = getattr(cfg, key)
        if not ((value > 0 if lowest is None else value >= lowest) and value < 1):
            bounds = "(0, 1)" if lowest is None else "[0, 1)"
            raise UserError(f"{source}: '{key}' must lie in {bounds}, got {value!r}")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"{source}: d_model ({cfg.d_model}) must be divisible by "
                        f"n_heads ({cfg.n_heads})")
    if cfg.positional_encoding not in POSITIONAL_ENCODINGS:
        raise UserError(f"{source}: 'positional_encoding' must be one of "
                        f"{', '.join(POSITIONAL_ENCODINGS)}, got {cfg.positional_encoding!r}")
    if cfg.positional_encoding == "sinusoidal" and cfg.d_model % 2:
        raise UserError(f"{source}: d_model ({cfg.d_model}) must be even for the sinusoidal "
                        "positions")
    if cfg.vocab_size < 3:
        raise UserError(f"{source}: 'vocab_size' must be at least 3 (two special tokens + one)")
    return cfg


def load_config(name_or_path: str) -> ExperimentConfig:
    """An experiment by name (`baseline`, `medium`, `wider`) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if name_or_path not in EXPERIMENT_NAMES:
            raise UserError(f"unknown experiment '{name_or_path}'; choose one of "
                            f"{', '.join(EXPERIMENT_NAMES)}, all, or a path to a .toml file")
        path = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"{path}: no such experiment file")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read experiment file ({err.strerror})") from None
    return config_from_dict(values, source=str(path))
