"""Block-sparse flash attention for one head, driven by a ``BlockMask`` row: jattn's one loop.

Shape glossary: Tp/Sp query/key lengths padded to block multiples, bq/bk block sizes,
nq = Tp/bq, nk = Sp/bk, d_k key head dim, d_v value head dim.

Both ``flex_attention`` and ``dot_product_attention(implementation='chunked')`` run here: the
latter's built-ins are ready-made mods (``jattn.kernels.chunked``) and its dense ``mask``/``bias``
arrays are per-tile inputs. Each tile's logits are ``score_mod(q·kᵀ·scale) + bias``; an entry
is hidden by ``mask_mod``, the dense mask, a ``-inf`` bias or a ``-inf`` score_mod result.

Forward: for each query block i, an online softmax (``blockwise.fold``) over the key blocks its
row of the block mask lists: first the partial ones (``mask_mod`` and padding evaluated on the
tile), then the full ones (no mask evaluation). Each list is a loop of ``count`` steps; under
``vmap`` over heads and batch a batched count becomes a batched loop bound and JAX runs the
maximum count, never all blocks. Backward (FlashAttention-2, ``blockwise.logit_grads``): for
each key block j, the query blocks of the transposed view; dK, dV per key block, dQ, dbias
and the gradients of the score_mod's closed-over arrays in carries.

Semantics: NaN is not hidden and propagates to the rows that see it; a NaN or inf in a q, k
or v row that a row cannot see never reaches that row (``jattn.core._finite``). A row that sees
nothing gives 0 (lse ``-inf``) and zero gradients. Arithmetic runs in the inputs' dtype
(callers cast to fp32, or keep float64).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core import _finite
from jattn.kernels import blockwise
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
    mask: jax.Array | None  # [Tp, Sp] bool (dense mask, False where padded)
    bias: jax.Array | None  # [Tp, Sp] (dense bias, 0 where padded)
    b: jax.Array  # [] int32
    h: jax.Array  # [] int32
    score_consts: tuple  # arrays the score_mod closed over
    mask_consts: tuple  # arrays the mask_mod closed over


class _Finite(NamedTuple):
    """q, k, v with non-finite rows zeroed (q also scaled) and the NaN to add where such a row is seen."""

    q: jax.Array  # [Tp, d_k]: q · scale
    k: jax.Array  # [Sp, d_k]
    v: jax.Array  # [Sp, d_v]
    q_nan: jax.Array  # [Tp]: NaN at non-finite query rows, else 0
    k_nan: jax.Array  # [Sp]
    v_bad: jax.Array  # [Sp] bool


def _split(st: Static, a: Inputs) -> _Finite:
    """Once per head: scaling q here keeps each [bq, bk] score tile a bare q kᵀ."""
    (q, q_bad), (k, k_bad), (v, v_bad) = _finite.split(a.q), _finite.split(a.k), _finite.split(a.v)
    return _Finite(q * st.scale, k, v, _finite.nan_at(q_bad, q.dtype), _finite.nan_at(k_bad, k.dtype), v_bad)


def _rows(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _tile(x, i, j, st: Static):
    return None if x is None else jax.lax.dynamic_slice(x, (i * st.bq, j * st.bk), (st.bq, st.bk))


def _ids(st: Static, i, j):
    """Clamped global indices the mods see, and which rows/keys are real: [bq], [bk]."""
    q_ids = (i * st.bq).astype(jnp.int32) + jnp.arange(st.bq, dtype=jnp.int32)  # [bq]
    kv_ids = (j * st.bk).astype(jnp.int32) + jnp.arange(st.bk, dtype=jnp.int32)  # [bk]
    real = (q_ids < st.T)[:, None] & (kv_ids < st.S)[None, :]  # [bq, bk]
    return jnp.minimum(q_ids, st.T - 1), jnp.minimum(kv_ids, st.S - 1), real


def _score_fn(st: Static, a: Inputs, q_ids, kv_ids):
    """(scores [bq, bk], score consts) -> modified scores [bq, bk] (identity without a mod)."""
    if st.score_mod is None:
        return lambda s, consts: s
    return lambda s, consts: convert.on_tile(st.score_mod, consts, s, a.b, a.h, q_ids, kv_ids).astype(s.dtype)


def _logits(st: Static, a: Inputs, f: _Finite, i, j, scores, partial: bool, q_ids, kv_ids, real):
    """(logits [bq, bk], visible [bq, bk] or None) from the modified ``scores`` of tile (i, j).

    Visibility comes from the scores (-inf hides), the dense mask and bias tiles, and on
    partial tiles the mask_mod and padding; NaN of non-finite q/k rows is added afterwards
    (after score_mod, so that no mod can drop it, and visible unless something else hides it).
    """
    parts = []
    if st.score_mod is not None:
        parts.append(scores != -jnp.inf)  # a score_mod hides an entry by returning -inf
    logits = scores
    bias = _tile(a.bias, i, j, st)  # [bq, bk]
    if bias is not None:
        logits = logits + bias
        parts.append(bias != -jnp.inf)  # only -inf hides; a NaN bias propagates
    mask = _tile(a.mask, i, j, st)  # [bq, bk]
    if mask is not None:
        parts.append(mask)
    if partial:
        parts.append(real)
        if st.mask_mod is not None:
            parts.append(convert.on_tile(st.mask_mod, a.mask_consts, a.b, a.h, q_ids, kv_ids))
    logits = logits + _rows(f.q_nan, i, st.bq)[:, None] + _rows(f.k_nan, j, st.bk)[None, :]  # [bq, bk]
    return logits, functools.reduce(jnp.logical_and, parts) if parts else None


def _forward(st: Static, a: Inputs, r: Rows):
    nq = a.q.shape[0] // st.bq
    d_v = a.v.shape[1]
    f = _split(st, a)

    def q_block(i):
        q_blk = _rows(f.q, i, st.bq)  # [bq, d_k]

        def step(n, carry, indices, partial):
            j = indices[i, n]
            k_blk, v_blk = _rows(f.k, j, st.bk), _rows(f.v, j, st.bk)  # [bk, d_k], [bk, d_v]
            q_ids, kv_ids, real = _ids(st, i, j)
            raw = jnp.einsum("qd,kd->qk", q_blk, k_blk)  # [bq, bk]: q kᵀ · scale
            scores = _score_fn(st, a, q_ids, kv_ids)(raw, a.score_consts)
            logits, vis = _logits(st, a, f, i, j, scores, partial, q_ids, kv_ids, real)
            return blockwise.fold(carry, logits, vis, v_blk, _rows(f.v_bad, j, st.bk))

        carry = blockwise.init_carry_like(q_blk, d_v)
        carry = jax.lax.fori_loop(0, r.kv_num[i], functools.partial(step, indices=r.kv_idx, partial=True), carry)
        carry = jax.lax.fori_loop(
            0, r.full_kv_num[i], functools.partial(step, indices=r.full_kv_idx, partial=False), carry
        )
        out, lse = blockwise.finalize(carry)  # rows that saw nothing: 0 and -inf
        return _finite.with_nan_rows(out, lse), lse  # [bq, d_v], [bq]

    out, lse = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))  # [nq, bq, d_v], [nq, bq]
    return out.reshape(nq * st.bq, d_v), lse.reshape(nq * st.bq)  # [Tp, d_v], [Tp]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flex_head(st: Static, a: Inputs, r: Rows):
    """(out [Tp, d_v], lse [Tp]) of one head; differentiable in q, k, v, bias and the score consts."""
    return _forward(st, a, r)


def _fwd(st: Static, a: Inputs, r: Rows):
    out, lse = _forward(st, a, r)
    return (out, lse), (a, r, out, lse)


def _bwd(st: Static, res, cotangents):
    a, r, out, lse = res
    d_out, d_lse = cotangents  # [Tp, d_v], [Tp]
    nk = a.k.shape[0] // st.bk
    f = _split(st, a)
    delta = jnp.sum(d_out * out, axis=-1) - d_lse  # [Tp]; the lse cotangent folds into delta
    is_float = [jnp.issubdtype(c.dtype, jnp.inexact) for c in a.score_consts]

    def kv_block(carry, j):
        k_blk, v_blk = _rows(f.k, j, st.bk), _rows(f.v, j, st.bk)  # [bk, d_k], [bk, d_v]

        def step(n, inner, indices, partial):
            dk, dv, dq_all, dbias_all, dconsts = inner
            i = indices[j, n]
            q_blk, do_blk = _rows(f.q, i, st.bq), _rows(d_out, i, st.bq)  # [bq, d_k], [bq, d_v]
            q_ids, kv_ids, real = _ids(st, i, j)
            raw = jnp.einsum("qd,kd->qk", q_blk, k_blk)  # [bq, bk]: q kᵀ · scale
            score = _score_fn(st, a, q_ids, kv_ids)
            floats = tuple(c for c, fl in zip(a.score_consts, is_float) if fl)

            def with_floats(s, fl):
                it = iter(fl)
                return score(s, tuple(next(it) if isf else c for c, isf in zip(a.score_consts, is_float)))

            scores, score_vjp = jax.vjp(with_floats, raw, floats)
            logits, vis = _logits(st, a, f, i, j, scores, partial, q_ids, kv_ids, real)
            ds, dv_t = blockwise.logit_grads(
                logits, vis, v_blk, do_blk, _rows(lse, i, st.bq), _rows(delta, i, st.bq)
            )  # [bq, bk], [bk, d_v]
            if dbias_all is not None:
                dbias_all = jax.lax.dynamic_update_slice(dbias_all, ds, (i * st.bq, j * st.bk))
            d_raw, d_floats = score_vjp(ds)  # d_raw [bq, bk]: gradient of q kᵀ · scale
            dq_blk = jnp.einsum("qk,kd->qd", d_raw, k_blk) * st.scale  # [bq, d_k]; scale on the small side
            dq_all = jax.lax.dynamic_update_slice_in_dim(dq_all, _rows(dq_all, i, st.bq) + dq_blk, i * st.bq, axis=0)
            dk = dk + jnp.einsum("qk,qd->kd", d_raw, q_blk)  # [bk, d_k]; q_blk carries the scale
            dconsts = tuple(x + y for x, y in zip(dconsts, d_floats))
            return dk, dv + dv_t, dq_all, dbias_all, dconsts

        inner = (jnp.zeros_like(k_blk), jnp.zeros_like(v_blk)) + carry
        inner = jax.lax.fori_loop(0, r.q_num[j], functools.partial(step, indices=r.q_idx, partial=True), inner)
        inner = jax.lax.fori_loop(
            0, r.full_q_num[j], functools.partial(step, indices=r.full_q_idx, partial=False), inner
        )
        dk, dv, *carry = inner
        return tuple(carry), (dk, dv)

    floats0 = tuple(jnp.zeros_like(c) for c, fl in zip(a.score_consts, is_float) if fl)
    dbias0 = None if a.bias is None else jnp.zeros_like(a.bias)
    init = (jnp.zeros_like(a.q), dbias0, floats0)
    (dq, dbias, dfloats), (dk, dv) = jax.lax.scan(kv_block, init, jnp.arange(nk, dtype=jnp.int32))
    it = iter(dfloats)
    grads = Inputs(
        q=dq, k=dk.reshape(a.k.shape), v=dv.reshape(a.v.shape), mask=None, bias=dbias, b=None, h=None,
        score_consts=tuple(next(it) if fl else None for fl in is_float),
        mask_consts=tuple(None for _ in a.mask_consts),
    )
    return grads, jax.tree.map(lambda _: None, r)


flex_head.defvjp(_fwd, _bwd)
