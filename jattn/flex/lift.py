"""The single-head flex kernels lifted over query heads, kv heads and batch with ``jax.vmap``.

Shape glossary: B batch (flattened), T query length, S key length, K kv heads, G query heads
per kv head (N = K·G), H key head dim, Hv value head dim, Tp/Sp lengths padded to block
multiples; Bm in {1, B}, (Km, Gm) in {(1, 1), (K, G)}: a size-1 axis is broadcast.

The mods receive ``b`` (the batch row) and ``h`` (the query head, 0..N-1). Dense ``mask`` /
``bias`` arrays (``dot_product_attention``'s) enter the block-sparse kernel tile by tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn.flex.dense import dense_head
from jattn.flex.kernel import Inputs, Rows, Static, flex_head


def _squeeze_broadcast(x):
    """[Bm, Km, Gm, ...] -> (x without its size-1 leading axes, vmap axes for B, K, G)."""
    if x is None:
        return None, (None, None, None)
    axes = tuple(0 if d > 1 else None for d in x.shape[:3])
    return jnp.squeeze(x, tuple(i for i, ax in enumerate(axes) if ax is None)), axes


def _rows_split(x, K: int, G: int):
    """Block-mask array [Bm, Nm, ...] -> [Bm, Km, Gm, ...] (Nm = 1: Km = Gm = 1)."""
    Bm, Nm = x.shape[:2]
    heads = (K, G) if Nm > 1 else (1, 1)
    return jnp.reshape(x, (Bm,) + heads + x.shape[2:])  # [Bm, Km, Gm, ...]


def _head_ids(B: int, K: int, G: int):
    return jnp.arange(B, dtype=jnp.int32), jnp.arange(K * G, dtype=jnp.int32).reshape(K, G)  # [B], [K, G]


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense(mods, scale, q, k, v, s_consts, m_consts):
    """q [B, T, K, G, H], k [B, S, K, H], v [B, S, K, Hv] -> (out [B, T, K, G, Hv], lse [B, T, K, G])."""
    B, _, K, G, _ = q.shape

    def one_head(q, k, v, b, h):
        return dense_head(q, k, v, b, h, *mods, s_consts, m_consts, scale)

    over_g = jax.vmap(one_head, in_axes=(1, None, None, None, 0), out_axes=(1, 1))
    over_k = jax.vmap(over_g, in_axes=(1, 1, 1, None, 0), out_axes=(1, 1))
    over_b = jax.vmap(over_k, in_axes=(0, 0, 0, 0, None))
    return over_b(q, k, v, *_head_ids(B, K, G))


def chunked(st: Static, q, k, v, mask, bias, s_consts, m_consts, rows: Rows):
    """Block-sparse: like ``dense``, plus ``mask``/``bias`` [Bm, Km, Gm, T, S] or None and
    ``rows``, the BlockMask arrays [Bm, Nm, ...]. Returns out [B, T, K, G, Hv], lse [B, T, K, G]."""
    B, T, K, G, _ = q.shape
    S = k.shape[1]
    Tp, Sp = -(-T // st.bq) * st.bq, -(-S // st.bk) * st.bk
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))  # [B, Tp, K, G, H]
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))  # [B, Sp, K, H]
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))  # [B, Sp, K, Hv]
    grid = ((0, 0),) * 3 + ((0, Tp - T), (0, Sp - S))
    mask = None if mask is None else jnp.pad(mask, grid, constant_values=False)  # [Bm, Km, Gm, Tp, Sp]
    bias = None if bias is None else jnp.pad(bias, grid)  # [Bm, Km, Gm, Tp, Sp]
    mask, (mb, mk, mg) = _squeeze_broadcast(mask)
    bias, (bb, bk_, bg) = _squeeze_broadcast(bias)
    split = [_squeeze_broadcast(_rows_split(x, K, G)) for x in rows]
    rows = Rows(*(x for x, _ in split))
    rb, rk, rg = (Rows(*(axes[n] for _, axes in split)) for n in range(3))

    def one_head(q, k, v, mask, bias, b, h, r):
        return flex_head(st, Inputs(q, k, v, mask, bias, b, h, s_consts, m_consts), r)

    over_g = jax.vmap(one_head, in_axes=(1, None, None, mg, bg, None, 0, rg), out_axes=(1, 1))
    over_k = jax.vmap(over_g, in_axes=(1, 1, 1, mk, bk_, None, 0, rk), out_axes=(1, 1))
    over_b = jax.vmap(over_k, in_axes=(0, 0, 0, mb, bb, 0, None, rb))
    out, lse = over_b(q, k, v, mask, bias, *_head_ids(B, K, G), rows)
    return out[:, :T], lse[:, :T]  # [B, T, K, G, Hv], [B, T, K, G]
