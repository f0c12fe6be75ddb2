"""The trainer as several JAX processes (``jax.distributed``): start-up, roles and agreement.

Every process runs the same ``train_toy.py`` with the same flags and config (plus its own
``--process_id``), and all of them take part in every jitted step, orbax save and restore.
Process 0 (the primary) alone writes the files that are not checkpoint shards
(``config.json``, ``metrics.jsonl``, ``summary.json``, the plots, the checkpoint manifests)
and alone renames or deletes checkpoints (rotation, damaged ones set aside); the others wait
at a barrier meanwhile. Decisions that each process makes from what it reads (is this
checkpoint intact? may this workdir be used?) are agreed with ``failed_processes`` so that
every process takes the same branch: one process that cannot continue stops them all with
an error, never a hang. With one process every function here is a no-op.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from jattn.toy.errors import TrainerError


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` (arguments None: detected on Cloud TPU, SLURM, Open MPI);
    on CPU the cross-process collectives use gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """Whether this process writes the shared files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (the same name in every process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jattn-toy:{name}")


def gather(code: int) -> list[int]:
    """Every process's ``code``, by process index (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [code]
    return np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1).tolist()  # [processes]


def failed_processes(ok: bool) -> list[int]:
    """Indices of the processes that passed ``ok=False`` (a collective: every process calls it)."""
    return [i for i, code in enumerate(gather(int(ok))) if not code]


def everywhere(what: str, fn, *args):
    """``fn(*args)`` in every process; a ``TrainerError`` in any of them is raised in all.

    The process that failed raises its own error; the others raise one naming it and ``what``.
    """
    error = None
    try:
        result = fn(*args)
    except TrainerError as e:
        error = e
    failed = failed_processes(error is None)
    if error is not None:
        raise error
    if failed:
        raise TrainerError(f"{what} failed in process(es) {failed} (their output says why); stopping this "
                           f"process {jax.process_index()} too")
    return result


def same_everywhere(what: str, value: list[int]) -> None:
    """Raise ``TrainerError`` unless every process passes the same list of ints (``what`` names it)."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(np.asarray(value, np.int64).tobytes()).digest()
    h = np.frombuffer(digest[:8], np.int64)[0]
    seen = np.asarray(multihost_utils.process_allgather(h)).reshape(-1)
    if len(set(seen.tolist())) != 1:
        raise TrainerError(f"the processes see different {what} (process {jax.process_index()} sees {value}); "
                           "every process must see the same --workdir (a shared filesystem)")


def global_array(x: np.ndarray, sharding) -> jax.Array:
    """A ``jax.Array`` with ``sharding`` from the same host array ``x`` in every process (each
    process fills the shards on its own devices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
