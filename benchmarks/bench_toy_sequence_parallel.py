"""Toy-trainer step time: data parallel vs data x sequence parallel on simulated CPU devices.

For each mesh (data x sequence) of the same ``--devices`` simulated CPU devices: the compile
time of the train step, the median wall time of one jitted train step over ``--steps`` steps,
the padded model input length each device sees, the number of collective-permute ops in the
compiled step, and the loss after the last step (all meshes must agree).

Simulated devices (``--xla_force_host_platform_device_count``) share the host's CPU cores,
so this measures overhead (ring hops, padding, extra collectives), NOT a speed-up; real
sequence parallelism pays off on separate accelerators with long sequences.

    python benchmarks/bench_toy_sequence_parallel.py                  # configs/tiny.py, 8 devices
    python benchmarks/bench_toy_sequence_parallel.py --seq_len=64     # T = 129 model positions
"""

from __future__ import annotations

import argparse
import os
import runpy
import statistics
import sys
import time

_ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ARGS.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
_ARGS.add_argument("--devices", type=int, default=8)
_ARGS.add_argument("--seq_len", type=int, default=None, help="override config.seq_len")
_ARGS.add_argument("--batch_size", type=int, default=16)
_ARGS.add_argument("--steps", type=int, default=10)
ARGS = _ARGS.parse_args()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
)

import jax  # noqa: E402

from jattn.toy import mesh as mesh_lib, train  # noqa: E402


def measure(config, data_size: int, sequence_size: int) -> dict:
    config.mesh.data, config.mesh.sequence = data_size, sequence_size
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    steps = train.jit_steps(config, graphdef, mesh)
    batch = steps.train_batch(0)
    start = time.perf_counter()
    compiled = steps.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for step in range(ARGS.steps):
        batch = steps.train_batch(step)
        jax.block_until_ready(batch)
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "mesh": f"{data_size} x {sequence_size}",
        "T": batch.inputs.shape[1],
        "compile_s": compile_s,
        "step_ms": 1e3 * statistics.median(times[1:] or times),
        "permutes": compiled.as_text().count("collective-permute"),
        "loss": float(metrics["loss"]),
    }


def main():
    config = runpy.run_path(ARGS.config)["get_config"]()
    if ARGS.seq_len is not None:
        config.seq_len = ARGS.seq_len
    config.batch_size = ARGS.batch_size
    n = ARGS.devices
    meshes = [(1, 1), (n, 1)] + [(n // q, q) for q in (2, 4, 8) if q <= n and n % q == 0]
    print(f"# {jax.device_count()} simulated {jax.devices()[0].platform} devices on {os.cpu_count()} cores; "
          f"{os.path.basename(ARGS.config)} seq_len={config.seq_len} (T={2 * config.seq_len + 1}), "
          f"batch {config.batch_size}, d_model {config.d_model}, {config.num_layers} layers, "
          f"median of {ARGS.steps - 1} steps")
    print(f"{'mesh data x seq':>16} {'T (padded)':>10} {'compile s':>10} {'step ms':>9} {'permutes':>9} "
          f"{'loss @ step ' + str(ARGS.steps):>14}")
    for d, q in meshes:
        r = measure(config, d, q)
        print(f"{r['mesh']:>16} {r['T']:>10} {r['compile_s']:>10.2f} {r['step_ms']:>9.2f} {r['permutes']:>9} "
              f"{r['loss']:>14.6f}")


if __name__ == "__main__":
    sys.exit(main())
