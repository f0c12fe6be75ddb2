"""Context-parallel decoding: attention of a few new queries over a KV cache sharded along its
sequence axis, combined across devices by logsumexp.

Shape glossary: B batch, Tq new query rows (1 for plain decoding), S cache length, Sl = S/P the
rows each device holds, N query heads, K kv heads, H head dim, Hv value head dim, P devices on
the sequence axis.

Each device attends the (replicated) queries to the cache rows it holds with the single-device
``jattn.dot_product_attention`` (its lengths clipped to the local rows) and keeps the partial
output and row logsumexp; one ``pmax`` and one ``psum`` of ``[B, Tq, N(, Hv)]`` arrays turn the
partials into the exact softmax over the whole cache:

    out = Σ_d exp(lse_d - m) · out_d / Σ_d exp(lse_d - m),  m = max_d lse_d

so a cache too long for one device is spread over P of them and only the tiny per-query
partials travel. For inference: the logsumexp residual is not differentiated (as in jax.nn).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jattn.core import spec
from jattn.functional import dot_product_attention
from jattn.parallel.sequence_parallel import _place


def _combine(out, lse, axis_name):
    """Exact softmax over all devices from per-device (out [B, Tq, N, Hv], lse [B, Tq, N])."""
    m = jax.lax.pmax(lse, axis_name)  # [B, Tq, N]
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # no device saw a key: weights 0
    w = jnp.exp(lse - m_safe)  # [B, Tq, N]; 0 where this device saw nothing
    num, den = jax.lax.psum((out.astype(w.dtype) * w[..., None], w), axis_name)
    return jnp.where(den[..., None] == 0, 0.0, num / jnp.where(den == 0, 1.0, den)[..., None])


def context_parallel_decode(
    query,
    key_cache,
    value_cache,
    *,
    mesh: Mesh,
    axis_name: str,
    key_value_seq_lengths=None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
):
    """Attention of a few new tokens over a KV cache sharded along its length S over ``axis_name``.

    Every query row sees every cache row below ``key_value_seq_lengths`` (the new tokens' own
    keys are expected to be in the cache already); equal to ``jattn.dot_product_attention(query,
    key_cache, value_cache, key_value_seq_lengths=...)``.

    Args:
      query: ``[B, Tq, N, H]``.
      key_cache: ``[B, S, K, H]``, N a multiple of K; S divisible by the size of ``axis_name``.
      value_cache: ``[B, S, K, Hv]``.
      mesh: the ``jax.sharding.Mesh``.
      axis_name: the mesh axis the cache is sharded over.
      key_value_seq_lengths: ``[B]`` integers; all S when None.
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(H)``.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)``.

    Returns:
      ``[B, Tq, N, Hv]``, replicated over ``axis_name``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh (e.g. from jax.make_mesh), got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh axes {tuple(mesh.axis_names)}, got {axis_name!r}")
    sh = spec.check_arrays(query, key_cache, value_cache, key_value_seq_lengths=key_value_seq_lengths,
                           names={"key": "key_cache", "value": "value_cache"}, any_batch=False, T="Tq")
    n = mesh.shape[axis_name]
    if sh.S % n:
        raise ValueError(f"key_cache: expected a cache length divisible by the {n} devices of {axis_name!r}, got {sh.S}")
    if key_value_seq_lengths is None:
        key_value_seq_lengths = jnp.full((sh.B,), sh.S, jnp.int32)
    scale, logits_soft_cap, _ = spec.options(sh.H, scale, logits_soft_cap, None, None)
    options = (("scale", scale), ("logits_soft_cap", logits_soft_cap))
    return _run(query, key_cache, value_cache, key_value_seq_lengths, mesh, axis_name, options)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _run(query, key_cache, value_cache, lengths, mesh, axis_name, options):
    def local(q, k, v, lengths):
        Sl = k.shape[1]
        first = jax.lax.axis_index(axis_name) * Sl  # global index of this device's first row
        local_len = jnp.clip(lengths - first, 0, Sl).astype(lengths.dtype)  # [B]
        out, lse = dot_product_attention(q, k, v, key_value_seq_lengths=local_len, return_residual=True,
                                         **dict(options))  # [B, Tq, N, Hv], [B, Tq, N]
        return _combine(out, lse, axis_name).astype(q.dtype)

    cache = P(None, axis_name)
    key_cache, value_cache = _place(key_cache, mesh, cache), _place(value_cache, mesh, cache)
    query, lengths = _place(query, mesh, P()), _place(lengths, mesh, P())
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), cache, cache, P()), out_specs=P())(
        query, key_cache, value_cache, lengths)
