"""Ulysses (all-to-all) sequence parallelism: re-shard from sequence to heads and back.

Shape glossary: B batch, P devices on the sequence axis, T / S global query / key length,
Tl = T/P and Sl = S/P the local lengths, N query heads, K key/value heads, H query/key head
dim, Hv value head dim, Kr the kv heads after replication (a multiple of P).

Call ``ulysses_attention`` inside ``jax.shard_map`` with the sequence axis sharded over
``axis_name``. One ``lax.all_to_all`` per array turns ``[B, Tl, N, H]`` (all heads, a slice
of the sequence) into ``[B, T, N/P, H]`` (the whole sequence, a slice of the heads); the
single-device ``jattn.dot_product_attention`` then runs on the whole sequence (its dispatch
picks ``'chunked'`` for long inputs, so memory stays linear in T), and one more all-to-all
brings the output back to ``[B, Tl, N, Hv]``. The backward pass is the transpose: the same
all-to-alls in reverse.

Heads: N must be divisible by P. Grouped queries with K not divisible by P replicate each kv
head ``r = P / gcd(K, P)`` times (Kr = lcm(K, P) heads, which divides N), the fewest copies
that keep every query head on the device of its kv head; K divisible by P sends no copies.

Layouts: rows arrive in the ring's layout (``'contiguous'`` or ``'zigzag'``); after the
all-to-all each device holds the whole sequence in that layout and puts it back into
original order (a local gather) before attention, so causal masks, windows and lengths
mean original positions exactly as in ``jattn.parallel.ring``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import dot_product_attention
from jattn.parallel.ring import _chunks, check_arrays, check_local_layout


def kv_replication(num_kv_heads: int, num_devices: int) -> int:
    """How many copies of each kv head Ulysses sends: ``P / gcd(K, P)`` (1 when P divides K).

    Args:
      num_kv_heads: K.
      num_devices: P, the devices of the sequence axis.

    Returns:
      The replication factor, an int >= 1.
    """
    return num_devices // math.gcd(num_kv_heads, num_devices)


def _stored_order(layout: str, length: int, num_devices: int) -> np.ndarray:
    """[length] original position of each row of the gathered sequence (static)."""
    local = length // num_devices
    return np.concatenate([
        np.arange(first, last + 1)
        for d in range(num_devices) for first, last in _chunks(layout, d, local, num_devices)
    ])


def ulysses_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    axis_name,
    layout: str = "contiguous",
    is_causal: bool = False,
    scale: float | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    block_sizes: tuple[int, int] | None = None,
):
    """Exact multi-head attention over a sequence sharded along ``axis_name`` by re-sharding to
    heads (all-to-all); call inside ``jax.shard_map``.

    Same arguments and result as ``jattn.ring_attention`` (without the mods); the N query
    heads must be divisible by the P devices of ``axis_name`` (ValueError otherwise: use the
    ring). kv heads that P does not divide are replicated ``P / gcd(K, P)`` times.

    Args:
      query: the LOCAL ``[B, Tl, N, H]`` shard, rows in ``layout``.
      key: the local ``[B, Sl, K, H]`` shard.
      value: the local ``[B, Sl, K, Hv]`` shard.
      bias: must be None.
      mask: must be None.
      axis_name: the mesh axis of the enclosing shard_map the sequence is sharded over.
      layout: ``'contiguous'`` or ``'zigzag'``.
      is_causal: top-left causal.
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(H)``.
      query_seq_lengths: ``[B]`` GLOBAL lengths.
      key_value_seq_lengths: ``[B]`` GLOBAL lengths.
      q_segment_ids: local ``[B, Tl]``, in ``layout``.
      kv_segment_ids: local ``[B, Sl]``, in ``layout``.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)``.
      local_window_size: ``w`` or ``(left, right)``.
      block_sizes: go to the single-device kernel (``'chunked'`` when it runs).

    Returns:
      The local ``[B, Tl, N, Hv]`` shard of the output, in ``layout``.
    """
    B, Tl, Sl, N, K = check_arrays(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids
    )
    P = check_local_layout(layout, axis_name, Tl, Sl)
    if N % P:
        raise ValueError(
            f"query: Ulysses splits the N={N} query heads over the {P} devices of {axis_name!r}, so N must "
            f"be divisible by {P}; use strategy='ring'"
        )
    r = kv_replication(K, P)
    if r > 1:  # each kv head r times in a row: query head n still meets kv head n // (N/K)
        key, value = jnp.repeat(key, r, axis=2), jnp.repeat(value, r, axis=2)  # [B, Sl, Kr, H|Hv]

    def to_heads(x):  # [B, L, n, D] -> [B, P·L, n/P, D]
        return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    def gather(x):  # [B, L] -> [B, P·L]
        return None if x is None else jax.lax.all_gather(x, axis_name, axis=1, tiled=True)

    q, k, v = to_heads(query), to_heads(key), to_heads(value)  # [B, T, N/P, H], [B, S, Kr/P, H|Hv]
    q_seg, kv_seg = gather(q_segment_ids), gather(kv_segment_ids)  # [B, T], [B, S]
    if layout != "contiguous":  # back to original order (a static local gather)
        q_order = np.argsort(_stored_order(layout, Tl * P, P))
        kv_order = np.argsort(_stored_order(layout, Sl * P, P))
        q, k, v = q[:, q_order], k[:, kv_order], v[:, kv_order]
        q_seg = None if q_seg is None else q_seg[:, q_order]
        kv_seg = None if kv_seg is None else kv_seg[:, kv_order]
    out = dot_product_attention(
        q, k, v, is_causal=is_causal, scale=scale, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        logits_soft_cap=logits_soft_cap, local_window_size=local_window_size, block_sizes=block_sizes,
    )  # [B, T, N/P, Hv]
    if layout != "contiguous":
        out = out[:, _stored_order(layout, Tl * P, P)]
    return jax.lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)  # [B, Tl, N, Hv]
