"""Block-sparse flash attention for one head, driven by a ``BlockMask`` row.

Shape glossary: Tp/Sp query/key lengths padded to block multiples, bq/bk block sizes,
nq = Tp/bq, nk = Sp/bk, d_k key head dim, d_v value head dim.

Forward: for each query block i, an online softmax over the key blocks its row of the block
mask lists: first the partial ones (``mask_mod`` evaluated on the tile), then the full ones
(no mask evaluation). Each list is a loop of ``count`` steps; under ``vmap`` over heads and
batch the counts become a batched loop bound and JAX runs the maximum count, never all blocks.
Backward (FlashAttention-2): for each key block j, the query blocks of the transposed view;
dK, dV per key block, dQ and the gradients of the score_mod's closed-over arrays in carries.

Semantics: a score_mod result of ``-inf`` hides an entry like a mask; NaN is not hidden and
propagates to the rows that see it. A row that sees nothing gives 0 (lse ``-inf``) and zero
gradients. Arithmetic runs in fp32, or float64 for float64 inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.flex import convert


class Static(NamedTuple):
    """Hashable settings of one call."""

    T: int
    S: int
    bq: int
    bk: int
    scale: float
    score_mod: convert.Converted | None
    mask_mod: convert.Converted | None


class Rows(NamedTuple):
    """One (b, h) row of a ``BlockMask`` (int32)."""

    kv_num: jax.Array  # [nq]
    kv_idx: jax.Array  # [nq, nk]
    full_kv_num: jax.Array  # [nq]
    full_kv_idx: jax.Array  # [nq, nk]
    q_num: jax.Array  # [nk]
    q_idx: jax.Array  # [nk, nq]
    full_q_num: jax.Array  # [nk]
    full_q_idx: jax.Array  # [nk, nq]


class Inputs(NamedTuple):
    """Padded inputs of one head, the mods' index arguments and their consts."""

    q: jax.Array  # [Tp, d_k]
    k: jax.Array  # [Sp, d_k]
    v: jax.Array  # [Sp, d_v]
    b: jax.Array  # [] int32
    h: jax.Array  # [] int32
    score_consts: tuple  # arrays the score_mod closed over
    mask_consts: tuple  # arrays the mask_mod closed over


def _rows(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _ids(st: Static, i, j):
    """Clamped global indices the mods see, and which rows/keys are real: [bq], [bk]."""
    q_ids = (i * st.bq).astype(jnp.int32) + jnp.arange(st.bq, dtype=jnp.int32)  # [bq]
    kv_ids = (j * st.bk).astype(jnp.int32) + jnp.arange(st.bk, dtype=jnp.int32)  # [bk]
    real = (q_ids < st.T)[:, None] & (kv_ids < st.S)[None, :]  # [bq, bk]
    return jnp.minimum(q_ids, st.T - 1), jnp.minimum(kv_ids, st.S - 1), real


def _score_fn(st: Static, a: Inputs, q_ids, kv_ids):
    """scores [bq, bk], score consts -> modified scores [bq, bk] (identity without a mod)."""
    if st.score_mod is None:
        return lambda s, consts: s
    return lambda s, consts: convert.on_tile(st.score_mod, consts, s, a.b, a.h, q_ids, kv_ids).astype(s.dtype)


def _visible(st: Static, a: Inputs, logits, q_ids, kv_ids, real, partial: bool):
    """bool [bq, bk] or None: mask_mod and padding on partial tiles, ``-inf`` scores always."""
    parts = []
    if partial:
        parts.append(real)
        if st.mask_mod is not None:
            parts.append(convert.on_tile(st.mask_mod, a.mask_consts, a.b, a.h, q_ids, kv_ids))
    if st.score_mod is not None:
        parts.append(logits != -jnp.inf)  # a score_mod hides an entry by returning -inf
    return functools.reduce(jnp.logical_and, parts) if parts else None


def _forward(st: Static, a: Inputs, r: Rows):
    nq = a.q.shape[0] // st.bq
    dt = a.q.dtype
    d_v = a.v.shape[1]
    q_scaled = a.q * st.scale  # [Tp, d_k]; scaling q once keeps the [bq, bk] tiles to a bare q kᵀ

    def q_block(i):
        q_blk = _rows(q_scaled, i, st.bq)  # [bq, d_k]

        def step(n, carry, indices, partial):
            m, l, acc = carry
            j = indices[i, n]
            k_blk, v_blk = _rows(a.k, j, st.bk), _rows(a.v, j, st.bk)  # [bk, d_k], [bk, d_v]
            q_ids, kv_ids, real = _ids(st, i, j)
            raw = jnp.einsum("qd,kd->qk", q_blk, k_blk)  # [bq, bk]: q kᵀ · scale
            logits = _score_fn(st, a, q_ids, kv_ids)(raw, a.score_consts)
            vis = _visible(st, a, logits, q_ids, kv_ids, real, partial)
            if vis is not None:
                logits = jnp.where(vis, logits, -jnp.inf)  # [bq, bk]
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [bq]; NaN propagates
            m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
            p = jnp.exp(logits - m_safe[:, None])  # [bq, bk]; 0 where hidden
            alpha = jnp.exp(m - m_safe)  # [bq]
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[:, None] * acc + jnp.einsum("qk,kd->qd", p, v_blk)  # [bq, d_v]
            return m_new, l, acc

        carry = (jnp.full((st.bq,), -jnp.inf, dt), jnp.zeros((st.bq,), dt), jnp.zeros((st.bq, d_v), dt))
        carry = jax.lax.fori_loop(0, r.kv_num[i], functools.partial(step, indices=r.kv_idx, partial=True), carry)
        carry = jax.lax.fori_loop(
            0, r.full_kv_num[i], functools.partial(step, indices=r.full_kv_idx, partial=False), carry
        )
        m, l, acc = carry
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        out = jnp.where(seen[:, None], acc / safe_l[:, None], acc)  # [bq, d_v]; NaN rows stay NaN
        lse = jnp.where(seen, m + jnp.log(safe_l), jnp.where(jnp.isnan(l), jnp.nan, -jnp.inf))
        return out, lse

    out, lse = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))  # [nq, bq, d_v], [nq, bq]
    return out.reshape(nq * st.bq, d_v), lse.reshape(nq * st.bq)  # [Tp, d_v], [Tp]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flex_head(st: Static, a: Inputs, r: Rows):
    """(out [Tp, d_v], lse [Tp]) of one head; differentiable in q, k, v and the score consts."""
    return _forward(st, a, r)


def _fwd(st: Static, a: Inputs, r: Rows):
    out, lse = _forward(st, a, r)
    return (out, lse), (a, r, out, lse)


def _zeros_like_float(x):
    return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else None


def _bwd(st: Static, res, cotangents):
    a, r, out, lse = res
    d_out, d_lse = cotangents  # [Tp, d_v], [Tp]
    nk = a.k.shape[0] // st.bk
    delta = jnp.sum(d_out * out, axis=-1) - d_lse  # [Tp]; the lse cotangent folds into delta
    is_float = [jnp.issubdtype(c.dtype, jnp.inexact) for c in a.score_consts]
    q_scaled = a.q * st.scale  # [Tp, d_k]

    def kv_block(carry, j):
        k_blk, v_blk = _rows(a.k, j, st.bk), _rows(a.v, j, st.bk)  # [bk, d_k], [bk, d_v]

        def step(n, inner, indices, partial):
            dk, dv, dq_all, dconsts = inner
            i = indices[j, n]
            q_blk, do_blk = _rows(q_scaled, i, st.bq), _rows(d_out, i, st.bq)  # [bq, d_k], [bq, d_v]
            lse_blk, delta_blk = _rows(lse, i, st.bq), _rows(delta, i, st.bq)  # [bq]
            q_ids, kv_ids, real = _ids(st, i, j)
            raw = jnp.einsum("qd,kd->qk", q_blk, k_blk)  # [bq, bk]: q kᵀ · scale
            score = _score_fn(st, a, q_ids, kv_ids)
            floats = tuple(c for c, f in zip(a.score_consts, is_float) if f)

            def with_floats(s, fl):
                it = iter(fl)
                return score(s, tuple(next(it) if f else c for c, f in zip(a.score_consts, is_float)))

            logits, score_vjp = jax.vjp(with_floats, raw, floats)
            vis = _visible(st, a, logits, q_ids, kv_ids, real, partial)
            lse_safe = jnp.where(lse_blk > -jnp.inf, lse_blk, jnp.inf)  # a row that saw nothing: P = 0
            shifted = logits - lse_safe[:, None]  # [bq, bk]
            if vis is not None:
                shifted = jnp.where(vis, shifted, -jnp.inf)
            p = jnp.exp(shifted)  # [bq, bk]
            dv = dv + jnp.einsum("qk,qd->kd", p, do_blk)  # [bk, d_v]
            dp = jnp.einsum("qd,kd->qk", do_blk, v_blk)  # [bq, bk]
            ds = p * (dp - delta_blk[:, None])  # [bq, bk]: gradient of the modified scores
            d_raw, d_floats = score_vjp(ds)  # d_raw [bq, bk]: gradient of q kᵀ · scale
            dq_blk = jnp.einsum("qk,kd->qd", d_raw, k_blk) * st.scale  # [bq, d_k]; scale on the small side
            dq_all = jax.lax.dynamic_update_slice_in_dim(dq_all, _rows(dq_all, i, st.bq) + dq_blk, i * st.bq, axis=0)
            dk = dk + jnp.einsum("qk,qd->kd", d_raw, q_blk)  # [bk, d_k]; q_blk carries the scale
            dconsts = tuple(x + y for x, y in zip(dconsts, d_floats))
            return dk, dv, dq_all, dconsts

        dq_all, dconsts = carry
        inner = (jnp.zeros_like(k_blk), jnp.zeros_like(v_blk), dq_all, dconsts)
        inner = jax.lax.fori_loop(0, r.q_num[j], functools.partial(step, indices=r.q_idx, partial=True), inner)
        inner = jax.lax.fori_loop(
            0, r.full_q_num[j], functools.partial(step, indices=r.full_q_idx, partial=False), inner
        )
        dk, dv, dq_all, dconsts = inner
        return (dq_all, dconsts), (dk, dv)

    floats0 = tuple(jnp.zeros_like(c) for c, f in zip(a.score_consts, is_float) if f)
    (dq, dfloats), (dk, dv) = jax.lax.scan(kv_block, (jnp.zeros_like(a.q), floats0), jnp.arange(nk, dtype=jnp.int32))
    it = iter(dfloats)
    d_score_consts = tuple(next(it) if f else None for f in is_float)
    grads = Inputs(
        q=dq, k=dk.reshape(a.k.shape), v=dv.reshape(a.v.shape), b=None, h=None,
        score_consts=d_score_consts, mask_consts=tuple(None for _ in a.mask_consts),
    )
    return grads, jax.tree.map(lambda _: None, r)


flex_head.defvjp(_fwd, _bwd)
