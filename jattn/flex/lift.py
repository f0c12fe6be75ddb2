"""The flex kernels lifted over batch (and heads) with ``jax.vmap``.

Shape glossary: B batch (flattened), T query length, S key length, K kv heads, G query heads
per kv head (N = K·G), H key head dim, Hv value head dim, Tp/Sp lengths padded to block
multiples; Bm in {1, B}, (Km, Gm) in {(1, 1), (K, G)}: a size-1 axis is broadcast.

``dense`` lifts the one-head reference over heads and batch. ``chunked`` lifts the block-sparse
loop of one batch row's heads (``jattn.flex.kernel.flex_heads``, whose tile steps are vmapped
over the heads) over batch, or over heads too when the block mask differs per head.
The mods receive ``b`` (the batch row) and ``h`` (the query head, 0..N-1). Dense ``mask`` /
``bias`` arrays (``dot_product_attention``'s) enter the block-sparse kernel tile by tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn.flex.dense import dense_head
from jattn.flex.kernel import Inputs, Rows, Static, flex_heads


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
    ``rows``, the BlockMask arrays [Bm, Nm, ...]. Returns out [B, T, K, G, Hv], lse [B, T, K, G].

    A block mask shared by the heads (Nm = 1) runs all heads of a batch row in one loop
    (``flex_heads`` on [T, K, G, H]: the tiles are sliced from the input layout, no head-major
    copy of q, k, v); one that differs per head runs each head's own loop under ``vmap``.
    """
    B, T, K, G, _ = q.shape
    S = k.shape[1]
    Tp, Sp = -(-T // st.bq) * st.bq, -(-S // st.bk) * st.bk
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0), (0, 0)))  # [B, Tp, K, G, H]
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))  # [B, Sp, K, H]
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))  # [B, Sp, K, Hv]
    grid = ((0, 0),) * 3 + ((0, Tp - T), (0, Sp - S))
    mask = None if mask is None else jnp.pad(mask, grid, constant_values=False)  # [Bm, Km, Gm, Tp, Sp]
    bias = None if bias is None else jnp.pad(bias, grid)  # [Bm, Km, Gm, Tp, Sp]
    per_head = rows.kv_num.shape[1] > 1  # a block-mask row per head: one loop per head
    mask, mb = _squeeze_batch(mask)
    bias, bb = _squeeze_batch(bias)
    rows, rb = zip(*(_squeeze_batch(x) for x in rows))  # [(Bm,) Nm, ...]
    b_ids, h_ids = _head_ids(B, K, G)

    def heads(q, k, v, mask, bias, b, r):
        return flex_heads(st, Inputs(q, k, v, mask, bias, b, h_ids, s_consts, m_consts), Rows(*(x[0] for x in r)))

    if per_head:
        heads = _per_head(st, s_consts, m_consts, K, G)
    out, lse = jax.vmap(heads, in_axes=(0, 0, 0, mb, bb, 0, Rows(*rb)))(q, k, v, mask, bias, b_ids, Rows(*rows))
    return out[:, :T], lse[:, :T]  # [B, T, K, G, Hv], [B, T, K, G]


def _squeeze_batch(x):
    """[Bm, ...] -> (x without a size-1 batch axis, its vmap axis over B)."""
    if x is None or x.shape[0] > 1:
        return x, None if x is None else 0
    return x[0], None


def _per_head(st: Static, s_consts, m_consts, K: int, G: int):
    """One batch row's heads, each with its own block-mask row [N, ...]: ``flex_heads`` on one
    head at a time under ``vmap`` over K and G."""

    def one_head(q, k, v, mask, bias, b, h, r):  # q [Tp, H], k [Sp, H], mask/bias [1, 1, Tp, Sp], h []
        a = Inputs(q[:, None, None], k[:, None], v[:, None], mask, bias, b, h[None, None], s_consts, m_consts)
        out, lse = flex_heads(st, a, r)
        return out[:, 0, 0], lse[:, 0, 0]  # [Tp, Hv], [Tp]

    def heads(q, k, v, mask, bias, b, r):  # mask/bias [Km, Gm, Tp, Sp], r [N, ...]
        per = [None if x is None or x.shape[:2] == (1, 1) else 0 for x in (mask, bias)]
        mask, bias = (None if x is None else x[:, :, None, None] if p == 0 else x for x, p in zip((mask, bias), per))
        r = Rows(*(x.reshape((K, G) + x.shape[1:]) for x in r))  # [K, G, ...]
        over_g = jax.vmap(one_head, in_axes=(1, None, None, *per, None, 0, 0), out_axes=(1, 1))
        over_k = jax.vmap(over_g, in_axes=(1, 1, 1, *per, None, 0, 0), out_axes=(1, 1))
        return over_k(q, k, v, mask, bias, b, _head_ids(1, K, G)[1], r)  # [Tp, K, G, Hv], [Tp, K, G]

    return heads
