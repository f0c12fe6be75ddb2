"""Ready-made ``mask_mod`` / ``score_mod`` functions and combinators.

Shape glossary: B batch, N query heads, T query length, S key length.

Every mod is written for scalars: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and
``score_mod(score, b, h, q_idx, kv_idx) -> score`` with global positions. Factories
(``sliding_window(256)``, ``document(ids)``, ``alibi(slopes)``) return such a function; arrays
they close over (ids, lengths, slopes, bias tables) may be traced and get gradients.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

MaskMod = Callable  # (b, h, q_idx, kv_idx) -> bool
ScoreMod = Callable  # (score, b, h, q_idx, kv_idx) -> score


# ----------------------------------------------------------------------------------------
# Combinators.
# ----------------------------------------------------------------------------------------


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where every mask_mod is True.

    Args:
      *mask_mods: mask_mods (none: everything visible).

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        ok = jnp.bool_(True)
        for m in mask_mods:
            ok = ok & m(b, h, q_idx, kv_idx)
        return ok

    return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where any mask_mod is True.

    Args:
      *mask_mods: mask_mods (none: nothing visible).

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        ok = jnp.bool_(False)
        for m in mask_mods:
            ok = ok | m(b, h, q_idx, kv_idx)
        return ok

    return mask_mod


def chain_scores(*score_mods: ScoreMod) -> ScoreMod:
    """Apply score_mods left to right, e.g. ``chain_scores(alibi(slopes), soft_cap(30.0))``.

    Args:
      *score_mods: score_mods.

    Returns:
      A ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    """

    def score_mod(score, b, h, q_idx, kv_idx):
        for s in score_mods:
            score = s(score, b, h, q_idx, kv_idx)
        return score

    return score_mod


# ----------------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    """Top-left causal (jax.nn's ``is_causal``): query i sees keys ``<= i``; a mask_mod itself.

    Args:
      b: batch row (unused).
      h: query head (unused).
      q_idx: query position.
      kv_idx: key position.

    Returns:
      bool scalar, True = attend.
    """
    del b, h
    return kv_idx <= q_idx


def causal_bottom_right(T: int, S: int) -> MaskMod:
    """Causal aligned to the bottom-right corner: query i sees keys ``<= i + S - T``.

    Args:
      T: query length.
      S: key length.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """
    offset = S - T

    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        return kv_idx <= q_idx + offset

    return mask_mod


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> MaskMod:
    """Query at position ``p = q_idx + offset`` sees keys in ``[p - left, p + right]``.

    ``sliding_window(w)`` is causal local attention over the last ``w + 1`` keys.

    Args:
      left: keys visible before the query's position.
      right: keys visible after it.
      offset: query row i sits at key position ``i + offset``.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        p = q_idx + offset
        return (kv_idx >= p - left) & (kv_idx <= p + right)

    return mask_mod


def document(q_doc_ids, kv_doc_ids=None) -> MaskMod:
    """Packed documents: attend only within the same id.

    Combine with ``causal`` for causal attention inside each document.

    Args:
      q_doc_ids: ``[T]`` ids, or per batch row ``[B, T]``.
      kv_doc_ids: ``[S]`` / ``[B, S]``; default ``q_doc_ids`` (self-attention).

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """
    q_ids = jnp.asarray(q_doc_ids)
    kv_ids = q_ids if kv_doc_ids is None else jnp.asarray(kv_doc_ids)
    if q_ids.ndim not in (1, 2) or kv_ids.ndim != q_ids.ndim:
        raise ValueError(
            f"document: expected ids of shape [T] or [B, T] (kv ids alike), got {q_ids.shape} and {kv_ids.shape}"
        )

    def mask_mod(b, h, q_idx, kv_idx):
        del h
        if q_ids.ndim == 1:
            return q_ids[q_idx] == kv_ids[kv_idx]
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    return mask_mod


def prefix_lm(prefix_lengths) -> MaskMod:
    """Bidirectional over the first ``prefix_lengths`` keys, causal after.

    Args:
      prefix_lengths: a scalar, or ``[B]`` per batch row.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """
    prefix = jnp.asarray(prefix_lengths)
    if prefix.ndim > 1:
        raise ValueError(f"prefix_lm: expected a scalar or [B] lengths, got shape {prefix.shape}")

    def mask_mod(b, h, q_idx, kv_idx):
        del h
        n = prefix if prefix.ndim == 0 else prefix[b]
        return (kv_idx <= q_idx) | (kv_idx < n)

    return mask_mod


def lengths(q_lengths=None, kv_lengths=None) -> MaskMod:
    """Padding: query rows ``>= q_lengths[b]`` and keys ``>= kv_lengths[b]`` are hidden.

    Args:
      q_lengths: ``[B]`` valid query rows, or None.
      kv_lengths: ``[B]`` valid keys, or None.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """
    q_len = None if q_lengths is None else jnp.asarray(q_lengths)
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths)
    for name, x in (("q_lengths", q_len), ("kv_lengths", kv_len)):
        if x is not None and x.ndim != 1:
            raise ValueError(f"lengths: expected {name} of shape [B], got {x.shape}")

    def mask_mod(b, h, q_idx, kv_idx):
        del h
        ok = jnp.bool_(True)
        if q_len is not None:
            ok = ok & (q_idx < q_len[b])
        if kv_len is not None:
            ok = ok & (kv_idx < kv_len[b])
        return ok

    return mask_mod


def chunked_local(chunk_size: int) -> MaskMod:
    """Attend only within fixed chunks of positions (Llama 4's chunked attention).

    Args:
      chunk_size: positions per chunk.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        del b, h
        return q_idx // chunk_size == kv_idx // chunk_size

    return mask_mod


def sinks(num_sinks: int) -> MaskMod:
    """The first keys are always visible (attention sinks; ``or_masks`` it in).

    Args:
      num_sinks: how many leading keys.

    Returns:
      A ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        del b, h, q_idx
        return kv_idx < num_sinks

    return mask_mod


# ----------------------------------------------------------------------------------------
# Scores.
# ----------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int):
    """ALiBi's per-head slopes: the geometric sequence ``2^(-8 (i+1) / N)`` (Press et al.).

    Args:
      num_heads: N.

    Returns:
      float32 ``[N]``.
    """
    return jnp.asarray([2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)], jnp.float32)


def alibi(slopes) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``, a linear penalty with distance.

    Args:
      slopes: ``[N]`` per query head (may be traced: it gets gradients).

    Returns:
      A ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    """
    slopes = jnp.asarray(slopes)

    def score_mod(score, b, h, q_idx, kv_idx):
        del b
        return score + slopes[h] * (kv_idx - q_idx).astype(score.dtype)

    return score_mod


def soft_cap(cap: float) -> ScoreMod:
    """Logit soft cap ``cap * tanh(score / cap)`` (Gemma 2).

    Args:
      cap: the cap, > 0.

    Returns:
      A ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    """

    def score_mod(score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return cap * jnp.tanh(score / cap)

    return score_mod


def relative_bias(table, T: int) -> ScoreMod:
    """Learned relative-position bias ``score + table[h, kv_idx - q_idx + T - 1]``.

    Args:
      table: ``[N, T+S-1]``; column ``T - 1`` holds distance 0 (``[N, 2T-1]`` when S = T).
      T: the query length.

    Returns:
      A ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"relative_bias: expected table of shape [N, T+S-1], got {table.shape}")

    def score_mod(score, b, h, q_idx, kv_idx):
        del b
        return score + table[h, kv_idx - q_idx + (T - 1)].astype(score.dtype)

    return score_mod


def t5_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
    """T5's bucket of a relative position: exact when small, log-spaced after.

    Args:
      relative_position: integer ``kv_idx - q_idx`` (any shape).
      num_buckets: buckets in all (split between the two directions when bidirectional).
      max_distance: distances from here on share the last bucket.
      bidirectional: separate buckets for keys before and after the query.

    Returns:
      Integer buckets in ``[0, num_buckets)``, the shape of ``relative_position``.
    """
    n = -relative_position
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + jnp.where(n < 0, num_buckets, 0)
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    n_f = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_f / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(n < max_exact, n, large)


def t5_bias(table, *, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5-style bucketed relative bias ``score + table[h, t5_bucket(kv_idx - q_idx)]``.

    Args:
      table: ``[N, num_buckets]`` learned biases.
      max_distance: as in ``t5_bucket``.
      bidirectional: as in ``t5_bucket``.

    Returns:
      A ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"t5_bias: expected table of shape [N, num_buckets], got {table.shape}")
    num_buckets = table.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        del b
        bucket = t5_bucket(kv_idx - q_idx, num_buckets, max_distance, bidirectional)
        return score + table[h, bucket].astype(score.dtype)

    return score_mod
