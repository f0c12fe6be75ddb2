"""Block primitives of flash attention: one [tq, tk] tile at a time, in fp32.

Shape glossary: tq query rows of a tile, tk key columns of a tile, d_k query/key head dim,
d_v value head dim.

Both the ``'chunked'`` path (loops over the tiles of one device) and sequence-parallel ring
attention (rotates key/value blocks between devices) are built from these functions; they
know nothing about where a tile sits except through the mask tiles the caller passes in.

API (stable):

- ``tile_logits(q_blk, k_blk, bias_tile, mask_tile, structure_tile, scale, cap)
  -> (logits [tq, tk], visible [tq, tk] | None)``: ``soft_cap(q kᵀ · scale) + bias`` and the
  keys each row may see (``mask_tile & structure_tile & bias != -inf``: only a ``-inf`` bias
  hides a key, a NaN logit stays visible and propagates). ``visible`` is None
  when nothing can hide a key (no bias, no mask tile, no structure tile). Every tile argument
  may be None. ``structure_tile`` is what ``StructuredMask.tile(q_idx, k_idx)`` returns for
  the tile's global row/column indices, combined with any padding mask by the caller.
- ``init_carry(tq, d_v, dtype=float32) -> (m [tq], l [tq], acc [tq, d_v])``: the empty
  online-softmax state (running max ``-inf``, running sum 0, unnormalised output 0) in the
  accumulation dtype (float64 for float64 inputs).
- ``init_carry_like(q_blk, d_v)``: the same state built from the query tile, so that inside
  ``jax.shard_map`` it carries the queries' varying mesh axes.
- ``forward_block(carry, q_blk, k_blk, v_blk, bias_tile, mask_tile, structure_tile, scale, cap)
  -> carry``: folds one key block into the state. Visiting the key blocks of a row in any
  order gives the same result up to rounding; blocks that a row cannot see may be skipped.
- ``fold(carry, logits, visible, v_blk, v_bad) -> carry`` and ``logit_grads(logits, visible,
  v_blk, do_blk, lse_blk, delta_blk) -> (dlogits, dv)``: the online-softmax step and the
  backward of one tile from logits the caller computed (the block-sparse flex kernel applies
  its ``score_mod`` first); ``forward_block`` / ``backward_block`` are built on them.
- ``finalize(carry) -> (out [tq, d_v], lse [tq])``: ``out = acc / l``; a row that saw no key
  gives ``out = 0`` and ``lse = -inf``; a row that saw a NaN logit gives NaN for both.
- ``backward_block(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, bias_tile, mask_tile,
  structure_tile, scale, cap) -> (dq [tq, d_k], dk [tk, d_k], dv [tk, d_v], dbias [tq, tk] | None)``:
  the FlashAttention-2 backward of one tile, given the forward's logsumexp ``lse_blk [tq]`` and
  ``delta_blk [tq] = rowsum(dO ∘ O) - dlse`` (``dlse`` being the cotangent of the lse output,
  0 when only ``out`` is used). Summing the tile results over all visible tiles gives the full
  gradients; ``dbias`` is None when ``bias_tile`` is.

Non-finite inputs (``jattn.core._finite``): a query or key row holding a NaN or inf gives NaN
logits, a value row holding one makes NaN every output row that sees it; a hidden key or
value never reaches a row that does not see it, whatever the tiling.

All arithmetic runs in the dtype of the inputs; callers cast them to fp32 first (float64
stays float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.core import _finite
from jattn.core.masks import combine_masks

Carry = tuple[jax.Array, jax.Array, jax.Array]  # m [tq], l [tq], acc [tq, d_v]


def _capped_scores(q_blk, k_blk, q_bad, k_bad, scale: float, cap: float | None):
    """(soft_cap(q kᵀ · scale) [tq, tk], tanh of the cap [tq, tk] or None) of finite rows
    ``q_blk``, ``k_blk`` (``_finite.split``); NaN where a query or key row was non-finite."""
    raw = jnp.einsum("qd,kd->qk", q_blk, k_blk) * scale  # [tq, tk]
    t = None
    if cap is not None:
        t = jnp.tanh(raw / cap)  # [tq, tk]
        raw = cap * t
    nan_q, nan_k = _finite.nan_at(q_bad, raw.dtype), _finite.nan_at(k_bad, raw.dtype)  # [tq], [tk]
    return raw + nan_q[:, None] + nan_k[None, :], t


def _logits_and_visibility(scores, bias_tile, mask_tile, structure_tile):
    logits = scores if bias_tile is None else scores + bias_tile
    # Only a -inf bias hides a key: a NaN logit (from q, k or bias) is visible and propagates.
    hidden_by_bias = None if bias_tile is None else bias_tile != -jnp.inf  # [tq, tk]
    return logits, combine_masks(hidden_by_bias, mask_tile, structure_tile)


def tile_logits(q_blk, k_blk, bias_tile, mask_tile, structure_tile, scale: float, cap: float | None):
    """Logits ``soft_cap(q kᵀ · scale) + bias`` of one tile and its visibility (None = all)."""
    (q_blk, q_bad), (k_blk, k_bad) = _finite.split(q_blk), _finite.split(k_blk)
    scores, _ = _capped_scores(q_blk, k_blk, q_bad, k_bad, scale, cap)
    return _logits_and_visibility(scores, bias_tile, mask_tile, structure_tile)


def init_carry(tq: int, d_v: int, dtype=jnp.float32) -> Carry:
    return (
        jnp.full((tq,), -jnp.inf, dtype),
        jnp.zeros((tq,), dtype),
        jnp.zeros((tq, d_v), dtype),
    )


def init_carry_like(q_blk, d_v: int) -> Carry:
    """``init_carry`` in ``q_blk``'s dtype, built from ``q_blk`` (``*_like``) so that inside
    ``jax.shard_map`` it varies over the same mesh axes as the queries (loop carries must)."""
    m = jnp.full_like(jnp.sum(q_blk, axis=-1), -jnp.inf)  # [tq]; d_k may be 0
    return m, jnp.zeros_like(m), jnp.zeros_like(m, shape=(q_blk.shape[0], d_v))


def forward_block(carry: Carry, q_blk, k_blk, v_blk, bias_tile, mask_tile, structure_tile,
                  scale: float, cap: float | None) -> Carry:
    """One online-softmax step: rescale the running state to the new row max, add this block."""
    if k_blk.shape[0] == 0:  # an empty key block changes nothing
        return carry
    logits, visible = tile_logits(q_blk, k_blk, bias_tile, mask_tile, structure_tile, scale, cap)
    v_blk, v_bad = _finite.split(v_blk)  # a hidden non-finite value must not meet its weight 0
    return fold(carry, logits, visible, v_blk, v_bad)


def fold(carry: Carry, logits, visible, v_blk, v_bad) -> Carry:
    """Fold one tile's logits [tq, tk] (entries where ``visible`` is False are hidden; None: all
    visible) and finite value rows ``v_blk [tk, d_v]`` into the state; rows that see a key of
    ``v_bad [tk]`` (non-finite values, see ``_finite.split``) become NaN."""
    m, l, acc = carry
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)  # [tq, tk]
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [tq]
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: 0; NaN stays NaN
    p = jnp.exp(logits - m_safe[:, None])  # [tq, tk]; exactly 0 where hidden
    alpha = jnp.exp(m - m_safe)  # [tq]; 0 while m is still -inf
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[:, None] * acc + jnp.einsum("qk,kd->qd", p, v_blk)  # [tq, d_v]
    acc = acc + _finite.nan_at(_finite.rows_seeing(v_bad, visible, p.shape[0]), acc.dtype)[:, None]
    return m_new, l, acc


def finalize(carry: Carry) -> tuple[jax.Array, jax.Array]:
    """(out [tq, d_v], lse [tq]); rows that saw nothing give 0 and -inf, NaN stays NaN."""
    m, l, acc = carry
    empty = l == 0
    safe_l = jnp.where(empty, 1.0, l)
    out = acc / safe_l[:, None]  # [tq, d_v]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
    return out, lse


def backward_block(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, bias_tile, mask_tile,
                   structure_tile, scale: float, cap: float | None):
    """FlashAttention-2 backward of one tile: P = exp(logits - lse), dS = P ∘ (dP - delta)."""
    (q_blk, q_bad), (k_blk, k_bad) = _finite.split(q_blk), _finite.split(k_blk)
    v_blk, _ = _finite.split(v_blk)
    scores, t = _capped_scores(q_blk, k_blk, q_bad, k_bad, scale, cap)
    logits, visible = _logits_and_visibility(scores, bias_tile, mask_tile, structure_tile)
    ds, dv = logit_grads(logits, visible, v_blk, do_blk, lse_blk, delta_blk)
    dbias = None if bias_tile is None else ds
    d_raw = ds * scale if t is None else ds * (scale * (1.0 - t * t))  # through soft cap and scale
    dq = jnp.einsum("qk,kd->qd", d_raw, k_blk)  # [tq, d_k]
    dk = jnp.einsum("qk,qd->kd", d_raw, q_blk)  # [tk, d_k]
    return dq, dk, dv, dbias


def logit_grads(logits, visible, v_blk, do_blk, lse_blk, delta_blk):
    """(dlogits [tq, tk], dv [tk, d_v]) of one tile from its logits and visibility (as ``fold``
    takes them), finite value rows, ``do_blk [tq, d_v]``, ``lse_blk``, ``delta_blk [tq]``."""
    # A row with lse = -inf saw no key: subtracting +inf makes its P exactly 0.
    lse_safe = jnp.where(lse_blk == -jnp.inf, jnp.inf, lse_blk)  # [tq]; a NaN lse stays NaN
    shifted = logits - lse_safe[:, None]  # [tq, tk]
    if visible is not None:
        shifted = jnp.where(visible, shifted, -jnp.inf)  # mask before exp: no overflow when hidden
    p = jnp.exp(shifted)  # [tq, tk]
    dv = jnp.einsum("qk,qd->kd", p, do_blk)  # [tk, d_v]
    dp = jnp.einsum("qd,kd->qk", do_blk, v_blk)  # [tq, tk]
    ds = p * (dp - delta_blk[:, None])  # [tq, tk]: gradient of the logits
    if visible is not None:
        ds = jnp.where(visible, ds, 0.0)  # a NaN delta (the row saw a NaN) stays off hidden keys
    return ds, dv
