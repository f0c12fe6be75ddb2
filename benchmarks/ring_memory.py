"""Per-device compiled temp memory of ring attention's forward+backward vs the number of devices.

    python benchmarks/ring_memory.py      # 8 simulated CPU devices; writes results/ring_memory.json

B=1, T=2048, N=4, H=64, fp32, causal, zig-zag layout, ``jax.value_and_grad`` of
``jnp.sum(jattn.sequence_parallel_attention(...))`` over a 1-D mesh of P = 1, 2, 4, 8 devices,
and for contrast the single-device ``'xla'`` and ``'chunked'`` paths. Compile-only (nothing
runs), so the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jattn  # noqa: E402

B, T, N, H = 1, 2048, 4, 64
OUT = os.path.join(os.path.dirname(__file__), "results", "ring_memory.json")


def temp_mb(step, *args) -> float:
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6


def main():
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    mb = {}
    for n in (1, 2, 4, 8):
        mesh = jax.make_mesh((n,), ("s",), devices=jax.devices()[:n])

        def loss(q, k, v, mesh=mesh):
            out = jattn.sequence_parallel_attention(q, k, v, mesh=mesh, axis_name="s", layout="zigzag",
                                                    is_causal=True)
            return jnp.sum(out)

        with jax.set_mesh(mesh):
            mb[f"ring_P{n}"] = temp_mb(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, q, q)
    for impl in ("xla", "chunked"):
        def single(q, k, v, impl=impl):
            return jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))

        mb[f"single_device_{impl}"] = temp_mb(jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2))), q, q, q)
    for name, value in mb.items():
        print(f"{name:22s} {value:8.1f} MB")
    report = {"jax": jax.__version__, "B": B, "T": T, "N": N, "H": H, "dtype": "float32", "causal": True,
              "layout": "zigzag", "what": "per-device compiled temp memory of forward+backward (MB = 1e6 bytes)",
              "temp_mb": {k: round(v, 1) for k, v in mb.items()}}
    with open(OUT, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
