"""jattn's Flax modules with parameters and activations sharded over an 8-device mesh.

Run by tests/test_sharded_modules.py in a subprocess (the device count must be set before
jax is imported); prints one JSON object. Mesh: 'data' (2, batch) x 'model' (4, heads),
Auto axes. The sharding comes only from Flax's annotations: ``*_metadata={'sharding_names':
...}`` on the NNX module's kernels and biases (Linen: the same specs, placed after init), the input's
batch sharding, and the compiler's propagation to the activations.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn.linen  # noqa: E402
import jattn.nnx  # noqa: E402

# Heads over 'model': q/k/v kernels [F, N|K, H], biases [N|K, H], out kernel [N, H, F].
QKV_KERNEL, QKV_BIAS, OUT_KERNEL, OUT_BIAS = (None, "model", None), ("model", None), ("model", None, None), (None,)
SIZES = dict(num_heads=8, num_kv_heads=4, qkv_features=32)  # 8 query heads, 4 kv heads, head dim 4
F = 16


def _spec(x):
    return list(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else None


def _hlo_collectives(compiled_text: str):
    return {op: compiled_text.count(op) for op in ("all-reduce", "all-gather")}


def nnx_checks(mesh, x):
    def make(**metadata):
        return jattn.nnx.MultiHeadAttention(in_features=F, rngs=nnx.Rngs(0), **SIZES, **metadata)

    plain = make()
    sharding_kwargs = dict(
        kernel_metadata={"sharding_names": QKV_KERNEL}, out_kernel_metadata={"sharding_names": OUT_KERNEL},
        bias_metadata={"sharding_names": QKV_BIAS}, out_bias_metadata={"sharding_names": OUT_BIAS},
    )
    with jax.set_mesh(mesh):
        @nnx.jit
        def create():
            model = make(**sharding_kwargs)
            state = nnx.state(model)
            nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
            return model

        model = create()
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        forward = nnx.jit(lambda m, x: m(x, is_causal=True))
        y = forward(model, xs)
        hlo = forward.lower(model, xs).compile().as_text()
    return {
        "max_err": float(jnp.max(jnp.abs(y - plain(x, is_causal=True)))),
        "out_spec": _spec(y),
        "query_kernel_spec": _spec(model.query.kernel[...]),
        "key_bias_spec": _spec(model.key.bias[...]),
        "out_kernel_spec": _spec(model.out.kernel[...]),
        "collectives": _hlo_collectives(hlo),
    }


def linen_checks(mesh, x):
    """Linen: DenseGeneral initialises kernels flat ([F, N*H]), so rank-3 ``nn.with_partitioning``
    names fail at init; the params are placed with the same specs after an unsharded init.

    The param specs are ours, so they are not reported as results. What is checked is what the
    compiler derives from them: the output's sharding, the gradients' shardings, and the
    collectives of the forward and forward+backward programs (heads split, no all-gather)."""
    module = jattn.linen.MultiHeadAttention(**SIZES)
    params = module.init(jax.random.key(1), x)["params"]
    specs = {name: {"kernel": QKV_KERNEL, "bias": QKV_BIAS} for name in ("query", "key", "value")}
    specs["out"] = {"kernel": OUT_KERNEL, "bias": OUT_BIAS}
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, P(*s))), params, specs,
                               is_leaf=lambda s: isinstance(s, tuple))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        forward = jax.jit(lambda p, x: module.apply({"params": p}, x, is_causal=True))
        y = forward(sharded, xs)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply({"params": p}, x, is_causal=True) ** 2)))
        g = grad(sharded, xs)
        forward_hlo = forward.lower(sharded, xs).compile().as_text()
        grad_hlo = grad.lower(sharded, xs).compile().as_text()
    g_plain = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, is_causal=True) ** 2))(params)
    return {
        "max_err": float(jnp.max(jnp.abs(y - module.apply({"params": params}, x, is_causal=True)))),
        "grad_max_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain))),
        "out_spec": _spec(y),
        "grad_query_kernel_spec": _spec(g["query"]["kernel"]),
        "grad_out_kernel_spec": _spec(g["out"]["kernel"]),
        "collectives": _hlo_collectives(forward_hlo),
        "grad_collectives": _hlo_collectives(grad_hlo),
    }


if __name__ == "__main__":
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x = np.random.default_rng(0).standard_normal((4, 6, F)).astype(np.float32)  # [B, T, F]
    print(json.dumps({"nnx": nnx_checks(mesh, x), "linen": linen_checks(mesh, x)}))
