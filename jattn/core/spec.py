"""The public arguments of ``dot_product_attention``, checked and normalised into one spec.

Shape glossary: B batch (any number of leading dims, flattened inside), T query length,
S key length, N query heads, K key/value heads (N = K·G), G query heads per kv head,
H key head dim, Hv value head dim.

``attention_spec`` is the one validator of the functional API: every check runs on static
shapes and dtypes (``jattn._checks``), raises a ``ValueError``/``TypeError`` naming the argument
before anything reaches XLA, and the result holds only normalised values: a hashable
``Config`` and the ``Arrays`` with batch dims flattened and heads split K×G. ``options``
normalises the scalar options every entry point shares (scale, soft cap, window).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import _checks


class Config(NamedTuple):
    """Static (hashable) settings of one call; everything else is an array. Which implementation
    runs is not part of it: ``dispatch`` chooses that from the settings."""

    scale: float
    is_causal: bool
    offset: int  # query row i sits at key position i + offset
    window: tuple[int, int] | None
    logits_soft_cap: float | None
    dropout_rate: float
    broadcast_dropout: bool  # one [T, S] keep-mask shared by every batch row and head
    block_sizes: tuple[int, int] | None  # (block_q, block_kv) for 'chunked'; None = default


class Arrays(NamedTuple):
    """The array inputs, normalised: batch dims flattened to one B, head axis split K×G."""

    query: jax.Array  # [B, T, K, G, H]
    key: jax.Array  # [B, S, K, H]
    value: jax.Array  # [B, S, K, Hv]
    mask: jax.Array | None  # [Bm, Km, Gm, T, S] bool, Bm in {1, B}, (Km, Gm) in {(1, 1), (K, G)}
    bias: jax.Array | None  # [Bm, Km, Gm, T, S] float
    keep: jax.Array | None  # [B, K, G, T, S] dropout multiplier
    q_lengths: jax.Array | None  # [B]
    kv_lengths: jax.Array | None  # [B]
    q_segment_ids: jax.Array | None  # [B, T]
    kv_segment_ids: jax.Array | None  # [B, S]


class AttentionSpec(NamedTuple):
    """A checked call: what runs (``config``, ``arrays``) and how to shape its results."""

    batch_shape: tuple[int, ...]
    T: int
    N: int
    S: int
    Hv: int
    config: Config
    arrays: Arrays
    dropout_rng: jax.Array | None
    implementation: str | None
    return_residual: bool
    return_weights: bool


def options(H: int, scale, logits_soft_cap, local_window_size, window_limit: int | None):
    """(scale, logits_soft_cap, window) normalised: static floats, ``(left, right)`` or None."""
    scale = _checks.default_scale(H) if scale is None else _checks.concrete_number("scale", scale)
    if logits_soft_cap is not None:
        logits_soft_cap = _checks.concrete_number("logits_soft_cap", logits_soft_cap, low=0, low_open=True)
    window = None if local_window_size is None else _checks.window("local_window_size", local_window_size,
                                                                   window_limit)
    return scale, logits_soft_cap, window


def segment_ids_pair(q_segment_ids, kv_segment_ids) -> None:
    """Segment ids come both or neither."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "q_segment_ids, kv_segment_ids: expected both or neither, got "
            f"q_segment_ids={'None' if q_segment_ids is None else 'an array'}, "
            f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}"
        )


def _block_sizes(block_sizes):
    if block_sizes is None:
        return None
    if (not isinstance(block_sizes, (tuple, list)) or len(block_sizes) != 2
            or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in block_sizes)):
        raise ValueError(f"block_sizes: expected (block_q, block_kv) of positive ints, got {block_sizes!r}")
    return tuple(int(b) for b in block_sizes)


def _split_heads(x, name: str, batch_shape, N: int, K: int, T: int, S: int):
    """[*, N|1, T|1, S|1] broadcastable to [*B, N, T, S] -> [Bm, Km, Gm, T, S]."""
    if x is None:
        return None
    full = batch_shape + (N, T, S)
    padded = _checks.broadcastable(name, x, full, "[*B, N, T, S]")
    x = jnp.reshape(x, padded)
    nb = len(batch_shape)
    if all(d == 1 for d in padded[:nb]):
        x = jnp.reshape(x, (1,) + padded[nb:])  # [1, N|1, T|1, S|1]
    else:
        x = jnp.broadcast_to(x, batch_shape + padded[nb:])
        x = jnp.reshape(x, (math.prod(batch_shape),) + padded[nb:])  # [B, N|1, T|1, S|1]
    Bm, Nm = x.shape[:2]
    heads = (K, N // K) if Nm == N else (1, 1)
    x = jnp.broadcast_to(x, (Bm, Nm, T, S))
    return jnp.reshape(x, (Bm,) + heads + (T, S))  # [Bm, Km, Gm, T, S]


def _per_batch(x, name: str, dtype_check, batch_shape, trailing: tuple[int, ...], layout: str):
    """Lengths [*B] or segment ids [*B, L] -> flattened [B] / [B, L]."""
    if x is None:
        return None
    dtype_check(name, x)
    _checks.exact_shape(name, x, batch_shape + trailing, layout)
    return jnp.reshape(jnp.asarray(x), (math.prod(batch_shape),) + trailing)


def attention_spec(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    implementation=None,
    return_residual=False,
    causal_alignment="top_left",
    q_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap=None,
    dropout_rate=0.0,
    dropout_rng=None,
    broadcast_dropout=False,
    return_weights=False,
    block_sizes=None,
) -> AttentionSpec:
    """Check ``dot_product_attention``'s arguments (same names) and normalise them."""
    batch_shape, T, N, H, S, K, Hv = _checks.qkv(query, key, value)
    if mask is not None:
        _checks.boolean("mask", mask)
    if bias is not None:
        _checks.floating("bias", bias)
    segment_ids_pair(q_segment_ids, kv_segment_ids)
    _checks.choice("causal_alignment", causal_alignment, ("top_left", "bottom_right"))
    scale, logits_soft_cap, window = options(H, scale, logits_soft_cap, local_window_size, T + S)
    dropout_rate = _checks.concrete_number("dropout_rate", dropout_rate, low=0, high=1, high_open=True)
    if dropout_rng is not None and dropout_rate > 0:
        _checks.shape_of("dropout_rng", dropout_rng)
    else:
        dropout_rate, dropout_rng = 0.0, None
    B = math.prod(batch_shape)
    arrays = Arrays(
        query=jnp.reshape(query, (B, T, K, N // K, H)),  # [B, T, K, G, H]
        key=jnp.reshape(key, (B, S, K, H)),  # [B, S, K, H]
        value=jnp.reshape(value, (B, S, K, Hv)),  # [B, S, K, Hv]
        mask=_split_heads(mask, "mask", batch_shape, N, K, T, S),
        bias=_split_heads(bias, "bias", batch_shape, N, K, T, S),
        keep=None,
        q_lengths=_per_batch(query_seq_lengths, "query_seq_lengths", _checks.integer, batch_shape, (), "[*B]"),
        kv_lengths=_per_batch(key_value_seq_lengths, "key_value_seq_lengths", _checks.integer, batch_shape, (),
                              "[*B]"),
        q_segment_ids=_per_batch(q_segment_ids, "q_segment_ids", _checks.integer, batch_shape, (T,), "[*B, T]"),
        kv_segment_ids=_per_batch(kv_segment_ids, "kv_segment_ids", _checks.integer, batch_shape, (S,), "[*B, S]"),
    )
    config = Config(
        scale=scale,
        is_causal=bool(is_causal),
        offset=0 if causal_alignment == "top_left" else S - T,
        window=window,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        broadcast_dropout=bool(broadcast_dropout),
        block_sizes=_block_sizes(block_sizes),
    )
    return AttentionSpec(batch_shape, T, N, S, Hv, config, arrays, dropout_rng, implementation,
                         bool(return_residual), bool(return_weights))
