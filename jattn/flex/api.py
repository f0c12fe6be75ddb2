"""``flex_attention``: attention with programmable ``score_mod`` / ``mask_mod``.

Shape glossary: B batch (leading dims flattened), T query length, S key length, N query
heads, K key/value heads, G = N/K, H key head dim, Hv value head dim, nq/nk query/key blocks.

The single-head kernel (``'chunked'``: block-sparse, memory-linear; ``'xla'``: dense
reference) is lifted with ``jax.vmap`` over the G query heads sharing a kv head, the K kv
heads and the batch, as in ``jattn.dot_product_attention``. The mods receive global indices:
``b`` the flattened batch row, ``h`` the query head (0..N-1), ``q_idx``/``kv_idx`` positions.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jattn.core import _checks, spec
from jattn.flex import convert, lift
from jattn.flex.block_mask import BlockMask, create_block_mask
from jattn.flex.kernel import Rows, Static, few_tiles

IMPLEMENTATIONS = (None, "xla", "chunked")


def default_block_size(T: int, S: int) -> tuple[int, int]:
    """Tiles of a block mask built by ``flex_attention`` itself: ``'chunked'``'s defaults.

    (512, 256) from T = 1024 on, (256, 256) below, shrunk to short inputs: large tiles keep
    the CPU's matmuls efficient; pass a ``block_mask`` with ``block_size=128`` for patterns
    whose sparsity is finer (many short documents).
    """
    return min(512 if T >= 1024 else 256, T), min(256, S)


def _check_block_mask(bm, B: int, N: int, T: int, S: int):
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask: expected a jattn.BlockMask (from create_block_mask), got {type(bm).__name__}")
    Bm, Nm, Tm, Sm = bm.shape
    if (Tm, Sm) != (T, S) or Bm not in (1, B) or Nm not in (1, N):
        raise ValueError(
            f"block_mask: built for (B, N, T, S) = {(Bm, Nm, Tm, Sm)}, expected ({B} or 1, {N} or 1, "
            f"{T}, {S}) for query/key of this call; rebuild it with create_block_mask(mask_mod, {B}, {N}, {T}, {S})"
        )


_chunked = jax.jit(lift.chunked, static_argnums=(0,))


def _empty(query, batch_shape, T, N, Hv, S, dt, return_residual):
    """The result of a call with an empty batch, query or key axis: zeros (lse -inf where S = 0)."""
    out = jnp.zeros(batch_shape + (T, N, Hv), query.dtype)  # [*B, T, N, Hv]
    if not return_residual:
        return out
    return out, jnp.full(batch_shape + (T, N), -jnp.inf, jnp.promote_types(dt, jnp.float32))  # [*B, T, N]


def flex_attention(query, key, value, *, score_mod: Callable | None = None, mask_mod: Callable | None = None,
                   block_mask: BlockMask | None = None, scale: float | None = None,
                   return_residual: bool = False, implementation: str | None = None):
    """Attention with a programmable score and mask: softmax(score_mod(q·kᵀ·scale), where mask_mod) v.

    Args:
      query: ``[*B, T, N, H]`` (or unbatched ``[T, N, H]``).
      key: ``[*B, S, K, H]``; N must be a multiple of K (GQA/MQA, K/V never repeated).
      value: ``[*B, S, K, Hv]``.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on scalars; ``b`` is the
        flattened batch row, ``h`` the query head, ``q_idx``/``kv_idx`` global positions.
        Returning ``-inf`` hides the entry. Arrays it closes over get gradients.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend) on scalars.
      block_mask: a ``BlockMask`` from ``create_block_mask``; its ``mask_mod`` is used when
        ``mask_mod`` is None. Without it one is built (per batch row / head only if the
        mask_mod reads ``b`` / ``h``) with ``default_block_size(T, S)``.
      scale: multiplies ``q·kᵀ`` before score_mod; default ``1/sqrt(H)``.
      return_residual: also return the fp32 row logsumexp ``[*B, T, N]`` (stop-gradient).
      implementation: ``'chunked'`` (block-sparse, memory-linear; the default), or ``'xla'``
        (dense [T, S] reference, also supports forward-mode autodiff).

    Returns:
      ``out [*B, T, N, Hv]`` in the dtype of ``query``, or ``(out, residual)``.

    A row that sees no key returns 0 with zero gradients. Softmax runs in fp32 (float64 for
    float64 inputs). NaN in q/k/v or a NaN score is not hidden: it reaches the rows that see it.
    """
    batch_shape, T, N, H, S, K, Hv = spec.check_arrays(query, key, value)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
    if block_mask is not None and mask_mod is not None and mask_mod is not block_mask.mask_mod:
        raise ValueError("mask_mod, block_mask: give one of them, or the block mask's own mask_mod")
    G = N // K
    B = math.prod(batch_shape)
    if block_mask is not None:
        _check_block_mask(block_mask, B, N, T, S)
        mask_mod = block_mask.mask_mod
    scale, _, _ = spec.options(H, scale, None, None, None)
    dt = jnp.promote_types(_checks.dtype_of("query", query), jnp.float32)
    smod = None if score_mod is None else convert.convert("score_mod", score_mod, dt)
    mmod = None if mask_mod is None else convert.convert("mask_mod", mask_mod)
    if block_mask is not None and mmod is not None:
        Bm, Nm = block_mask.shape[:2]
        for name, reads, built, size in (("b", mmod.uses_b, Bm, B), ("h", mmod.uses_h, Nm, N)):
            if reads and built == 1 and size > 1:
                raise ValueError(
                    f"block_mask: its mask_mod reads {name!r} but the mask was built with "
                    f"{'B' if name == 'b' else 'N'}=None (broadcast); pass {size} to create_block_mask"
                )

    if min(B, T, S) == 0:  # nothing to compute: a row that sees no key is 0
        return _empty(query, batch_shape, T, N, Hv, S, dt, return_residual)
    q = jnp.reshape(query, (B, T, K, G, H)).astype(dt)  # [B, T, K, G, H]
    k = jnp.reshape(key, (B, S, K, H)).astype(dt)  # [B, S, K, H]
    v = jnp.reshape(value, (B, S, K, Hv)).astype(dt)  # [B, S, K, Hv]
    s_consts = () if smod is None else smod.consts
    m_consts = () if mmod is None else mmod.consts
    closed = tuple(None if m is None else m._replace(consts=()) for m in (smod, mmod))
    if implementation == "xla":
        out, lse = lift.dense(closed, scale, q, k, v, s_consts, m_consts)
    else:
        if block_mask is None:
            block_mask = create_block_mask(
                mask_mod, B if mmod is not None and mmod.uses_b else None,
                N if mmod is not None and mmod.uses_h else None, T, S, block_size=default_block_size(T, S),
            )
        bq, bk = block_mask.block_size
        rows = Rows.of(block_mask)
        st = Static(T, S, bq, bk, scale, *closed, few_tiles(rows))
        out, lse = _chunked(st, q, k, v, None, None, s_consts, m_consts, rows)
    out = jnp.reshape(out.astype(query.dtype), batch_shape + (T, N, Hv))  # [*B, T, N, Hv]
    if return_residual:
        res = jnp.reshape(lse.astype(jnp.promote_types(dt, jnp.float32)), batch_shape + (T, N))  # [*B, T, N]
        return out, jax.lax.stop_gradient(res)
    return out
