"""Data parallelism: one mesh axis, "data", over every device; params replicated, batches split.

Nothing else in the project changes with the device count: the train and eval chunks are the
same jitted functions, and XLA inserts the gradient all-reduce because the batch is sharded while
the parameters are replicated. With several processes (`jax.distributed`), every process builds
the same host arrays (the data order is a pure function of seed and epoch) and contributes the
rows its own devices hold.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tinylm_jax.core.config import UserError


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run; call before anything touches a JAX device."""
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must lie in [0, {num_processes - 1}], got {process_id}")
    # CPU devices need an implementation of collectives; accelerators bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120)
    except Exception as err:  # jax raises bare RuntimeErrors and XlaRuntimeErrors here
        raise UserError(f"cannot join the run at {coordinator}: {err}".splitlines()[0]) from None


def is_primary() -> bool:
    """Whether this process writes the run folder's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all, of every process)."""
    available = jax.devices()
    if num_devices is not None and not 1 <= num_devices <= len(available):
        raise UserError(f"--devices must lie in [1, {len(available)}], got {num_devices}")
    if num_devices not in (None, len(available)) and jax.process_count() > 1:
        raise UserError("--devices cannot leave out devices of a multi-process run")
    devices = available[:num_devices]
    # Auto axes: linen's Embed rejects the explicit-sharding default of jax.make_mesh.
    return jax.make_mesh((len(devices),), ("data",), (AxisType.Auto,), devices=devices)


def check_batch_fits(batch_size: int, mesh: Mesh) -> None:
    """Refuse a batch that cannot be split into equal shares, one per device."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise UserError(f"batch_size {batch_size} does not split evenly over {devices} devices; "
                        "pass --devices with a divisor of it")


def _global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` in full on every device of `mesh`."""
    return jax.tree.map(lambda x: _global_array(x, NamedSharding(mesh, P())), tree)


def local_replica(tree: Any) -> Any:
    """This process's first copy of a replicated `tree`: work on it runs on one device, with no
    collective across devices or processes."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def shard_batch_rows(rows: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Chunk rows (C, B) split along the batch axis B over the mesh."""
    sharding = NamedSharding(mesh, P(None, "data"))
    return {key: _global_array(value, sharding) for key, value in rows.items()}
