"""tinylm_jax: the reference report's tiny Transformer language model in JAX/Flax.

The API, typed, and imported on first use (so `import tinylm_jax` loads no jax):

    load_config(name_or_path, overrides) -> ExperimentConfig
                                    baseline, medium, wider, any experiments/*.toml, or a path
    train(config_or_name, out_dir, **overrides) -> Run  the protocol, as `tinylm train` runs it
    train_seeds(config_or_name, out_dir, seeds, **overrides) -> list[Run]
    sweep(config_or_name, out_dir, grid, seeds, ablation, **overrides) -> list[Run]
                                    every combination of `grid` ({field: [values]}) x seeds,
                                    or each change of `ablation` ([{field: value}]) alone
    load_run(path) -> Run                               config, history, summary, params
    evaluate_run(run_dir, data, which) -> Evaluation    perplexity, nats per token and per char
    create_train_state(cfg, precision, platform, total_steps, products) -> TrainState
    train_step(state, batch) -> (state, metrics)        jitted; the state is donated
    eval_step(state, batch) -> metrics
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinylm_jax.analysis.evaluation import evaluate_run
    from tinylm_jax.api.runs import Run, load_run, train, train_seeds
    from tinylm_jax.api.sweep import sweep
    from tinylm_jax.core.config import ExperimentConfig, UserError, load_config
    from tinylm_jax.core.train import TrainState, create_train_state, eval_step, train_step

_HOMES = {
    "load_config": "tinylm_jax.core.config", "ExperimentConfig": "tinylm_jax.core.config",
    "UserError": "tinylm_jax.core.config",
    "train": "tinylm_jax.api.runs", "train_seeds": "tinylm_jax.api.runs",
    "load_run": "tinylm_jax.api.runs", "Run": "tinylm_jax.api.runs",
    "sweep": "tinylm_jax.api.sweep", "evaluate_run": "tinylm_jax.analysis.evaluation",
    "create_train_state": "tinylm_jax.core.train", "train_step": "tinylm_jax.core.train",
    "eval_step": "tinylm_jax.core.train", "TrainState": "tinylm_jax.core.train",
}
__all__ = ["ExperimentConfig", "Run", "TrainState", "UserError", "create_train_state",
           "eval_step", "evaluate_run", "load_config", "load_run", "sweep", "train",
           "train_seeds", "train_step"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tinylm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
