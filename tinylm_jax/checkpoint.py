"""orbax checkpoints of a run: the latest and the best (lowest validation loss) are both kept.

A checkpoint is saved at the end of every epoch, under step number = epoch. It holds the train
state's arrays (params, optimiser and plateau state, step) and a JSON record of the run so far.
`load_run` is the one call that restores a finished run's best (or latest) params for analysis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy
from tokenizers import Tokenizer

from tinylm_jax.config import ExperimentConfig, UserError, config_from_dict
from tinylm_jax.model import TinyTransformerLM, build_model
from tinylm_jax.train import TrainState, compute_dtype, create_train_state


def _ranked_loss(metrics: dict[str, float]) -> float:
    """Validation loss for ranking; a non-finite loss ranks last, so it is never the best."""
    loss = metrics["val_loss"]
    return loss if math.isfinite(loss) else math.inf


def _arrays(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state,
            "plateau_state": state.plateau_state, "step": state.step}


class RunCheckpoints:
    """The checkpoints folder of one run folder."""

    def __init__(self, run_dir: Path, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            best_fn=_ranked_loss,
            best_mode="min",
            # max_to_keep with best_fn can evict the latest; this keeps both explicitly.
            preservation_policy=policy.AnyPreservationPolicy([
                policy.LatestN(n=1),
                policy.BestN(get_metric_fn=_ranked_loss, reverse=True, n=1),
            ]),
            enable_async_checkpointing=False,
            # Reading touches nothing. (orbax's own read_only flag warns on every use.)
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints",
                                             options=options)

    def save(self, epoch: int, state: TrainState, record: dict[str, Any], val_loss: float) -> None:
        self.manager.save(epoch, metrics={"val_loss": float(val_loss)}, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def best_epoch(self) -> int | None:
        return self.manager.best_step()

    def restore(self, epoch: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `epoch` (shaped like `template`) and its JSON record."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(template))
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        return template.replace(**restored["state"]), restored["record"]

    def close(self) -> None:
        self.manager.close()


@dataclass
class LoadedRun:
    """A finished (or interrupted) run, ready for analysis."""

    config: ExperimentConfig
    model: TinyTransformerLM
    params: Any
    tokenizer: Tokenizer
    epoch: int  # the epoch whose checkpoint `params` came from
    record: dict[str, Any]


def read_run_record(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """A run folder's config.json: the experiment config, and the whole record beside it."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        values = record["experiment"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable run config ({err!r})") from None
    return config_from_dict(values, source=str(path)), record


def read_run_tokenizer(run_dir: Path) -> Tokenizer:
    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: run folder has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path}: unreadable tokenizer ({err})") from None


def load_run(run_dir: str | Path, which: str = "best", precision: str = "fp32") -> LoadedRun:
    """Restore a run's `best` or `latest` params, with its config, model and tokenizer."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    run_dir = Path(run_dir)
    cfg, _ = read_run_record(run_dir)
    checkpoints = RunCheckpoints(run_dir, read_only=True)
    try:
        epoch = checkpoints.best_epoch() if which == "best" else checkpoints.latest_epoch()
        if epoch is None:
            raise UserError(f"{run_dir}: no checkpoint to load")
        state, record = checkpoints.restore(epoch, create_train_state(cfg, precision))
    finally:
        checkpoints.close()
    tokenizer = read_run_tokenizer(run_dir)
    return LoadedRun(cfg, build_model(cfg, compute_dtype(precision)), state.params, tokenizer,
                     epoch, record)

