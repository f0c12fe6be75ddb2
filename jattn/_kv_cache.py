"""Fixed-size KV cache for autoregressive decoding, shared by the NNX and Linen modules.

Shape glossary: B batch (any number of leading dims; flattened inside), T new tokens in this
call, L cache capacity (max length), K kv heads, H head dim, F input features.

Layout: ``cached_key``/``cached_value`` are ``[*B, L, K, H]`` (K kv heads, never repeated for
GQA/MQA) and ``cache_index`` is ``[*B]`` int32: the number of valid tokens in each row.

Ragged batches are RIGHT-padded: a call brings ``[*B, T]`` new tokens of which the first
``lengths[b]`` are real. Row b writes its T tokens at positions ``cache_index[b] + t``; only
``cache_index[b] + lengths[b]`` of them count, so the padding is masked out and overwritten
by the row's next call. Writes at positions ``>= L`` are dropped (never clamped onto other
slots); eagerly this is a ``ValueError``, under ``jit`` the caller must keep rows within L.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _checks, masks
from jattn.rope import apply_rope


def input_shape(shape, features: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Validate ``init_cache``'s ``input_shape [*B, max_length, F]`` (F in ``features`` if given)."""
    if (not isinstance(shape, (tuple, list)) or len(shape) < 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"input_shape: expected a tuple of positive ints [*B, max_length, features], got {shape!r}")
    if features is not None and shape[-1] not in features:
        raise ValueError(
            f"input_shape: expected the last dim (features) to be one of {sorted(set(features))}, "
            f"got input_shape={tuple(shape)}"
        )
    return tuple(shape)


class Step(NamedTuple):
    key: jax.Array  # [*B, L, K, H] the whole cache after the write
    value: jax.Array  # [*B, L, K, Hv]
    index: jax.Array  # [*B] valid tokens per row after this call
    positions: jax.Array  # [*B, T] absolute position of each new token
    mask: jax.Array  # [*B, 1, T, L] bool: which cache slots each new query sees


def positions(index: jax.Array, T: int) -> jax.Array:
    """[*B] cache index -> [*B, T] absolute positions of the new tokens."""
    return index[..., None] + jnp.arange(T, dtype=index.dtype)  # [*B, T]


def check_step(cached_key, cache_index, key_shape, query_len: int, lengths) -> None:
    """Static checks of one decode call against the cache (trace time), plus an eager bound check."""
    *batch, L, K, H = cached_key.shape
    *kbatch, T, Kk, Hk = key_shape
    if tuple(kbatch) != tuple(batch) or (Kk, Hk) != (K, H):
        raise ValueError(
            f"decode: expected new keys of shape {tuple(batch) + ('T', K, H)} to match the cache "
            f"{tuple(cached_key.shape)} (init_cache input_shape), got {tuple(key_shape)}"
        )
    if query_len != T:
        raise ValueError(f"decode: expected as many query tokens as new keys ({T}), got {query_len}")
    if T > L:
        raise ValueError(f"decode: {T} new tokens cannot fit a cache of max_length {L}")
    if lengths is not None:
        _checks.integer("lengths", lengths)
        _checks.exact_shape("lengths", lengths, tuple(batch), "[*B] valid new tokens per row")
    if any(isinstance(a, jax.core.Tracer) for a in (cache_index, lengths)):
        return  # under jit the values are unknown; writes past L are dropped
    n_new = np.full(tuple(batch), T) if lengths is None else np.asarray(lengths)
    if np.any(n_new < 0) or np.any(n_new > T):
        raise ValueError(f"lengths: expected values in [0, {T}], got {n_new.tolist()}")
    held = np.asarray(cache_index) + n_new
    if np.any(held > L):
        raise ValueError(f"decode: writing past the cache: rows would hold {held.tolist()} tokens, max_length is {L}")


@functools.partial(jax.jit, static_argnames=("is_causal",))
def step(cached_key, cached_value, cache_index, key, value, lengths=None, *, is_causal: bool) -> Step:
    """Write ``key/value [*B, T, K, H]`` at each row's index; build the decode mask.

    Query t of row b sits at position ``index[b] + t``. It sees cache slot s iff
    ``s < index[b] + lengths[b]`` (written and valid) and, with ``is_causal``, ``s <= index[b] + t``.
    """
    *batch, L, K, H = cached_key.shape
    T = key.shape[-3]
    B = math.prod(batch)
    index = jnp.reshape(cache_index, (B,))  # [B]
    pos = positions(index, T)  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))  # [B, T]

    def write(cache, new):
        flat = jnp.reshape(cache, (B, L) + cache.shape[-2:])  # [B, L, K, H]
        new = jnp.reshape(new, (B, T) + new.shape[-2:]).astype(cache.dtype)  # [B, T, K, H]
        flat = flat.at[rows, pos].set(new, mode="drop")
        return jnp.reshape(flat, cache.shape)  # [*B, L, K, H]

    n_new = T if lengths is None else jnp.reshape(jnp.asarray(lengths, index.dtype), (B,))
    end = index + n_new  # [B]
    slot = jnp.arange(L)[None, None, :]  # [1, 1, L]
    visible = masks.padding(pos[:, :, None], slot, kv_length=end[:, None, None])  # [B, T, L]
    if is_causal:
        visible = visible & masks.causal(pos[:, :, None], slot)  # [B, T, L]
    return Step(
        key=write(cached_key, key),
        value=write(cached_value, value),
        index=jnp.reshape(end, tuple(batch)).astype(cache_index.dtype),
        positions=jnp.reshape(pos, tuple(batch) + (T,)),  # [*B, T]
        mask=jnp.reshape(visible, tuple(batch) + (1, T, L)),  # [*B, 1, T, L]
    )


# ----------------------------------------------------------------------------------------
# What both modules do around the cache.
# ----------------------------------------------------------------------------------------


def module_inputs(inputs_q, inputs_k, inputs_v, features: tuple[int, int] | None = None):
    """Flax's defaults (``inputs_k = inputs_q``, ``inputs_v = inputs_k``) and rank checks.

    ``features = (F_q, F_kv)`` also checks the last dims. Returns the three arrays.
    """
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_k: expected an array when inputs_v is given, got None")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    wanted = (None, None, None) if features is None else (features[0], features[1], features[1])
    for name, x, f in zip(("inputs_q", "inputs_k", "inputs_v"), (inputs_q, inputs_k, inputs_v), wanted):
        shape = _checks.rank(name, x, tuple(range(2, 64)), "[*B, length, features]")
        if f is not None and shape[-1] != f:
            raise ValueError(f"{name}: expected {f} features (last dim), got shape {shape}")
    return inputs_q, inputs_k, inputs_v


def rope_full_pass(query, key, positions, kv_positions, rope_base):
    """RoPE on a full (non-decode) pass: positions default to ``0..T-1`` / ``0..S-1``."""
    if rope_base is None:
        return query, key
    T, S = query.shape[-3], key.shape[-3]
    query = apply_rope(query, jnp.arange(T) if positions is None else positions, rope_base)
    key = apply_rope(key, jnp.arange(S) if kv_positions is None else kv_positions, rope_base)
    return query, key


def decode(cached_key, cached_value, cache_index, query, key, value, mask, lengths, *,
           is_causal: bool, rope_base, rope_positions=None, rope_kv_positions=None):
    """One decode call: checks, RoPE at the cache positions, the cache write, the mask.

    Returns ``(query, step, mask)``: attend ``query`` over ``step.key/step.value`` with
    ``mask`` (the step's cache-aligned mask, AND the caller's) and ``is_causal=False``.
    """
    check_step(cached_key, cache_index, key.shape, query.shape[-3], lengths)
    if rope_base is not None:
        pos = positions(cache_index, query.shape[-3])  # [*B, T]
        query = apply_rope(query, pos if rope_positions is None else rope_positions, rope_base)
        key = apply_rope(key, pos if rope_kv_positions is None else rope_kv_positions, rope_base)
    new = step(cached_key, cached_value, cache_index, key, value, lengths, is_causal=is_causal)
    merged = new.mask if mask is None else jnp.logical_and(new.mask, jnp.asarray(mask) != 0)
    return query, new, merged
