"""Experiment configuration: one frozen dataclass, read from human-editable TOML files.

An experiment is data, not a code path: `experiments/<name>.toml` sets the fields below that differ
from their defaults (or from the experiment it `extends`), and everything else (model, data,
training loop) reads only this object. The model's modules take it whole (`core.model`).
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
# The values a text field may take; the first of each is the reference's.
CHOICES = {
    "positions": ("sinusoidal", "learned", "rope", "none"),
    "norm": ("rmsnorm", "layernorm"),
    "mlp": ("gelu", "swiglu", "relu2"),
    "schedule": ("plateau", "cosine", "wsd"),
    "optimizer": ("adamw", "muon"),
    "tokenizer": ("bpe", "byte_bpe"),
    "tokenizer_text": ("all", "train"),
}
# Keys that config.json files written by earlier versions use, and their names now.
RENAMED_KEYS = {"positional_encoding": "positions"}


class UserError(Exception):
    """A mistake in the user's input: reported as one line on stderr, exit code 2."""


def reference_only(default: Any) -> Any:
    """A model option whose default is the only value the reference's PyTorch model has: any
    other value is beyond it (`beyond_reference`), and its torch export refuses it."""
    return dataclasses.field(default=default, metadata={"reference_only": True})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "custom"  # label printed in logs and tables (the reference's experiment name)
    # --- data ---
    vocab_size: int = 500  # BPE vocabulary size, special tokens [PAD] and [UNK] included
    seq_len: int = 64  # tokens per training window; also the model's max_seq_len
    train_fraction: float = 0.8  # leading share of the windows used for training; the rest validate
    # The tokenizer: "bpe" (the reference's: BPE over the Whitespace pre-tokenizer, which keeps
    # every character it sees, so vocab_size must exceed the text's distinct characters) or
    # "byte_bpe" (GPT-2's byte-level BPE: any UTF-8 text at any vocab_size of 258 or more).
    tokenizer: str = "bpe"
    # The text the tokenizer learns from: "all" (the reference's: the whole text, validation
    # included) or "train" (the first train_fraction of its characters, so that the validation
    # text does not leak into the vocabulary).
    tokenizer_text: str = "all"
    # Learn the tokenizer from at most this many characters of that text, taken as evenly spaced
    # pieces of about 1 MB cut at line ends (SentencePiece's input_sentence_size); 0: all of it.
    tokenizer_sample: int = 0
    # --- model ---
    d_model: int = 128  # width of the residual stream and of the token embedding
    n_layers: int = 2  # number of pre-norm Transformer blocks
    n_heads: int = 4  # attention heads per block; d_model must divide evenly among them
    d_ff: int = 256  # hidden width of each block's feed-forward network
    # Where each token stands: "sinusoidal" adds the reference's fixed sin/cos table to the token
    # embeddings; "learned" adds a trained (seq_len, d_model) table (GPT-2); "rope" rotates each
    # head's queries and keys by their position (RoFormer, Su et al. 2021); "none" leaves order to
    # the causal mask alone, to measure the reference's claim that positions are essential.
    positions: str = reference_only("sinusoidal")
    rope_base: float = 10000.0  # RoPE's wavelength base (RoFormer's 10,000)
    # Every normalisation of the model: "rmsnorm" (the reference's, Zhang & Sennrich 2019) or
    # "layernorm" (Ba et al. 2016; torch's eps, 1e-5).
    norm: str = reference_only("rmsnorm")
    # RMSNorm each head's queries and keys before their scores (Dehghani et al. 2023).
    qk_norm: bool = reference_only(False)
    # The feed-forward network: "gelu" (the reference's), "swiglu" (Shazeer 2020: two input
    # projections of width d_ff, SiLU-gated) or "relu2" (squared ReLU, So et al. 2021).
    mlp: str = reference_only("gelu")
    # The output head reuses the token embedding, transposed (Press & Wolf 2017).
    tie_embeddings: bool = reference_only(False)
    # The token (and learned position) embeddings start as N(0, embed_init_std²): the reference's
    # 1.0 is PyTorch's nn.Embedding default; a tied head wants a small one (GPT-2's 0.02), or its
    # first logits are the dot products of unit-variance vectors, about sqrt(d_model) apart.
    embed_init_std: float = 1.0
    # Dropout rates while training (off at evaluation); the stream is a pure function of
    # (seed, step), so a resumed run draws the same masks.
    dropout: float = 0.0  # on the embeddings and on each sublayer's output before its residual add
    attention_dropout: float = 0.0  # on the attention weights
    # Weight averaging: validation, checkpoints' best and every analysis use an exponential moving
    # average of the weights (Polyak & Juditsky 1992), updated every step with this decay, which
    # warms up as min(decay, (1 + step) / (10 + step)); 0 turns it off.
    ema_decay: float = 0.0
    # --- optimiser (AdamW with torch's defaults, as the reference) ---
    optimizer: str = "adamw"  # "adamw", or "muon" (Jordan 2024; optax.contrib) for block matrices
    lr: float = 3e-4  # peak learning rate (AdamW's; with muon, of the parameters AdamW keeps)
    muon_lr: float = 0.02  # with muon: the peak learning rate of the blocks' weight matrices
    batch_size: int = 512  # windows per optimiser step
    weight_decay: float = 0.01  # decoupled weight decay, applied to all parameters
    adam_b1: float = 0.9  # AdamW first-moment decay
    adam_b2: float = 0.999  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip_norm: float = 1.0  # gradients are clipped to this global L2 norm before AdamW
    # The reference clipped gradients still multiplied by torch's GradScaler scale, so the true
    # gradient was clipped at grad_clip_norm / scale; these two fields replay that (1 and 0 turn
    # it off). The reference's experiments set 65536 and 2000: `extends` keeps them.
    grad_scale: float = 1.0  # the GradScaler's initial scale (the reference's: 65536)
    grad_scale_growth_interval: int = 0  # steps between its doublings (reference: 2000); 0: never
    # --- learning-rate schedule, stepped per optimiser step ---
    # "plateau": the reference's constant rate, cut by plateau_factor when validation stalls;
    # "cosine": warmup, then cosine decay to lr * lr_floor at the run's last step (Loshchilov &
    # Hutter 2017); "wsd": warmup, constant, then linear decay to lr * lr_floor over the last
    # decay_fraction of the steps (warmup-stable-decay, Hu et al. 2024).
    schedule: str = "plateau"
    warmup_steps: int = 0  # linear warmup from 0 over this many steps (every schedule)
    lr_floor: float = 0.0  # cosine and wsd: the final rate, as a share of lr
    decay_fraction: float = 0.2  # wsd: the share of the run's steps that decay
    # --- protocol ---
    num_epochs: int = 20  # upper bound on training epochs
    early_stop_patience: int = 1  # stop after this many epochs without a strictly better val PPL
    plateau_factor: float = 0.5  # learning rate multiplier when validation loss plateaus
    plateau_patience: int = 1  # bad epochs tolerated before a cut (torch ReduceLROnPlateau's sense)
    plateau_threshold: float = 1e-4  # relative improvement that counts as better (torch 'rel' mode)
    seed: int = 0  # seeds parameter init, the per-epoch shuffling and the dropout stream
    # --- step-based protocol, for corpora far larger than the reference's (0: the reference's) ---
    # An "epoch" of the protocol is the training between two evaluations: one pass over the
    # training windows by default, eval_every optimiser steps when set (Keras's steps_per_epoch).
    # The patience of the plateau and the early stop is counted in these epochs, and history.csv
    # has a row per evaluation.
    max_steps: int = 0  # the budget in optimiser steps (0: num_epochs passes over the windows)
    eval_every: int = 0  # optimiser steps between evaluations (0: one pass over the windows)
    # Validation windows each evaluation reads: a fixed random sample of this many, the same for
    # every run on the corpus (0: all of them, in order, the reference's).
    eval_windows: int = 0
    # Training windows start every train_stride tokens (1: at every token, the reference's;
    # seq_len: windows that do not overlap), so a pass over a large corpus is not thousands of
    # steps of near-duplicate windows.
    train_stride: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return config_from_dict({**self.to_dict(), **changes}, source="overrides")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def beyond_reference(self) -> list[str]:
        """The model options set to what the reference's PyTorch model cannot be, as
        "field = value"."""
        return [f"{field.name} = {getattr(self, field.name)!r}"
                for field in dataclasses.fields(self) if field.metadata.get("reference_only")
                and getattr(self, field.name) != field.default]


_FIELD_TYPES = typing.get_type_hints(ExperimentConfig)
POSITIVE_FIELDS = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                   "batch_size", "num_epochs", "early_stop_patience", "lr", "muon_lr", "adam_eps",
                   "grad_clip_norm", "grad_scale", "rope_base", "embed_init_std", "train_stride")
# (field, smallest allowed value; None: above 0) for fields that must also stay below 1.
FRACTION_FIELDS = (("train_fraction", None), ("plateau_factor", None),
                   ("plateau_threshold", None), ("adam_b1", 0.0), ("adam_b2", None),
                   ("weight_decay", 0.0), ("dropout", 0.0), ("attention_dropout", 0.0),
                   ("ema_decay", 0.0))
SHARE_FIELDS = ("lr_floor", "decay_fraction")  # in [0, 1]
NON_NEGATIVE_FIELDS = ("plateau_patience", "grad_scale_growth_interval", "warmup_steps",
                       "max_steps", "eval_every", "eval_windows", "tokenizer_sample")
MAX_SEED = 2**31 - 1
# Upper bounds far above any model this kit trains: a typo (an extra zero or ten) is refused in one
# line instead of hanging or crashing inside the tokenizer or XLA. Other integers stop at MAX_SEED.
_LARGEST = {"vocab_size": 2**20, "seq_len": 2**16, "d_model": 2**16, "n_layers": 2**10,
            "n_heads": 2**10, "d_ff": 2**18, "batch_size": 2**20}


# A set trains its members one after another, each a full protocol (45 min to hours on a CPU):
# a larger set is a typo such as 0-40000, refused before thousands of folders are checked.
MAX_SEED_SET = 1000


def require_positive(what: str, value: float | None) -> None:
    """Refuse a count or size that is not above 0 (None: not given, nothing to check)."""
    if value is not None and not value > 0:
        raise UserError(f"{what} must be positive, got {value!r}")


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
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: '{key}' must be true or false, got {value!r}")
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


def _check_keys(values: dict[str, Any], source: str, extra: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(values) - set(_FIELD_TYPES) - set(extra))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                        f"valid keys: {', '.join(_FIELD_TYPES)}")


def _check_ranges(cfg: ExperimentConfig, source: str) -> None:
    for key in POSITIVE_FIELDS:
        require_positive(f"{source}: '{key}'", getattr(cfg, key))
    check_seed(cfg.seed, f"{source}: 'seed'")
    for key, kind in _FIELD_TYPES.items():
        largest = _LARGEST.get(key, MAX_SEED)
        if kind is int and getattr(cfg, key) > largest:
            raise UserError(f"{source}: '{key}' must be at most {largest}, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE_FIELDS:
        if getattr(cfg, key) < 0:
            raise UserError(f"{source}: '{key}' must be non-negative, got {getattr(cfg, key)!r}")
    for key, lowest in FRACTION_FIELDS:
        value = getattr(cfg, key)
        if not ((value > 0 if lowest is None else value >= lowest) and value < 1):
            bounds = "(0, 1)" if lowest is None else "[0, 1)"
            raise UserError(f"{source}: '{key}' must lie in {bounds}, got {value!r}")
    for key in SHARE_FIELDS:
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"{source}: '{key}' must lie in [0, 1], got {getattr(cfg, key)!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(allowed)}, "
                            f"got {getattr(cfg, key)!r}")


def _check_shapes(cfg: ExperimentConfig, source: str) -> None:
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"{source}: d_model ({cfg.d_model}) must be divisible by "
                        f"n_heads ({cfg.n_heads})")
    if cfg.positions == "sinusoidal" and cfg.d_model % 2:
        raise UserError(f"{source}: d_model ({cfg.d_model}) must be even for the sinusoidal "
                        "positions")
    if cfg.positions == "rope" and (cfg.d_model // cfg.n_heads) % 2:
        raise UserError(f"{source}: the head width d_model / n_heads "
                        f"({cfg.d_model // cfg.n_heads}) must be even for positions = 'rope'")
    if cfg.vocab_size < 3:
        raise UserError(f"{source}: 'vocab_size' must be at least 3 (two special tokens + one)")


def config_from_dict(values: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate `values` (unknown keys, types, ranges) and build the config."""
    values = {RENAMED_KEYS.get(key, key): value for key, value in values.items()}
    _check_keys(values, source)
    checked = {key: _check_type(key, value, source) for key, value in values.items()}
    cfg = ExperimentConfig(**checked)
    _check_ranges(cfg, source)
    _check_shapes(cfg, source)
    return cfg


def experiment_names() -> list[str]:
    """Every experiment that can be named: the files of ./experiments and the package's."""
    found = {path.stem for folder in _experiment_dirs() for path in folder.glob("*.toml")}
    return [*EXPERIMENT_NAMES, *sorted(found - set(EXPERIMENT_NAMES))]


def _experiment_dirs() -> list[Path]:
    """Where a name is looked up: the package's experiments first (the reference's names always
    mean the reference's), then the user's ./experiments."""
    return [EXPERIMENTS_DIR, Path("experiments")]


def experiment_path(name_or_path: str, base: Path | None = None) -> Path:
    """The TOML file of an experiment's name, or a path (relative to `base` if given)."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        return path if base is None or path.is_absolute() else base / path
    if re.fullmatch(r"[\w.-]+", name_or_path, re.ASCII) and not name_or_path.startswith("."):
        for folder in _experiment_dirs():
            if (folder / f"{name_or_path}.toml").is_file():
                return folder / f"{name_or_path}.toml"
    others = [name for name in experiment_names() if name not in EXPERIMENT_NAMES]
    raise UserError(f"unknown experiment '{name_or_path}'; choose one of "
                    f"{', '.join(EXPERIMENT_NAMES)} (the reference's), "
                    + (f"{', '.join(others)}, " if others else "")
                    + "all, or a path to a .toml file")


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such experiment file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read experiment file ({err.strerror})") from None


def _resolved_values(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's values over those of the experiment it `extends`, recursively. A file that
    extends another and names itself nothing is named after its file."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise UserError(f"{path}: 'extends' goes round in a circle ({chain})")
    values = {RENAMED_KEYS.get(key, key): value for key, value in _read_toml(path).items()}
    _check_keys(values, str(path), extra=("extends",))
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: 'extends' must be an experiment's name or a .toml path, "
                        f"got {parent!r}")
    try:
        base = _resolved_values(experiment_path(parent, path.parent), (*seen, path.resolve()))
    except UserError as err:
        raise UserError(f"{path}: extends {parent!r}: {err}") from None
    return {**base, "name": path.stem, **values}


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None,
                overrides_source: str = "overrides") -> ExperimentConfig:
    """An experiment by name (`baseline`, any `experiments/*.toml`) or a path to a TOML file,
    with `overrides` (field: value) on top; a bad override is named as `overrides_source`'s."""
    path = experiment_path(name_or_path)
    cfg = config_from_dict(_resolved_values(path), source=str(path))
    if not overrides:
        return cfg
    return config_from_dict({**cfg.to_dict(), **overrides}, source=overrides_source)


def parse_value(text: str) -> Any:
    """A value as typed on a command line, read as TOML reads it (1e-3, 64, true, "x"); a bare
    word that TOML cannot read (rope) is the string itself."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str, flag: str = "--set") -> tuple[str, Any]:
    """`key=value` from the command line: (the field, its value, typed by `parse_value`)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        raise UserError(f"{flag}: '{text}' is not of the form key=value (e.g. lr=1e-3)")
    _check_keys({key: None}, flag)
    return key, parse_value(value.strip())
