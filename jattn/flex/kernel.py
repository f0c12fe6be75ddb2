"""Block-sparse flash attention for the heads of one batch row that share a ``BlockMask`` row: jattn's one loop.

Shape glossary: K kv heads, G query heads per kv head, Tp/Sp query/key lengths padded to block
multiples, bq/bk block sizes, nq = Tp/bq, nk = Sp/bk, d_k key head dim, d_v value head dim.

Both ``flex_attention`` and ``dot_product_attention(implementation='chunked')`` run here: the
latter's built-ins are ready-made mods (``jattn.kernels.chunked``) and its dense ``mask``/``bias``
arrays are per-tile inputs. Each tile's logits are ``score_mod(q·kᵀ·scale) + bias``; an entry
is hidden by ``mask_mod``, the dense mask, a ``-inf`` bias or a ``-inf`` score_mod result.

Forward: for each query block i, an online softmax (``forward_tile``) over the key blocks its
row of the block mask lists: first the partial ones (``mask_mod`` and padding evaluated on the
tile), then the full ones (no mask evaluation). Each list is a loop of ``count`` steps; under
``vmap`` over batch rows (or heads, for a per-head block mask) a batched count becomes a
batched loop bound and JAX runs the maximum count, never all blocks. Backward
(FlashAttention-2): for each key block j, the query blocks of the transposed view, on key-major
tiles [bk, bq] (``backward_tile``); dK, dV per key block, dQ, dbias and the gradients of the
score_mod's closed-over arrays in carries.

Tile steps: ``init_carry``, ``forward_tile``, ``finalize_rows`` and ``backward_tile`` are the
whole per-tile algorithm, written for one head; they know a tile only through the callables
that give its scores (``score``) and its logits and visibility (``logits_fn``), so
sequence-parallel ring attention (``jattn.parallel.ring``) runs its tiles with them too: one
tile implementation in jattn. Here they are vmapped over the K·G heads inside the loops.

Layout: the forward slices each tile from q [Tp, K, G, d_k], k, v [Sp, K, d] as they come (a
tile's rows are contiguous there), zeroes its non-finite entries (and scales q) and puts its
head axes first; only one boolean reduction per call flags the non-finite rows. A score
matmul's rhs, which XLA:CPU's fast matmul takes as [d, n], is the exception: cutting it from
the [T, K, H] layout is a transposing copy per tile that runs as a slow elementwise loop (368
vs 43 us per [512, 8, 64] tile), so kᵀ [K, d_k, Sp] (forward) and qᵀ, dOᵀ in blocks
[nq, K, G, d, bq] (backward, key-major tiles: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ) are transposed once
per call. The backward, whose inner loop runs over query blocks, also puts the rows of q
and dO, lse and delta in head-major blocks once per call ([nq, K, G, bq, ...]): per step they
were transposing copies, and lse/delta sliced inside the exp fusion, 10-15% of its time.
A block mask known at trace time that visits few tiles per query block (``few_tiles``:
documents, sliding windows, causal or full at short T) has the backward transpose each
step's q and dO blocks instead of keeping qᵀ and dOᵀ: two arrays of q's size less.
A whole-array copy costs its passes and, since XLA:CPU allocates a call's temp memory anew
each call, the page faults of its fresh pages: the head-major copies of q, k, v that a
``vmap`` over heads makes (every head's loop slicing its own head) took 64 of a 65 MiB
forward temp at T = 8192 (N = 8, H = 64) and about half of a 16-document call's forward time.
dQ is accumulated transposed in blocks ([nq, K, G, d_k, bq], Kᵀ dSᵀ with the key block
transposed once per key block): a transposed lhs falls off XLA:CPU's fast matmul (1.6x its
time measured on [8, 128, 128] tiles).

Semantics: NaN is not hidden and propagates to the rows that see it; a NaN or inf in a q, k
or v row that a row cannot see never reaches that row (``jattn.core._finite``): such entries are
multiplied as zeros; a bad query row that sees a key, and a row that sees a bad key, get a
NaN softmax sum (so a NaN out and lse, whose NaN the backward's P = exp(logits - lse)
carries on); a row that sees a bad value row gets a NaN output. A row that sees nothing
gives 0 (lse ``-inf``) and zero gradients.
Arithmetic runs in the inputs' dtype (callers cast to fp32, or keep float64).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import _finite
from jattn.flex import convert

Carry = tuple[jax.Array, jax.Array, jax.Array]  # online softmax: m [bq], l [bq], acc [bq, d_v]


class Static(NamedTuple):
    """Hashable settings of one call."""

    T: int
    S: int
    bq: int
    bk: int
    scale: float
    score_mod: convert.Converted | None
    mask_mod: convert.Converted | None
    transposes_per_step: bool = False  # backward: qᵀ, dOᵀ per tile, not once per call (``few_tiles``)


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

    @classmethod
    def of(cls, bm) -> Rows:
        """The eight arrays of a ``BlockMask`` ([B, N, ...]: every row)."""
        return cls(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                   bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)


class Inputs(NamedTuple):
    """Padded inputs of the query heads of one batch row that share a block-mask row (K kv heads,
    G query heads each; K = G = 1 when the block mask differs per head), the mods' index
    arguments and their consts."""

    q: jax.Array  # [Tp, K, G, d_k]
    k: jax.Array  # [Sp, K, d_k]
    v: jax.Array  # [Sp, K, d_v]
    mask: jax.Array | None  # [Km, Gm, Tp, Sp] bool (dense mask, False where padded); (Km, Gm) = (1, 1) or (K, G)
    bias: jax.Array | None  # [Km, Gm, Tp, Sp] (dense bias, 0 where padded)
    b: jax.Array  # [] int32
    h: jax.Array  # [K, G] int32: the query heads
    score_consts: tuple  # arrays the score_mod closed over
    mask_consts: tuple  # arrays the mask_mod closed over


# ----------------------------------------------------------------------------------------
# Tile steps, shared with ring attention.
# ----------------------------------------------------------------------------------------


def init_carry(q_blk, d_v: int) -> Carry:
    """The empty online-softmax state of query rows ``q_blk [bq, d_k]``: running max -inf, sum 0,
    output 0, in q's dtype; built from ``q_blk`` (``*_like``) so that inside ``jax.shard_map``
    it varies over the same mesh axes as the queries (loop carries must)."""
    m = jnp.full_like(jnp.sum(q_blk, axis=-1), -jnp.inf)  # [bq]; d_k may be 0
    return m, jnp.zeros_like(m), jnp.zeros_like(m, shape=(q_blk.shape[0], d_v))


def _fold(carry: Carry, logits, vis, v_blk, v_nan) -> Carry:
    """Fold logits [bq, bk] (hidden where ``vis`` is False; None: all visible) and finite value
    rows ``v_blk [bk, d_v]`` into the state; rows that see a NaN of ``v_nan`` (``[bk]``, or
    ``[1]`` when ``vis`` is None) become NaN."""
    m, l, acc = carry
    if vis is not None:
        logits = jnp.where(vis, logits, -jnp.inf)  # [bq, bk]
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [bq]
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: 0; NaN stays NaN
    p = jnp.exp(logits - m_safe[:, None])  # [bq, bk]; exactly 0 where hidden
    alpha = jnp.exp(m - m_safe)  # [bq]; 0 while m is still -inf
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[:, None] * acc + jnp.einsum("qk,kd->qd", p, v_blk)  # [bq, d_v]
    return m_new, l, acc + _finite.nan_seen(v_nan, vis, p.shape[0])[:, None]


def forward_tile(carry: Carry, q_blk, kt_blk, v_blk, k_nan, v_nan, score, consts, logits_fn,
                 blk_nan=None) -> Carry:
    """Fold one [bq, bk] tile into the online-softmax state.

    Args:
      carry: (m [bq], l [bq], acc [bq, d_v]) from ``init_carry`` or the previous tile.
      q_blk: [bq, d_k] finite query rows times the scale (``_finite.zeroed``).
      kt_blk: [d_k, bk] finite key rows, transposed (the matmul's rhs as XLA:CPU's fast path
        takes it; a transposing copy per tile is a slow elementwise loop).
      v_blk: [bk, d_v] finite value rows.
      k_nan: [bk] NaN where the key row was non-finite, else 0 (``_finite.nan_rows``).
      v_nan: [bk] likewise for the value rows.
      score: ``score(s [bq, bk], consts) -> [bq, bk]``, the score_mod on this tile (or identity).
      consts: the arrays ``score`` closed over.
      logits_fn: ``scores -> (logits [bq, bk], visible [bq, bk] bool | None)``: bias and masks.
      blk_nan: optional precomputed ``(sum of k_nan, sum of v_nan)`` ([] each), used when every
        entry is visible.

    Returns:
      The new state. A row that sees a bad key gets a NaN sum (so a NaN lse and output), added
      after score_mod and masks so that no mod drops it.
    """
    raw = q_blk @ kt_blk  # [bq, bk]: q kᵀ · scale
    logits, vis = logits_fn(score(raw, consts))
    if vis is None:  # every row sees every key: a NaN sum (so lse) where a key is bad
        k_max, v_max = (jnp.sum(k_nan), jnp.sum(v_nan)) if blk_nan is None else blk_nan
        m, l, acc = _fold(carry, logits, None, v_blk, v_max[None])
        return m, l + k_max, acc
    # NaN columns, in the pass that applies vis: hidden ones stay hidden
    return _fold(carry, logits + k_nan[None, :], vis, v_blk, v_nan)  # [bq, bk]


def finalize_rows(carry: Carry, q_nan):
    """(out [bq, d_v], lse [bq]) of a finished state; ``q_nan [bq]`` (NaN where the query row
    was non-finite) poisons the rows that saw a key. Rows that saw nothing: 0 and -inf."""
    m, l, acc = carry
    l = l + jnp.where(l != 0, q_nan, 0)  # a bad query row that sees a key
    empty = l == 0
    safe_l = jnp.where(empty, 1.0, l)
    out = acc / safe_l[:, None]  # [bq, d_v]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))  # [bq]
    return _finite.with_nan_rows(out, lse), lse


def backward_tile(dk, dv, q_blk, qt_blk, do_blk, dot_blk, lse_blk, delta_blk, k_blk, kt_blk, v_blk, score, consts,
                  logits_fn, scale: float):
    """FlashAttention-2 backward of one tile, key-major: P = exp(logits - lse), dS = P ∘ (dP - delta).

    Args:
      dk: [bk, d_k] accumulator of the key block's gradient.
      dv: [bk, d_v] accumulator of the value block's gradient.
      q_blk: [bq, d_k] finite query rows times the scale; ``qt_blk`` its transpose [d_k, bq].
      do_blk: [bq, d_v] output cotangent; ``dot_blk`` its transpose [d_v, bq].
      lse_blk: [bq] the forward's logsumexp, +inf where it was -inf (P = 0 on rows that saw nothing).
      delta_blk: [bq] rowsum(dO ∘ O) minus the lse cotangent.
      k_blk: [bk, d_k] finite key rows; ``kt_blk`` its transpose [d_k, bk].
      v_blk: [bk, d_v] finite value rows.
      score: ``score(s [bk, bq], consts) -> [bk, bq]`` on the key-major tile.
      consts: the arrays ``score`` closed over.
      logits_fn: ``scores -> (logits [bk, bq], visible [bk, bq] | None)``.
      scale: the score scale (q_blk carries it already).

    Returns:
      (dk, dv, dqᵀ [d_k, bq] of this tile, dSᵀ [bk, bq] (the logits' gradient), the gradients of
      the floating ``consts`` (a tuple, integer consts left out)).
    """
    raw = k_blk @ qt_blk  # [bk, bq]: (q kᵀ · scale)ᵀ
    is_float = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]
    floats = tuple(c for c, fl in zip(consts, is_float) if fl)

    def with_floats(s, fl):
        it = iter(fl)
        return score(s, tuple(next(it) if isf else c for c, isf in zip(consts, is_float)))

    scores, score_vjp = jax.vjp(with_floats, raw, floats)
    logits, vis = logits_fn(scores)  # [bk, bq]
    shifted = logits - lse_blk[None, :]  # [bk, bq]
    if vis is not None:
        shifted = jnp.where(vis, shifted, -jnp.inf)  # mask before exp: no overflow when hidden
    p = jnp.exp(shifted)  # [bk, bq]: Pᵀ
    dv = dv + p @ do_blk  # [bk, d_v]
    dp = v_blk @ dot_blk  # [bk, bq]: dPᵀ
    ds = p * (dp - delta_blk[None, :])  # [bk, bq]: dSᵀ
    if vis is not None:
        ds = jnp.where(vis, ds, 0.0)  # a NaN delta (the row saw a NaN) stays off hidden keys
    d_raw, d_floats = score_vjp(ds)  # [bk, bq]: gradient of (q kᵀ · scale)ᵀ
    dk = dk + d_raw @ q_blk  # [bk, d_k]; q_blk carries the scale
    dq_t = (kt_blk @ d_raw) * scale  # [d_k, bq]; scale on the small side
    return dk, dv, dq_t, ds, d_floats


# ----------------------------------------------------------------------------------------
# The block-sparse loop over the heads that share a block-mask row.
# ----------------------------------------------------------------------------------------


def _rows(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _cols(x, i, size):
    """Columns ``i * size ...`` of the last axis."""
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=x.ndim - 1)


def _heads_first(x, n_heads: int):
    """Rows of a tile [L, <n_heads head axes>, ...] -> [<heads>, L, ...]: the head axes lead."""
    return jnp.moveaxis(x, 0, n_heads)


def _clean(tile, scale=None):
    """A tile with non-finite entries zeroed (the rows are flagged by ``_finite.nan_rows`` on
    the whole array), times ``scale`` if given."""
    tile = _finite.zeroed(tile)
    return tile if scale is None else tile * scale


def _finite_tile(x, i, size, n_heads: int, scale=None):
    """Rows ``i * size ...`` of q, k or v [L, K, (G,) d], head axes first: [K, (G,) size, d], finite."""
    return _heads_first(_clean(_rows(x, i, size), scale), n_heads)


def _row_blocks(x, size: int, n_heads: int):
    """x [L, <n_heads head axes>, ...] -> [L/size, <heads>, size, ...]: block i's rows with the
    head axes first, contiguous (a per-step slice is then a plain copy, or none)."""
    x = x.reshape((x.shape[0] // size, size) + x.shape[1:])  # [L/size, size, <heads>, ...]
    return jnp.moveaxis(x, 1, 1 + n_heads)


def _dense_tile(x, i, j, st: Static, kv_major: bool):
    """Tile (i, j) of a dense mask/bias [Km, Gm, Tp, Sp] -> [Km, Gm, bq, bk] ([.., bk, bq]
    when ``kv_major``), or [bq, bk] when it is shared by the heads (Km = Gm = 1)."""
    if x is None:
        return None
    tile = jax.lax.dynamic_slice(x, (0, 0, i * st.bq, j * st.bk), x.shape[:2] + (st.bq, st.bk))
    tile = jnp.swapaxes(tile, 2, 3) if kv_major else tile
    return tile[0, 0] if x.shape[:2] == (1, 1) else tile


def _over_heads(fn, kinds):
    """``fn`` of one head's tiles, vmapped over the heads [K, G, ...] of the batched arguments.

    ``kinds`` per argument: ``"kg"`` (one per query head, [K, G, ...]), ``"k"`` (one per kv
    head, [K, ...], shared by its G query heads), or None (shared by all heads).
    """
    inner = tuple(0 if kd == "kg" else None for kd in kinds)
    outer = tuple(None if kd is None else 0 for kd in kinds)
    return jax.vmap(jax.vmap(fn, in_axes=inner), in_axes=outer)


def _dense_kind(x):
    return None if x is None or x.shape[:2] == (1, 1) else "kg"


def _ids(st: Static, i, j, kv_major: bool):
    """Clamped global indices the mods see, and which entries are real: [bq], [bk], [bq, bk] ([bk, bq])."""
    q_ids = (i * st.bq).astype(jnp.int32) + jnp.arange(st.bq, dtype=jnp.int32)  # [bq]
    kv_ids = (j * st.bk).astype(jnp.int32) + jnp.arange(st.bk, dtype=jnp.int32)  # [bk]
    q_real, kv_real = q_ids < st.T, kv_ids < st.S
    real = kv_real[:, None] & q_real[None, :] if kv_major else q_real[:, None] & kv_real[None, :]
    return jnp.minimum(q_ids, st.T - 1), jnp.minimum(kv_ids, st.S - 1), real


def _score_fn(st: Static, a: Inputs, h, q_ids, kv_ids, kv_major: bool):
    """(scores, score consts) -> modified scores of head ``h``, on a tile [bq, bk] ([bk, bq] when ``kv_major``)."""
    if st.score_mod is None:
        return lambda s, consts: s
    return lambda s, consts: convert.on_tile(
        st.score_mod, consts, s, a.b, h, q_ids, kv_ids, kv_major=kv_major).astype(s.dtype)


def _logits(st: Static, a: Inputs, h, mask, bias, partial: bool, q_ids, kv_ids, real, kv_major: bool, scores):
    """(logits, visible or None) of head ``h`` from its modified ``scores`` and its ``mask`` /
    ``bias`` tiles (or None): [bq, bk], or [bk, bq] when ``kv_major`` (the backward's layout).

    Visibility comes from the scores (-inf hides), the dense mask and bias tiles, and on
    partial tiles the mask_mod and padding. Non-finite q/k rows are not added here as NaN
    logits (an extra pass over every tile): the forward poisons the softmax sum of the rows
    that see one (after score_mod and masks, so no mod drops it), which makes their lse NaN,
    and the backward's P = exp(logits - lse) is NaN on exactly those rows.
    """
    parts = []
    if st.score_mod is not None:
        parts.append(scores != -jnp.inf)  # a score_mod hides an entry by returning -inf
    logits = scores
    if bias is not None:
        logits = logits + bias
        parts.append(bias != -jnp.inf)  # only -inf hides; a NaN bias propagates
    if mask is not None:
        parts.append(mask)
    if partial:
        parts.append(real)
        if st.mask_mod is not None:
            parts.append(convert.on_tile(st.mask_mod, a.mask_consts, a.b, h, q_ids, kv_ids, kv_major=kv_major))
    return logits, functools.reduce(jnp.logical_and, parts) if parts else None


def _nan_flags(a: Inputs):
    """Which rows of q [Tp, K, G], k [Sp, K], v [Sp, K] hold a non-finite entry (NaN, else 0):
    reductions over the whole arrays, read once per call; the zeroing happens per tile."""
    return tuple(_finite.nan_rows(x, x.dtype) for x in (a.q, a.k, a.v))


def _forward(st: Static, a: Inputs, r: Rows):
    """(out [Tp, K, G, d_v], lse [Tp, K, G]): the online softmax of every query block."""
    Tp, K, G, _ = a.q.shape
    d_v = a.v.shape[-1]
    nq = Tp // st.bq
    q_nan, k_nan, v_nan = _nan_flags(a)  # [Tp, K, G], [Sp, K], [Sp, K]
    q_nan_rows = _row_blocks(q_nan, st.bq, 2)  # [nq, K, G, bq]
    k_nan_rows, v_nan_rows = (_row_blocks(x, st.bk, 1) for x in (k_nan, v_nan))  # [nk, K, bk]
    # Where every row sees every key of a tile, one value per key block and kv head says
    # whether a row sees a non-finite key / value: no per-tile reduction over the rows' values.
    k_blk_nan, v_blk_nan = (jnp.sum(x, axis=-1) for x in (k_nan_rows, v_nan_rows))  # [nk, K]
    kinds = ("kg", "kg", "k", "k", "k", "k", "k", "k", _dense_kind(a.mask), _dense_kind(a.bias), "kg")
    kt = jnp.moveaxis(a.k, 0, 2)  # [K, d_k, Sp]: the score tiles' rhs, once per call (a plain transpose)

    def q_block(i):
        q_blk = _finite_tile(a.q, i, st.bq, 2, st.scale)  # [K, G, bq, d_k]

        def step(n, carry, indices, partial):
            j = indices[i, n]
            q_ids, kv_ids, real = _ids(st, i, j, False)

            def one_head(carry, q_blk, kt_blk, v_blk, k_nan, v_nan, k_max, v_max, mask, bias, h):
                return forward_tile(
                    carry, q_blk, kt_blk, v_blk, k_nan, v_nan, _score_fn(st, a, h, q_ids, kv_ids, False),
                    a.score_consts,
                    functools.partial(_logits, st, a, h, mask, bias, partial, q_ids, kv_ids, real, False),
                    blk_nan=(k_max, v_max),
                )

            return _over_heads(one_head, kinds)(
                carry, q_blk, _clean(_cols(kt, j, st.bk)), _finite_tile(a.v, j, st.bk, 1),  # [K, d_k, bk], [K, bk, d_v]
                k_nan_rows[j], v_nan_rows[j],  # [K, bk]
                k_blk_nan[j], v_blk_nan[j], _dense_tile(a.mask, i, j, st, False),
                _dense_tile(a.bias, i, j, st, False), a.h,
            )

        carry = jax.vmap(jax.vmap(lambda x: init_carry(x, d_v)))(q_blk)  # m, l [K, G, bq], acc [K, G, bq, d_v]
        carry = jax.lax.fori_loop(0, r.kv_num[i], functools.partial(step, indices=r.kv_idx, partial=True), carry)
        carry = jax.lax.fori_loop(
            0, r.full_kv_num[i], functools.partial(step, indices=r.full_kv_idx, partial=False), carry
        )
        out, lse = jax.vmap(jax.vmap(finalize_rows))(carry, q_nan_rows[i])
        return jnp.moveaxis(out, 2, 0), jnp.moveaxis(lse, 2, 0)  # [bq, K, G, d_v], [bq, K, G]

    out, lse = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))  # [nq, bq, K, G, d_v], [nq, bq, K, G]
    return out.reshape(Tp, K, G, d_v), lse.reshape(Tp, K, G)


def few_tiles(r: Rows) -> bool:
    """Whether the backward should transpose q and dO per step (``Static.transposes_per_step``):
    the block mask ``r`` ([B, N, ...]) is known at trace time (not traced) and its key-major
    loops visit at most 8 tiles per query block (under ``vmap`` the loops run each step's
    largest count over the rows).

    The once-per-call transposed copies qᵀ, dOᵀ cost two passes and two arrays of q's size (and
    the page faults of their fresh memory, every call) whatever the tiles; per step, each visited
    tile transposes its two blocks. Measured (fwd+bwd, N=8, H=64, default tiles unless noted,
    in-process A/B, interleaved rounds in alternating order), per step / per call: 16 documents
    at T=8192, (128, 128) tiles, 2.5 tiles per query block: 0.947x (temp 113 -> 69 MiB); a 256
    window at T=16384, 3 per block: 0.955x; causal T=2048, 5 per block: 0.944x; non-causal
    T=2048, 8 per block: 0.985x; causal T=4096, 9 per block: 1.018x; non-causal T=4096, 16 per
    block: 1.015x.
    """
    counts = (r.q_num, r.full_q_num)  # [Bm, Nm, nk] each
    if any(isinstance(x, jax.core.Tracer) for x in counts):
        return False
    steps = np.max(np.asarray(counts[0]) + np.asarray(counts[1]), axis=(0, 1))  # [nk]
    return int(steps.sum()) <= 8 * r.kv_num.shape[-1]  # nq query blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flex_heads(st: Static, a: Inputs, r: Rows):
    """(out [Tp, K, G, d_v], lse [Tp, K, G]) of one batch row's heads that share the block-mask
    row ``r``; differentiable in q, k, v, bias and the score consts."""
    return _forward(st, a, r)


def _fwd(st: Static, a: Inputs, r: Rows):
    out, lse = _forward(st, a, r)
    return (out, lse), (a, r, out, lse)  # q, k, v are the inputs themselves: no copy is kept


def _bwd(st: Static, res, cotangents):
    """FlashAttention-2 backward on key-major tiles [bk, bq] (layout: module docstring)."""
    a, r, out, lse = res
    d_out, d_lse = cotangents  # [Tp, K, G, d_v], [Tp, K, G]
    Tp, K, G, d_k = a.q.shape
    Sp, d_v = a.k.shape[0], a.v.shape[-1]
    nq, nk = Tp // st.bq, Sp // st.bk
    # rowsum(dO ∘ O) as a matrix-vector product: XLA:CPU runs a sum over the last axis of this
    # layout as a slow reduction, and rewrote the einsum into one (13.6 ms at T = 4096 in the
    # backward's program, 1.2 ms as a matmul); the lse cotangent folds into delta
    delta = (d_out * out) @ jnp.ones((d_v,), out.dtype) - d_lse  # [Tp, K, G]
    lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # [Tp, K, G]; rows that saw nothing get P = 0
    is_float = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in a.score_consts]
    kinds = ("kg",) * 8 + ("k", "k", "k", _dense_kind(a.mask), _dense_kind(a.bias), "kg")
    # The per-step operands once per call (module docstring): rows in blocks [nq, K, G, bq, ...]
    # and the key-major score tiles' rhs in transposed blocks [nq, K, G, d, bq]; step i reads
    # block i, a contiguous copy (a column slice of one [K, G, d, Tp] transpose was a strided
    # one: 103 -> 71 ms of slicing per call at T = 4096). q is cleaned and scaled after each
    # transpose, so that each is one pass from the input (cleaned first, XLA:CPU wrote the
    # cleaned q twice before the two transposing copies).
    q_blocks, do_rows = (_row_blocks(x, st.bq, 2) for x in (a.q, d_out))  # [nq, K, G, bq, d]
    if st.transposes_per_step:  # few tiles per query block: each step transposes its own blocks
        q_rows = _clean(q_blocks, st.scale)
        qt = do_t = None
    else:
        q_rows, qt = (_clean(x, st.scale) for x in (q_blocks, jnp.swapaxes(q_blocks, 3, 4)))
        do_t = jnp.swapaxes(do_rows, 3, 4)  # [nq, K, G, d_v, bq]
    lse_rows, delta_rows = (_row_blocks(x, st.bq, 2) for x in (lse_safe, delta))

    def transposed(x_t, x_rows, i):  # block i of qᵀ / dOᵀ: [K, G, d, bq]
        return jnp.swapaxes(x_rows[i], 2, 3) if x_t is None else x_t[i]

    def kv_block(carry, j):
        k_blk, v_blk = (_finite_tile(x, j, st.bk, 1) for x in (a.k, a.v))  # [K, bk, d_k], [K, bk, d_v]
        kt_blk = jnp.swapaxes(k_blk, 1, 2)  # [K, d_k, bk]: once per key block, for dQᵀ += Kᵀ dSᵀ

        def step(n, inner, indices, partial):
            dk, dv, dq_t, dbias_all, dconsts = inner
            i = indices[j, n]
            q_ids, kv_ids, real = _ids(st, i, j, True)

            def one_head(dk, dv, q_blk, qt_blk, do_blk, dot_blk, lse_blk, delta_blk, k_blk, kt_blk, v_blk, mask, bias,
                         h):
                return backward_tile(
                    dk, dv, q_blk, qt_blk, do_blk, dot_blk, lse_blk, delta_blk, k_blk, kt_blk, v_blk,
                    _score_fn(st, a, h, q_ids, kv_ids, True), a.score_consts,
                    functools.partial(_logits, st, a, h, mask, bias, partial, q_ids, kv_ids, real, True), st.scale,
                )

            dk, dv, dq_blk, ds, d_floats = _over_heads(one_head, kinds)(
                dk, dv, q_rows[i], transposed(qt, q_rows, i), do_rows[i], transposed(do_t, do_rows, i),  # [K, G, bq, d], [K, G, d, bq]
                lse_rows[i], delta_rows[i],  # [K, G, bq]
                k_blk, kt_blk, v_blk, _dense_tile(a.mask, i, j, st, True), _dense_tile(a.bias, i, j, st, True), a.h,
            )  # dq_blk [K, G, d_k, bq], ds [K, G, bk, bq], d_floats [K, G, ...] each
            if dbias_all is not None:
                ds = jnp.sum(ds, axis=(0, 1), keepdims=True) if a.bias.shape[:2] == (1, 1) else ds  # [Km, Gm, bk, bq]
                dbias_all = jax.lax.dynamic_update_slice(dbias_all, jnp.swapaxes(ds, 2, 3), (0, 0, i * st.bq, j * st.bk))
            dq_t = dq_t.at[i].add(dq_blk)  # [nq, K, G, d_k, bq]
            dconsts = tuple(x + jnp.sum(y, axis=(0, 1)) for x, y in zip(dconsts, d_floats))
            return dk, dv, dq_t, dbias_all, dconsts

        # dK, dV of this key block per query head (summed over the G heads of each kv head below);
        # ``*_like`` so that inside ``jax.shard_map`` they vary over the same mesh axes as k, v
        inner = tuple(jnp.zeros_like(x, shape=(K, G) + x.shape[1:]) for x in (k_blk, v_blk))
        inner = jax.lax.fori_loop(0, r.q_num[j], functools.partial(step, indices=r.q_idx, partial=True), inner + carry)
        inner = jax.lax.fori_loop(
            0, r.full_q_num[j], functools.partial(step, indices=r.full_q_idx, partial=False), inner
        )
        dk, dv, *carry = inner
        return tuple(carry), (jnp.moveaxis(jnp.sum(dk, 1), 1, 0), jnp.moveaxis(jnp.sum(dv, 1), 1, 0))  # [bk, K, d]

    floats0 = tuple(jnp.zeros_like(c) for c, fl in zip(a.score_consts, is_float) if fl)
    dbias0 = None if a.bias is None else jnp.zeros_like(a.bias)
    init = (jnp.zeros_like(q_rows, shape=(nq, K, G, d_k, st.bq)), dbias0, floats0)  # dQᵀ [nq, K, G, d_k, bq]
    (dq_t, dbias, dfloats), (dk, dv) = jax.lax.scan(kv_block, init, jnp.arange(nk, dtype=jnp.int32))
    it = iter(dfloats)
    grads = Inputs(
        q=jnp.moveaxis(dq_t, 4, 1).reshape(Tp, K, G, d_k), k=dk.reshape(Sp, K, d_k), v=dv.reshape(Sp, K, d_v),
        mask=None, bias=dbias,
        b=None, h=None, score_consts=tuple(next(it) if fl else None for fl in is_float),
        mask_consts=tuple(None for _ in a.mask_consts),
    )
    return grads, jax.tree.map(lambda _: None, r)


flex_heads.defvjp(_fwd, _bwd)
