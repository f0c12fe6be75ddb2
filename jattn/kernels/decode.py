"""Decode attention: a few new query tokens over a KV cache, at the cost of the real lengths.

Shape glossary: B batch (any number of leading dims, flattened inside), Tq new query tokens
(1 for a decode step, a handful for speculative verification), S cache capacity, N query
heads, K kv heads, G = N/K query heads per kv head, R = Tq·G query rows per kv head, H key
head dim, Hv value head dim, c split size (cache positions per split), J splits per row.

Flash-decoding: each row's cache is cut into splits of ``c`` positions. A split yields a
partial result (running max, sum of weights, weighted sum of values) for all ``R`` query rows
of every kv head at once, so each K/V byte is read once per step whatever G is; the partials
of a row are merged exactly (online softmax). Only the splits a row can see are visited: a
``lax.fori_loop`` runs over a flat work list of ``(row, split)`` pairs built from the lengths
(and the local window), so a batch of short rows costs what its tokens cost, not ``B·S``.
Each split is a ``dynamic_slice`` of the cache in its natural ``[S, K, H]`` layout; XLA never
copies or transposes the whole cache (only the current split, which stays in cache memory).

The same loop runs over a paged cache (``jattn.kernels.paged``): there a split is one page.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import spec
from jattn.core.attention import soft_cap

# Default split size (num_splits=None), as the bytes of the split's fp32 logit products
# [c, K, H, R8] (R8: query rows rounded up to 8): XLA CPU slices each split into a buffer and
# works through these products, so they must stay in the cache (at B=8, N=32, K=8, H=128 a
# split of 256 positions; 512 ran 2-10x slower, fp32 and bf16), while larger splits amortise
# the loop's per-iteration cost (128 positions were ~10 % slower).
DEFAULT_SPLIT_BYTES = 8 * 2**20


class Static(NamedTuple):
    """Static (hashable) settings of one call."""

    split_size: int  # c
    scale: float
    logits_soft_cap: float | None
    window_left: int | None  # keys further than this behind a query are hidden


class Partial(NamedTuple):
    """Running softmax state of every query row of one batch row."""

    m: jax.Array  # [K, R] running max of the visible logits (-inf: none seen yet)
    l: jax.Array  # [K, R] sum of exp(logit - m) over the visible keys
    o: jax.Array  # [K, R, Hv] sum of exp(logit - m) · value


def split_partial(q, k, v, pos, first, length, Tq: int, static: Static, dots: bool = False) -> Partial:
    """Softmax partial of one split for one batch row (all its query rows and kv heads).

    Args:
      q: [K, R, H] query rows per kv head; row ``r`` is query token ``r // G``.
      k: [c, K, H] keys of the split, v: [c, K, Hv] values (the cache's own layout).
      pos: [c] absolute cache position of each key.
      first: scalar; keys before it belong to another split (a clamped last split).
      length: scalar; keys at ``>= length`` are not written yet.
      Tq: query tokens; token ``t`` sits at position ``length - Tq + t``.
      dots: logits and weighted values as matrix products (XLA CPU transposes the split for
        them: worth it for a whole small cache, see ``_decode``), else as products and sums in
        the split's own layout.

    Returns:
      Partial with m, l [K, R] and o [K, R, Hv] in fp32 (float64 for float64 inputs).
    """
    K, R, _ = q.shape
    G = R // Tq
    acc = jnp.promote_types(q.dtype, jnp.float32)
    # Logits as a product and a sum over H with the query rows as the minor axis, padded to a
    # multiple of 8 (a full vector of fp32 lanes): XLA CPU then runs one vectorised pass over
    # the split in its [c, K, H] layout. A dot_general would transpose the split to [K, c, H]
    # first, and per-head dots copy each strided [c, H] slice (benchmarks/bench_decode.py).
    if dots:
        s = jnp.einsum("ckh,krh->ckr", k.astype(acc), q.astype(acc) * static.scale)  # [c, K, R]
    else:
        R8 = -(-R // 8) * 8
        qt = jnp.pad(q.astype(acc) * static.scale, ((0, 0), (0, R8 - R), (0, 0)))  # [K, R8, H]
        qt = jnp.transpose(qt, (0, 2, 1))  # [K, H, R8]
        s = jnp.sum(k[..., None].astype(acc) * qt[None], axis=2)[..., :R]  # [c, K, R]
    s = soft_cap(s, static.logits_soft_cap)
    q_pos = length - Tq + jnp.arange(R) // G  # [R]
    key_ok = (pos >= first) & (pos < length)  # [c]
    visible = key_ok[:, None] & (pos[:, None] <= q_pos[None, :])  # [c, R]
    if static.window_left is not None:
        visible = visible & (pos[:, None] >= q_pos[None, :] - static.window_left)  # [c, R]
    s = jnp.where(visible[:, None, :], s, -jnp.inf)  # [c, K, R]
    m = jnp.max(s, axis=0)  # [K, R]; NaN if a visible logit is NaN
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[None])  # [c, K, R]; hidden -> 0
    # Unwritten slots may hold anything (NaN included): zero them, 0 · NaN would leak.
    v = jnp.where(key_ok[:, None, None], v, jnp.zeros((), v.dtype))  # [c, K, Hv]
    if dots:
        o = jnp.einsum("ckr,ckh->krh", p, v.astype(acc))  # [K, R, Hv]
    else:
        o = jnp.sum(p[..., None] * v[:, :, None, :].astype(acc), axis=0)  # [K, R, Hv]
    return Partial(m, jnp.sum(p, axis=0), o)


def merge(a: Partial, b: Partial) -> Partial:
    """Exact merge of two softmax partials of the same rows (online softmax)."""
    m = jnp.maximum(a.m, b.m)  # [K, R]
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    wa, wb = jnp.exp(a.m - m_safe), jnp.exp(b.m - m_safe)  # [K, R]; -inf -> 0
    return Partial(m, a.l * wa + b.l * wb, a.o * wa[..., None] + b.o * wb[..., None])


def finish(p: Partial, out_dtype) -> jax.Array:
    """o / l, with 0 for a row that saw no key (l = 0) and NaN kept: [..., K, R, Hv]."""
    l = p.l[..., None]
    return jnp.where(l == 0, 0.0, p.o / jnp.where(l == 0, 1.0, l)).astype(out_dtype)


def work_list(lengths, Tq: int, static: Static, num_splits: int):
    """Which splits each row needs: ``(first_split [B], starts [B], ends [B], total)``.

    Row b needs splits ``first_split[b] .. first_split[b] + count[b] - 1`` with ``count`` the
    splits between the first key any of its queries can see (window) and its length.
    ``ends = cumsum(count)``, ``starts = ends - count``: work item ``i`` belongs to the row
    ``b = searchsorted(ends, i, 'right')`` and is its split ``first[b] + i - starts[b]``.
    """
    c = static.split_size
    last = (lengths + c - 1) // c  # [B] one past the last needed split
    if static.window_left is None:
        first = jnp.zeros_like(lengths)
    else:
        first = jnp.maximum(lengths - Tq - static.window_left, 0) // c  # [B]
    first = jnp.minimum(first, last)
    count = jnp.clip(last - first, 0, num_splits)  # [B]
    ends = jnp.cumsum(count)  # [B]
    return first, ends - count, ends, ends[-1]


def run_splits(q, lengths, caches, fetch: Callable, Tq: int, Hv: int, static: Static,
               num_splits: int, out_dtype) -> jax.Array:
    """The flash-decoding loop over every needed ``(row, split)`` pair.

    Args:
      q: [B, K, R, H] query rows grouped by kv head.
      lengths: [B] int32 valid cache positions per row.
      caches: the arrays ``fetch`` reads (a pytree; carried through the loop, never copied).
      fetch: ``(caches, b, j) -> (k [c, K, H], v [c, K, Hv], pos [c], first)``: split ``j``
        of row ``b``, its keys' positions and the first position that belongs to it.
      Tq, Hv: query tokens and value head dim. num_splits: J, splits per row.

    Returns:
      [B, K, R, Hv] attention output in ``out_dtype``.
    """
    B, K, R, _ = q.shape
    acc = jnp.promote_types(q.dtype, jnp.float32)
    first, starts, ends, total = work_list(lengths, Tq, static, num_splits)
    init = Partial(
        m=jnp.full((B, K, R), -jnp.inf, acc),
        l=jnp.zeros((B, K, R), acc),
        o=jnp.zeros((B, K, R, Hv), acc),
    )

    def body(i, carry):
        state, caches = carry
        b = jnp.searchsorted(ends, i, side="right")  # work item i is split j of row b
        j = first[b] + i - starts[b]
        k, v, pos, lo = fetch(caches, b, j)
        part = split_partial(q[b], k, v, pos, lo, lengths[b], Tq, static)
        new = merge(jax.tree.map(lambda x: x[b], state), part)
        state = jax.tree.map(lambda x, y: x.at[b].set(y), state, new)
        # The caches go round the loop behind a barrier: XLA then cannot treat them as loop
        # invariants and hoist a whole-cache conversion out of the loop (XLA CPU slices bf16
        # through f32, and would convert the entire cache once per call).
        return state, jax.lax.optimization_barrier(caches)

    state, _ = jax.lax.fori_loop(0, total, body, (init, caches))
    return finish(state, out_dtype)  # [B, K, R, Hv]


def group_queries(query, B: int, Tq: int, K: int, G: int, H: int):
    """[*B, Tq, N, H] -> [B, K, R, H] with row r = t·G + g."""
    q = jnp.reshape(query, (B, Tq, K, G, H))
    q = jnp.transpose(q, (0, 2, 1, 3, 4))  # [B, K, Tq, G, H]
    return jnp.reshape(q, (B, K, Tq * G, H))  # [B, K, R, H]


def ungroup(out, batch_shape, Tq: int, K: int, G: int, Hv: int):
    """[B, K, R, Hv] -> [*B, Tq, N, Hv]."""
    B = out.shape[0]
    out = jnp.reshape(out, (B, K, Tq, G, Hv))
    out = jnp.transpose(out, (0, 2, 1, 3, 4))  # [B, Tq, K, G, Hv]
    return jnp.reshape(out, batch_shape + (Tq, K * G, Hv))  # [*B, Tq, N, Hv]


def check_common(scale, logits_soft_cap, local_window_size, H: int):
    """Checks shared by the contiguous and paged entry points. Returns (scale, cap, left)."""
    scale, logits_soft_cap, window = spec.options(H, scale, logits_soft_cap, local_window_size, None)
    return scale, logits_soft_cap, None if window is None else window[0]


def check_lengths(lengths, S: int, name: str = "lengths"):
    """``[*B]`` lengths (dtype and shape checked by ``spec.check_arrays``) in ``[0, S]``, checked
    eagerly when concrete -> int32 ``[B]``."""
    if lengths is None:
        raise TypeError(f"{name}: expected an integer array [*B], got None")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > S):
            raise ValueError(f"{name}: expected values in [0, {S}] (the cache size), got {values.tolist()}")
    return jnp.reshape(jnp.asarray(lengths, jnp.int32), (-1,))


def poison_rows(out, bad):
    """NaN in every output of the rows flagged ``bad [B]`` (misuse under jit must show)."""
    nan = jnp.asarray(jnp.nan, out.dtype)
    return jnp.where(bad[:, None, None, None], nan, out)  # [B, K, R, Hv]


@functools.partial(jax.jit, static_argnames=("static", "num_splits", "Tq"))
def _decode(q, key_cache, value_cache, lengths, *, static: Static, num_splits: int, Tq: int):
    """q [B, K, R, H], caches [B, S, K, H|Hv], lengths [B] -> [B, K, R, Hv]."""
    B, S, K, H = key_cache.shape
    Hv = value_cache.shape[-1]
    c = static.split_size

    def fetch(caches, b, j):
        key_cache, value_cache = caches
        start = jnp.minimum(j * c, S - c).astype(b.dtype)  # the last split is clamped inside the cache
        zero = jnp.zeros((), b.dtype)
        k = jax.lax.dynamic_slice(key_cache, (b, start, zero, zero), (1, c, K, H))[0]  # [c, K, H]
        v = jax.lax.dynamic_slice(value_cache, (b, start, zero, zero), (1, c, K, Hv))[0]  # [c, K, Hv]
        return k, v, start + jnp.arange(c), j * c

    if num_splits == 1:
        # One split holds the whole cache: nothing to skip, so no loop; all rows at once, as
        # batched matrix products (for a cache this small they beat the products and sums of
        # the loop, 2-5x at G=1 and small H: benchmarks/bench_toy_decode.py).
        one = jax.vmap(lambda q, k, v, n: split_partial(q, k, v, jnp.arange(S), 0, n, Tq, static, dots=True))
        out = finish(one(q, key_cache, value_cache, lengths), q.dtype)  # [B, K, R, Hv]
    else:
        out = run_splits(q, lengths, (key_cache, value_cache), fetch, Tq, Hv, static, num_splits, q.dtype)
    # Under jit the lengths are not checked eagerly: a row outside [0, S] returns NaN.
    return poison_rows(out, (lengths < 0) | (lengths > S))


def default_split_size(S: int, K: int, H: int, R: int) -> int:
    """Cache positions per split for ``num_splits=None``: about DEFAULT_SPLIT_BYTES of fp32
    logit products ``[c, K, H, R8]`` (R query rows per kv head, rounded up to 8)."""
    per_position = K * H * (-(-R // 8) * 8) * 4
    return max(1, min(S, DEFAULT_SPLIT_BYTES // per_position))


def decode_attention(query, key_cache, value_cache, *, lengths, scale=None, logits_soft_cap=None,
                     local_window_size=None, num_splits=None):
    """Attention of a few new tokens over a KV cache, reading each needed K/V byte once.

    Query token ``t`` of row ``b`` sits at cache position ``lengths[b] - Tq + t`` (its own key
    is already in the cache, bottom-right causal) and sees the cache positions
    ``<= lengths[b] - Tq + t``: the same as ``jattn.dot_product_attention(q, k[:len],
    v[:len], is_causal=True, causal_alignment='bottom_right')`` per row. A row with
    ``lengths = 0`` returns 0. Positions ``>= lengths`` are never read into the result (they
    may hold anything, NaN included). Logits and accumulation are fp32 (float64 for float64).
    Forward only (a ``lax.fori_loop`` with a data-dependent trip count).

    Args:
      query: ``[*B, Tq, N, H]`` new query tokens.
      key_cache: ``[*B, S, K, H]`` (N a multiple of K: GQA/MQA).
      value_cache: ``[*B, S, K, Hv]``.
      lengths: ``[*B]`` integer valid positions per row, in ``[0, S]`` (checked eagerly; under
        ``jit`` a row outside the range returns NaN).
      scale: logit scale, default ``1/sqrt(H)``.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)``.
      local_window_size: ``int`` or ``(left, right)``: query at position p also needs keys at
        ``>= p - left`` (right is implied by causality). Splits wholly before the window are
        skipped.
      num_splits: splits per row ``J`` (the split size is ``ceil(S / J)``); None picks a size
        whose logit products fit the CPU cache (``default_split_size``: 256 positions at K=8,
        H=128, G=4, Tq=1). With one split (a small cache) every row runs at once without the
        loop.

    Returns:
      ``[*B, Tq, N, Hv]`` in the dtype of ``query``.
    """
    batch_shape, Tq, N, H, S, K, Hv = spec.check_arrays(
        query, key_cache, value_cache, key_value_seq_lengths=lengths, T="Tq", nonempty=True,
        names={"key": "key_cache", "value": "value_cache", "key_value_seq_lengths": "lengths"})
    scale, cap, left = check_common(scale, logits_soft_cap, local_window_size, H)
    lengths = check_lengths(lengths, S)
    if num_splits is None:
        c = default_split_size(S, K, H, Tq * (N // K))
    else:
        if not isinstance(num_splits, (int, np.integer)) or isinstance(num_splits, bool) or num_splits < 1:
            raise ValueError(f"num_splits: expected a positive int, got {num_splits!r}")
        c = -(-S // min(int(num_splits), S))
    B, G = math.prod(batch_shape), N // K
    q = group_queries(query, B, Tq, K, G, H)  # [B, K, R, H]
    static = Static(split_size=c, scale=scale, logits_soft_cap=cap, window_left=left)
    out = _decode(
        q, jnp.reshape(key_cache, (B, S, K, H)), jnp.reshape(value_cache, (B, S, K, Hv)), lengths,
        static=static, num_splits=-(-S // c), Tq=Tq,
    )  # [B, K, R, Hv]
    return ungroup(out, batch_shape, Tq, K, G, Hv)
