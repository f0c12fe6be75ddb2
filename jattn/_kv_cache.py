"""Fixed-size KV cache for autoregressive decoding, shared by the NNX and Linen modules.

Shape glossary: B batch (any number of leading dims; flattened inside), T new tokens in this
call, L cache capacity (max length), N query heads, K kv heads, H head dim, F input features.

Layout: ``cached_key``/``cached_value`` are ``[*B, L, K, H]`` (K kv heads, never repeated for
GQA/MQA) and ``cache_index`` is ``[*B]`` int32: the number of valid tokens in each row.

Ragged batches are RIGHT-padded: a call brings ``[*B, T]`` new tokens of which the first
``lengths[b]`` are real. Row b writes its T tokens at positions ``cache_index[b] + t``; only
``cache_index[b] + lengths[b]`` of them count, so the padding is masked out and overwritten
by the row's next call. Writes at positions ``>= L`` are dropped (never clamped onto other
slots).

Misuse is never silent. A call whose shapes cannot fit (T > L) is a ``ValueError`` at trace
time. A row that would go past the cache (``cache_index + lengths > L``) or whose ``lengths``
is negative or larger than T is a ``ValueError`` when the values are known (eager calls).
Under ``jit`` the values are not known while tracing, so such a row is POISONED instead:
nothing is written to it, its ``cache_index`` becomes ``POISONED`` (-1), and the module's
output for the row is NaN -- in this call and in every later decode call on that row, until
``init_cache`` is called again (an eager call on a poisoned cache raises ``ValueError``).
``jnp.any(cache_index < 0)`` is the flag to check after a jitted decode loop.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import _checks, masks


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


POISONED = -1  # cache_index of a row that a decode under jit could not write


class Cache(NamedTuple):
    key: jax.Array  # [*B, L, K, H]
    value: jax.Array  # [*B, L, K, Hv]
    index: jax.Array  # [*B] int32 valid tokens per row (POISONED after an out-of-range jitted call)


class Step(NamedTuple):
    cache: Cache  # the whole cache after the write
    positions: jax.Array  # [*B, T] absolute position of each new token
    mask: jax.Array  # [*B, 1, T, L] bool: which cache slots each new query sees
    ok: jax.Array  # [*B] bool: False for a poisoned row (its outputs must become NaN)


def positions(index: jax.Array, T: int) -> jax.Array:
    """[*B] cache index -> [*B, T] absolute positions of the new tokens."""
    return index[..., None] + jnp.arange(T, dtype=index.dtype)  # [*B, T]


def check_step(cache: Cache, key_shape, query_len: int, lengths, mask, num_heads: int) -> None:
    """Static checks of one decode call against the cache (trace time), plus eager value checks.

    Args:
      cache: the cache before the call.
      key_shape: shape of the new keys ``[*B, T, K, H]``.
      query_len: T of the new queries.
      lengths: ``[*B]`` int valid new tokens per row, or None (all T).
      mask: the caller's mask, broadcastable to ``[*B, N, T, L]``, or None.
      num_heads: N.
    """
    *batch, L, K, H = cache.key.shape
    *kbatch, T, Kk, Hk = key_shape
    if tuple(kbatch) != tuple(batch) or (Kk, Hk) != (K, H):
        raise ValueError(
            f"decode: expected new keys of shape {tuple(batch) + ('T', K, H)} to match the cache "
            f"{tuple(cache.key.shape)} (init_cache input_shape), got {tuple(key_shape)}"
        )
    if query_len != T:
        raise ValueError(f"decode: expected as many query tokens as new keys ({T}), got {query_len}")
    if T > L:
        raise ValueError(f"decode: {T} new tokens cannot fit a cache of max_length {L}")
    if lengths is not None:
        _checks.integer("lengths", lengths)
        _checks.exact_shape("lengths", lengths, tuple(batch), "[*B] valid new tokens per row")
    if mask is not None:
        target = tuple(batch) + (num_heads, T, L)
        shape = _checks.shape_of("mask", mask)
        try:
            fits = len(shape) <= len(target) and np.broadcast_shapes(shape, target) == target
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask: expected a shape that broadcasts to [*B, N, T, L] = {target} in decode mode "
                f"(L = max_length of the cache), got {shape}"
            )
    if any(isinstance(a, jax.core.Tracer) for a in (cache.index, lengths)):
        return  # under jit the values are unknown: bad rows are poisoned by ``step``
    index = np.asarray(cache.index)
    if np.any(index < 0):
        raise ValueError(
            f"cache_index: rows {np.flatnonzero(index.reshape(-1) < 0).tolist()} were poisoned by an "
            "out-of-range decode under jit (cache_index = -1); call init_cache to start again"
        )
    n_new = np.full(tuple(batch), T) if lengths is None else np.asarray(lengths)
    if np.any(n_new < 0) or np.any(n_new > T):
        raise ValueError(f"lengths: expected values in [0, {T}], got {n_new.tolist()}")
    held = index + n_new
    if np.any(held > L):
        raise ValueError(f"decode: writing past the cache: rows would hold {held.tolist()} tokens, max_length is {L}")


@functools.partial(jax.jit, static_argnames=("is_causal",))
def step(cache: Cache, key, value, lengths=None, *, is_causal: bool) -> Step:
    """Write ``key/value [*B, T, K, H]`` at each row's index; build the decode mask.

    Query t of row b sits at position ``index[b] + t``. It sees cache slot s iff
    ``s < index[b] + lengths[b]`` (written and valid) and, with ``is_causal``, ``s <= index[b] + t``.
    A row whose index is POISONED, or whose lengths are outside ``[0, T]`` or would go past L,
    writes nothing, gets ``index = POISONED`` and ``ok = False``.
    """
    *batch, L, K, H = cache.key.shape
    T = key.shape[-3]
    B = math.prod(batch)
    index = jnp.reshape(cache.index, (B,))  # [B]
    n_new = jnp.full((B,), T, index.dtype) if lengths is None else jnp.reshape(jnp.asarray(lengths, index.dtype), (B,))
    ok = (index >= 0) & (n_new >= 0) & (n_new <= T) & (index + n_new <= L)  # [B]
    pos = positions(index, T)  # [B, T]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))  # [B, T]
    slots = jnp.where(ok[:, None], pos, L)  # [B, T]: a poisoned row writes nothing (L is dropped)

    def write(full, new):
        flat = jnp.reshape(full, (B, L) + full.shape[-2:])  # [B, L, K, H]
        new = jnp.reshape(new, (B, T) + new.shape[-2:]).astype(full.dtype)  # [B, T, K, H]
        flat = flat.at[rows, slots].set(new, mode="drop")
        return jnp.reshape(flat, full.shape)  # [*B, L, K, H]

    end = index + n_new  # [B]
    slot = jnp.arange(L)[None, None, :]  # [1, 1, L]
    visible = masks.padding(pos[:, :, None], slot, kv_length=end[:, None, None])  # [B, T, L]
    if is_causal:
        visible = visible & masks.causal(pos[:, :, None], slot)  # [B, T, L]
    new_index = jnp.where(ok, end, POISONED).astype(cache.index.dtype)  # [B]
    return Step(
        cache=Cache(write(cache.key, key), write(cache.value, value), jnp.reshape(new_index, tuple(batch))),
        positions=jnp.reshape(pos, tuple(batch) + (T,)),  # [*B, T]
        mask=jnp.reshape(visible, tuple(batch) + (1, T, L)),  # [*B, 1, T, L]
        ok=jnp.reshape(ok, tuple(batch)),  # [*B]
    )
