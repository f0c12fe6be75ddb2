"""One process of a 2-process x 4-CPU-device JAX job on localhost, run by tests/test_multiprocess.py.

Usage: ``python tests/multiprocess_worker.py MODE PROCESS_ID NUM_PROCESSES PORT OUT_DIR [VICTIM]``

- ``parity``: ``sequence_parallel_attention`` (ring and Ulysses; causal, zig-zag, grouped
  queries) over the 8 devices of both processes, forward and gradients; each process compares
  the shards it holds with ``jattn.dot_product_attention`` computed on its own first device
  and writes ``OUT_DIR/parity_<id>.json``.
- ``trainer`` (also run by ``parity``, in the same processes): the toy trainer's jitted
  training step (configs/tiny.py with ``TOY_OVERRIDES``, the config of the ``train_toy.py``
  runs of tests/test_multiprocess.py) on a 2 (data) x 4 (sequence) mesh whose every row has
  2 devices in each process, so the ring crosses the process boundary, against the same
  steps on one local device; writes ``OUT_DIR/trainer_<id>.json`` with both processes'
  per-step losses and the overrides.
- ``die``: steps of ring attention across both processes in a loop; process VICTIM kills
  itself (SIGKILL, no goodbye) before step 2 and writes the time to ``OUT_DIR/died_at``; the
  other must fail with an error, not hang (it writes ``OUT_DIR/die_<id>.json`` if a step
  raises in Python; the distributed runtime may instead abort it with a fatal log line).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

MODE, PID, NPROC, PORT, OUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
VICTIM = int(sys.argv[6]) if len(sys.argv) > 6 else 1
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", num_processes=NPROC, process_id=PID,
    initialization_timeout=60, heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10,
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from jattn.parallel import ring  # noqa: E402


def global_array(x: np.ndarray, mesh, spec):
    """A jax.Array over every process's devices, each process filling its own shards from ``x``."""
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def max_shard_error(arr, ref: np.ndarray) -> float:
    """Largest |arr - ref| over the shards this process holds."""
    return max(float(np.max(np.abs(np.asarray(s.data) - ref[s.index]))) for s in arr.addressable_shards)


def parity():
    mesh = jax.make_mesh((8,), ("s",))
    B, T, N, K, H = 2, 32, 8, 2, 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k, v = (rng.standard_normal((B, T, K, H), np.float32) for _ in range(2))
    w = rng.standard_normal((B, T, N, H), np.float32)  # output cotangent
    layout = "zigzag"
    perm = np.asarray(ring.layout_positions(T, 8, layout))  # permuted row order

    # Reference: one device of this process, original order, then permuted like the ring rows.
    def ref_loss(q, k, v):
        return jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=True) * w)

    local = jax.local_devices()[0]
    with jax.default_device(local):
        ref_out = np.asarray(jattn.dot_product_attention(q, k, v, is_causal=True))[:, perm]
        ref_grads = [np.asarray(g)[:, perm] for g in jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)]

    rows = P(None, "s")
    args = [global_array(x[:, perm], mesh, rows) for x in (q, k, v)]
    w_g = global_array(w[:, perm], mesh, rows)
    result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
              "local_devices": jax.local_device_count()}
    for strategy in ("ring", "ulysses"):
        def attend(q, k, v):
            return jattn.sequence_parallel_attention(
                q, k, v, mesh=mesh, axis_name="s", layout=layout, is_causal=True, strategy=strategy)

        def forward_and_grads(q, k, v, w):
            out, pullback = jax.vjp(attend, q, k, v)
            return out, pullback(w)

        with jax.set_mesh(mesh):
            out, grads = jax.jit(forward_and_grads)(*args, w_g)
        result[strategy] = {
            "forward": max_shard_error(out, ref_out),
            "grads": [max_shard_error(g, r) for g, r in zip(grads, ref_grads)],
            "shards_here": len(out.addressable_shards),
        }
    with open(os.path.join(OUT, f"parity_{PID}.json"), "w") as f:
        json.dump(result, f)


# configs/tiny.py fields that the trainer tests of tests/test_multiprocess.py override.
TOY_OVERRIDES = {"num_train_steps": 4, "warmup_steps": 2, "batch_size": 8, "num_layers": 1}


def trainer():
    import runpy

    from jattn.toy import mesh as mesh_lib, train

    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))["get_config"]()
    config.update(TOY_OVERRIDES)

    def losses(data_size, sequence_size, devices):
        config.mesh.data, config.mesh.sequence = data_size, sequence_size
        mesh = mesh_lib.make_mesh(config.mesh, config.batch_size, devices=devices)
        graphdef, state = train.create_train_state(config, mesh)
        steps = train.jit_steps(config, graphdef, mesh)
        out = []
        for step in range(config.num_train_steps):
            state, metrics = steps.train_step(state, steps.train_batch(step))
            out.append(float(np.asarray(metrics["loss"].addressable_data(0))))  # replicated
        return out, [sorted(d.process_index for d in row) for row in mesh.devices]

    d = jax.devices()  # process 0 holds 0-3, process 1 holds 4-7: rows of 2 + 2
    crossing = [d[0], d[1], d[4], d[5], d[2], d[3], d[6], d[7]]
    two, rows = losses(2, 4, crossing)
    one, _ = losses(1, 1, jax.local_devices()[:1])
    with open(os.path.join(OUT, f"trainer_{PID}.json"), "w") as f:
        json.dump({"two_processes": two, "one_device": one, "row_processes": rows, "config": TOY_OVERRIDES}, f)


def die():
    mesh = jax.make_mesh((8,), ("s",))
    x = np.ones((1, 64, 2, 8), np.float32)
    arr = global_array(x, mesh, P(None, "s"))
    with jax.set_mesh(mesh):
        step = jax.jit(lambda a: jattn.sequence_parallel_attention(a, a, a, mesh=mesh, axis_name="s") * 0.5 + 0.5)
    for i in range(1000):
        if PID == VICTIM and i == 2:
            with open(os.path.join(OUT, "died_at"), "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            with jax.set_mesh(mesh):
                arr = step(arr)
                arr.block_until_ready()
        except Exception as e:  # the surviving process reports what the runtime said
            with open(os.path.join(OUT, f"die_{PID}.json"), "w") as f:
                json.dump({"step": i, "time": time.time(), "error": f"{type(e).__name__}: {e}"[:2000]}, f)
            print(f"process {PID}: step {i} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.exit(3)


if __name__ == "__main__":
    {"parity": lambda: (parity(), trainer()), "trainer": trainer, "die": die}[MODE]()
