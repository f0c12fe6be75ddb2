"""``implementation='chunked'``: ``dot_product_attention``'s built-ins as mods over the flex loop.

Shape glossary: B batch (flattened), T query length, S key length, K kv heads, G query heads
per kv head, H key head dim, Hv value head dim, bq/bk query/key block sizes, nq = ceil(T/bq),
nk = ceil(S/bk) blocks.

There is one block-sparse flash-attention loop in jattn, ``jattn.flex.kernel``; this module
only translates the built-in features into its terms:

- ``is_causal`` (both alignments), ``local_window_size``, lengths and segment ids become one
  ``mask_mod`` (``jattn.flex.mods``), ``logits_soft_cap`` the ``soft_cap`` score_mod;
- static patterns (causal, window) get their ``BlockMask`` analytically (``static_block_flags``:
  NumPy at trace time, no mask evaluation), and so do lengths (``length_block_flags``: the
  same corner test per batch row, in JAX); segments get it from the jittable
  ``create_block_mask``; data-dependent masks are per batch row, so that under ``vmap`` the
  loops run the largest count of visible blocks, never all blocks;
- the dense ``mask`` and ``bias`` arrays enter the loop tile by tile.

Not supported here (``jattn.dispatch`` falls back to ``'xla'``): returned weights and dropout.
Forward-mode autodiff (jvp) is not supported: ``dot_product_attention`` turns JAX's
``custom_vjp`` TypeError into one that suggests ``implementation='xla'``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jattn.flex import convert, lift, mods
from jattn.flex.block_mask import block_arrays, create_block_mask
from jattn.flex.kernel import Rows, Static, few_tiles

# Measured on a 2-core CPU (fp32, N=8, H=64): 512-row query blocks cut the forward time by
# 30-45% from T=1024 on; for shorter queries 256 rows keep the backward fastest. Re-measured
# with the key-major backward (T=2048, process CPU time, min of 3): (512, 256) is the fastest
# forward and ties (512, 128) for the fastest backward among (256, 128), (256, 256), (512, 128),
# (512, 512), (1024, 256); at T=4096, (128, 128) tiles take 1.2x the CPU time of (512, 256).
# Tried and reverted: running the heads one after another (``lax.map`` instead of ``vmap`` in
# ``jattn.flex.lift``) with (512, 128) tiles, so that each step's tile fits in L2. On one core
# it needs less CPU (T=2048: 178 vs 212 ms forward, 509 vs 655 ms forward+backward), but one
# head's ops are too small for XLA:CPU to split over both cores: on the idle 2-core machine
# T=4096 forward took 739 ms vs 491 ms with vmap (torch 326 ms), same-run wall time.
# Re-swept on an AVX-512 2-core machine (T=1024/2048, fwd and fwd+bwd, min of 5-7
# interleaved rounds): (512, 256) still fastest. Why smaller tiles lose there: YNNPACK splits a
# matmul over both cores only when it is large enough; at (256, 256) each tile matmul ran on
# one core (~90 GFLOP/s; (512, 256): 144-177 GFLOP/s) and the T=2048 forward took 114 vs 68 ms.
# Tried and reverted: two query blocks' loops side by side in one lax.map body, so that the
# second core has independent work: XLA:CPU ran them one after the other (no change in time).
DEFAULT_BLOCK_KV = 256


def block_sizes_for(T: int, S: int, block_sizes: tuple[int, int] | None) -> tuple[int, int]:
    """(bq, bk): the requested or default sizes, shrunk to the lengths for short inputs."""
    if block_sizes is None:
        block_sizes = (512 if T >= 1024 else 256, DEFAULT_BLOCK_KV)
    bq, bk = block_sizes
    return min(bq, T), min(bk, S)


def _pattern_flags(r0, r1, c0, c1, is_causal: bool, offset: int, window: tuple[int, int] | None):
    """(somewhere, everywhere): whether the causal/window pattern shows some / every key of the
    tiles with rows r0..r1 and keys c0..c1 (broadcasting NumPy or JAX int arrays).

    Query row r sits at key position r + offset and sees key c iff ``lo <= c - r - offset <= up``
    (up = 0 when causal, the window's right size otherwise; lo = -left). Over a tile the
    difference takes every integer between its corner values, so a tile is visible somewhere
    iff that range meets [lo, up], everywhere iff it lies inside.
    """
    d_min, d_max = c0 - r1 - offset, c1 - r0 - offset
    ups = ([0] if is_causal else []) + ([window[1]] if window is not None else [])
    some, every = d_min == d_min, d_min == d_min  # all True, broadcast like the corners
    if ups:
        some, every = some & (d_min <= min(ups)), every & (d_max <= min(ups))
    if window is not None:
        some, every = some & (d_max >= -window[0]), every & (d_min >= -window[0])
    return some, every


def _corners(T: int, S: int, bq: int, bk: int, xp):
    """First/last real row [nq, 1] and key [1, nk] of every tile."""
    r0 = xp.arange(-(-T // bq))[:, None] * bq  # [nq, 1]
    c0 = xp.arange(-(-S // bk))[None, :] * bk  # [1, nk]
    return r0, xp.minimum(r0 + bq, T) - 1, c0, xp.minimum(c0 + bk, S) - 1


def static_block_flags(T: int, S: int, bq: int, bk: int, is_causal: bool, offset: int,
                       window: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(partial, full) bool [nq, nk] of the causal/window pattern, from block corners alone
    (NumPy at trace time); a tile holding a padded key is never full."""
    r0, r1, c0, c1 = _corners(T, S, bq, bk, np)
    some, every = _pattern_flags(r0, r1, c0, c1, is_causal, offset, window)
    full = some & every & (c0 + bk <= S)
    return some & ~full, full


def length_block_flags(T: int, S: int, bq: int, bk: int, is_causal: bool, offset: int,
                       window: tuple[int, int] | None, q_lengths, kv_lengths):
    """(partial, full) bool [B, nq, nk] of the causal/window pattern and the lengths ``[B]``
    (either may be None), from block corners (jittable: the lengths may be traced).

    The visible part of a tile under the lengths is the tile clipped to rows ``< q_lengths[b]``
    and keys ``< kv_lengths[b]``, a smaller rectangle, so the pattern's corner test applies
    to the clipped corners; a tile is full only if no clipping happened.
    """
    r0, r1, c0, c1 = _corners(T, S, bq, bk, jnp)
    n = next(x for x in (q_lengths, kv_lengths) if x is not None).shape[0]
    q_len = jnp.full((n,), T) if q_lengths is None else jnp.asarray(q_lengths)
    kv_len = jnp.full((n,), S) if kv_lengths is None else jnp.asarray(kv_lengths)
    q_len, kv_len = q_len[:, None, None], kv_len[:, None, None]  # [B, 1, 1]
    r1c, c1c = jnp.minimum(r1, q_len - 1), jnp.minimum(c1, kv_len - 1)  # [B, nq, 1], [B, 1, nk]
    some, _ = _pattern_flags(r0, r1c, c0, c1c, is_causal, offset, window)
    some = some & (r0 <= r1c) & (c0 <= c1c)  # [B, nq, nk]
    _, every = _pattern_flags(r0, r1, c0, c1, is_causal, offset, window)
    full = some & every & (r1 < q_len) & (c1 < kv_len) & (c0 + bk <= S)
    return some & ~full, full


def static_rows(partial: np.ndarray, full: np.ndarray) -> Rows:
    """The eight ``BlockMask`` arrays ``[1, 1, ...]`` (broadcast over batch and heads) of flags [nq, nk]."""
    return Rows(*block_arrays(partial[None, None], full[None, None]))


def builtin_mask_mod(config, T: int, S: int, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids):
    """(mask_mod or None, whether it depends on data): the built-in masks as one mask_mod."""
    parts = []
    if config.is_causal:
        parts.append(mods.causal if config.offset == 0 else mods.causal_bottom_right(T, S))
    if config.window is not None:
        parts.append(mods.sliding_window(*config.window, offset=config.offset))
    static = len(parts)
    if q_lengths is not None or kv_lengths is not None:
        parts.append(mods.lengths(q_lengths, kv_lengths))
    if q_segment_ids is not None:
        parts.append(mods.document(q_segment_ids, kv_segment_ids))
    if not parts:
        return None, False
    return (parts[0] if len(parts) == 1 else mods.and_masks(*parts)), len(parts) > static


def chunked_call(config, a):
    """``register_multihead_implementation`` signature: (config, arrays) -> (out, lse).

    a.query [B, T, K, G, H], a.key [B, S, K, H], a.value [B, S, K, Hv], a.mask/a.bias
    [Bm, Km, Gm, T, S] or None -> out [B, T, K, G, Hv], lse [B, T, K, G].
    """
    if a.keep is not None:
        raise ValueError("keep: dropout is not supported by implementation='chunked' (use 'xla')")
    B, T, K, G, _ = a.query.shape
    S, Hv = a.key.shape[1], a.value.shape[-1]
    acc = jnp.promote_types(a.query.dtype, jnp.float32)  # fp32, or float64 for float64 inputs
    if min(B, T, S) == 0:  # nothing to compute: a row that sees no key is 0
        return jnp.zeros((B, T, K, G, Hv), a.query.dtype), jnp.full((B, T, K, G), -jnp.inf, acc)
    bq, bk = block_sizes_for(T, S, config.block_sizes)
    mask_mod, data_dependent = builtin_mask_mod(
        config, T, S, a.q_lengths, a.kv_lengths, a.q_segment_ids, a.kv_segment_ids
    )
    if data_dependent and a.q_segment_ids is None:  # lengths: block flags from tile corners
        partial, full = length_block_flags(T, S, bq, bk, config.is_causal, config.offset, config.window,
                                           a.q_lengths, a.kv_lengths)  # [B, nq, nk]
        rows = Rows(*block_arrays(partial[:, None], full[:, None]))  # [B, 1, ...]
    elif data_dependent:
        bm = create_block_mask(mask_mod, B, None, T, S, block_size=(bq, bk))  # [B, 1, ...]
        rows = Rows.of(bm)
    else:
        rows = static_rows(*static_block_flags(T, S, bq, bk, config.is_causal, config.offset, config.window))
    score = None if config.logits_soft_cap is None else convert.convert(
        "score_mod", mods.soft_cap(config.logits_soft_cap), acc)
    mask = None if mask_mod is None else convert.convert("mask_mod", mask_mod)
    st = Static(T, S, bq, bk, config.scale, *(None if m is None else m._replace(consts=()) for m in (score, mask)),
                few_tiles(rows))
    out, lse = lift.chunked(
        st, a.query.astype(acc), a.key.astype(acc), a.value.astype(acc), a.mask,
        None if a.bias is None else a.bias.astype(acc),
        () if score is None else score.consts, () if mask is None else mask.consts, rows,
    )
    return out.astype(a.query.dtype), lse  # [B, T, K, G, Hv], [B, T, K, G]
