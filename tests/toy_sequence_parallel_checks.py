"""The toy trainer on a 'data' (2) x 'sequence' (4) mesh of 8 simulated CPU devices.

Run by tests/test_toy_sequence_parallel.py in a subprocess (the device count must be set
before jax is imported); prints one JSON object on its last line. Argument: a config file
(configs/tiny.py) and a scratch folder for the end-to-end ``run``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import jattn  # noqa: E402
import jattn.nnx  # noqa: E402
from jattn.parallel.ring import from_layout, to_layout  # noqa: E402
from jattn.toy import mesh as mesh_lib, run, train  # noqa: E402

STEPS = 3


def named_params(params) -> dict:
    p = nnx.to_pure_dict(params)
    attn = p["blocks"][0]["attn"]
    return {"embed": p["embed"]["embedding"], "output": p["output"]["kernel"],
            "query": attn["query"]["kernel"], "value_bias": attn["value"]["bias"], "out": attn["out"]["kernel"]}


def train_losses(config, data_size: int, sequence_size: int) -> dict:
    """``STEPS`` training steps on a data x sequence mesh: losses, metrics, batch shards, HLO ops."""
    config.mesh.data, config.mesh.sequence = data_size, sequence_size
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    steps = train.jit_steps(config, graphdef, mesh)
    batch = steps.train_batch(0)
    hlo = steps.train_step.lower(state, batch).compile().as_text()
    rows = []
    for step in range(STEPS):
        state, metrics = steps.train_step(state, steps.train_batch(step))
        rows.append({k: float(v) for k, v in metrics.items() if k != "learning_rate"})
    shards = batch.inputs.addressable_shards
    return {
        "mesh": dict(mesh.shape),
        "metrics": rows,
        "collective_permutes": hlo.count("collective-permute"),
        "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
        "batch_devices": len({s.device for s in shards}),
        "batch_shape": list(batch.inputs.shape),
        # Not the key biases: softmax ignores them, their gradient is rounding noise that Adam scales up.
        "params": {name: np.asarray(x).ravel().tolist() for name, x in named_params(state.params).items()},  # in full
    }


def module_error() -> float:
    """jattn.nnx.MultiHeadAttention with sequence_parallel_attention_fn (GQA, zig-zag, causal)
    vs the default attention_fn on the same parameters: max |difference| in original order."""
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)
    fn = jattn.sequence_parallel_attention_fn(mesh=mesh, axis_name="sequence", batch_axis="data", layout="zigzag")
    kw = dict(num_heads=6, in_features=10, num_kv_heads=3, qkv_features=12)
    plain = jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(3))
    ring = jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(3), attention_fn=fn)
    x = jax.random.normal(jax.random.key(1), (2, 24, 10))  # [B, T, F], T = 3 x 2P
    call = nnx.jit(lambda module, x: module(x, is_causal=True))  # one program each, not op by op
    expected = call(plain, x)  # [B, T, F]
    got = from_layout(call(ring, to_layout(x, 4, "zigzag")), 4, "zigzag")  # [B, T, F]
    return float(jnp.max(jnp.abs(got - expected)))


def mesh_errors(config) -> list[str]:
    messages = []
    for data_size, sequence_size in ((-1, 3), (1, 16), (4, 4)):
        config.mesh.data, config.mesh.sequence = data_size, sequence_size
        try:
            mesh_lib.make_mesh(config.mesh, config.batch_size)
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    config.mesh.data, config.mesh.sequence = -1, 2  # 4 x 2 mesh: batch 6 does not split over data=4
    try:
        mesh_lib.make_mesh(config.mesh, 6)
        messages.append("no error")
    except ValueError as e:
        messages.append(str(e))
    return messages


def main():
    config = runpy.run_path(sys.argv[1])["get_config"]()
    config.batch_size = 8
    # One config for the step comparison and the end-to-end run below, and a compilation cache:
    # the run loads the 2 x 4 training step compiled for the comparison.
    config.num_train_steps, config.warmup_steps, config.log_every_steps = 2, 1, 1
    config.num_eval_sequences, config.check_grads = 16, False
    jax.config.update("jax_compilation_cache_dir", os.path.join(sys.argv[2], "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    report = {"device_count": jax.device_count(), "module_max_err": module_error()}
    report["sequence"] = train_losses(config, 2, 4)
    report["single"] = train_losses(config, 1, 1)
    report["mesh_errors"] = mesh_errors(config)
    # The trainer end to end on the 2 x 4 mesh (train, evaluate, decode, plots).
    config.mesh.data, config.mesh.sequence = 2, 4
    report["run"] = run.run(config, os.path.join(sys.argv[2], "run"))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
