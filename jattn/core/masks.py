"""Attention masks: which keys each query may see.

Shape glossary: T query length, S key length, B batch.

Every mask here is boolean with True meaning "may attend". The predicates at the top work on
position arrays that broadcast against each other, so the same code builds a whole [T, S]
mask (the ``'xla'`` path) or one [block_q, block_k] tile of it (the ``'chunked'`` path).

Positions: query row ``i`` sits at position ``i + offset`` on the key axis. ``offset = 0``
aligns the causal diagonal to the top-left corner (jax.nn's convention); ``offset = S - T``
aligns it to the bottom-right corner, which is what decoding with a KV cache needs (the last
query sees every key).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------------------
# Elementwise predicates on broadcasting position arrays.
# ----------------------------------------------------------------------------------------


def causal(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Key at ``k_pos`` is visible from query at ``q_pos`` iff ``k_pos <= q_pos``.

    Args:
      q_pos: query positions on the key axis, e.g. ``[T, 1]``.
      k_pos: key positions, broadcasting against ``q_pos``, e.g. ``[1, S]``.

    Returns:
      bool, the broadcast shape (``[T, S]``).
    """
    return k_pos <= q_pos


def local_window(q_pos: jax.Array, k_pos: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Visible iff ``q_pos - left <= k_pos <= q_pos + right``.

    Args:
      q_pos: query positions on the key axis, e.g. ``[T, 1]``.
      k_pos: key positions, broadcasting against ``q_pos``, e.g. ``[1, S]``.
      window: ``(left, right)`` non-negative ints.

    Returns:
      bool, the broadcast shape (``[T, S]``).
    """
    left, right = window
    return (k_pos >= q_pos - left) & (k_pos <= q_pos + right)


def padding(q_idx: jax.Array, k_idx: jax.Array, q_length=None, kv_length=None) -> jax.Array:
    """Visible iff the query row is below ``q_length`` and the key below ``kv_length``.

    Args:
      q_idx: query row indices, e.g. ``[T, 1]``.
      k_idx: key indices, broadcasting against ``q_idx``, e.g. ``[1, S]``.
      q_length: valid query rows (broadcasting), or None for all.
      kv_length: valid keys (broadcasting), or None for all.

    Returns:
      bool, the broadcast shape (``[T, S]``).
    """
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), dtype=bool)
    if q_length is not None:
        ok = ok & (q_idx < q_length)
    if kv_length is not None:
        ok = ok & (k_idx < kv_length)
    return ok


def same_segment(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Visible iff query and key carry the same segment id.

    Args:
      q_segment_ids: ``[T]`` integers.
      kv_segment_ids: ``[S]`` integers.

    Returns:
      bool ``[T, S]``.
    """
    return q_segment_ids[:, None] == kv_segment_ids[None, :]  # [T, S]


# ----------------------------------------------------------------------------------------
# Dense [T, S] masks built from the predicates (use them on their own, or combine them).
# ----------------------------------------------------------------------------------------


def causal_mask(T: int, S: int, *, offset: int = 0) -> jax.Array:
    """The dense causal mask.

    Args:
      T: query length.
      S: key length.
      offset: query row i sits at key position ``i + offset``; ``S - T`` aligns the diagonal
        to the bottom-right corner.

    Returns:
      bool ``[T, S]``, True = attend.
    """
    q_pos = jnp.arange(T)[:, None] + offset  # [T, 1]
    return causal(q_pos, jnp.arange(S)[None, :])  # [T, S]


def local_window_mask(T: int, S: int, window: int | tuple[int, int], *, offset: int = 0) -> jax.Array:
    """The dense sliding-window mask.

    Args:
      T: query length.
      S: key length.
      window: ``w`` (meaning ``(w, w)``) or ``(left, right)``.
      offset: as in ``causal_mask``.

    Returns:
      bool ``[T, S]``, True = attend.
    """
    window = (window, window) if isinstance(window, int) else tuple(window)
    q_pos = jnp.arange(T)[:, None] + offset  # [T, 1]
    return local_window(q_pos, jnp.arange(S)[None, :], window)  # [T, S]


def padding_mask(T: int, S: int, q_lengths=None, kv_lengths=None) -> jax.Array:
    """The dense padding mask from per-example lengths.

    Args:
      T: query length.
      S: key length.
      q_lengths: ``[B]`` valid query rows, or None.
      kv_lengths: ``[B]`` valid keys, or None (at least one of the two is given).

    Returns:
      bool ``[B, T, S]``, True = attend.
    """
    lengths = q_lengths if q_lengths is not None else kv_lengths
    B = jnp.shape(lengths)[0]
    q_len = None if q_lengths is None else jnp.asarray(q_lengths)[:, None, None]  # [B, 1, 1]
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths)[:, None, None]  # [B, 1, 1]
    ok = padding(jnp.arange(T)[None, :, None], jnp.arange(S)[None, None, :], q_len, kv_len)
    return jnp.broadcast_to(ok, (B, T, S))  # [B, T, S]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """The dense mask of packed sequences: a query sees the keys of its own segment.

    Args:
      q_segment_ids: ``[B, T]`` integers.
      kv_segment_ids: ``[B, S]`` integers.

    Returns:
      bool ``[B, T, S]``, True = attend.
    """
    return jax.vmap(same_segment)(jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids))


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None.

    Args:
      *masks: bool arrays that broadcast against each other, or None.

    Returns:
      bool of the broadcast shape, or None if every mask is None.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


# ----------------------------------------------------------------------------------------
# The structured mask of one head, as the attention implementations see it.
# ----------------------------------------------------------------------------------------


class StructuredMask(NamedTuple):
    """Masks of one (batch, head) pair that are cheap to evaluate on any tile.

    ``tile`` evaluates the mask on query rows ``q_idx`` and key columns ``k_idx``.

    Attributes:
      is_causal: static; causal from ``offset``.
      offset: static; query row i sits at key position ``i + offset``.
      window: static ``(left, right)``, or None.
      q_length: scalar valid query rows, or None.
      kv_length: scalar valid keys, or None.
      q_segment_ids: ``[T]`` integers, or None.
      kv_segment_ids: ``[S]`` integers, or None.
    """

    is_causal: bool = False
    offset: int = 0
    window: tuple[int, int] | None = None
    q_length: jax.Array | None = None
    kv_length: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None

    def tile(self, q_idx: jax.Array, k_idx: jax.Array) -> jax.Array | None:
        """The mask on one tile.

        Args:
          q_idx: ``[tq]`` query row indices.
          k_idx: ``[tk]`` key indices.

        Returns:
          bool ``[tq, tk]``, or None when nothing is masked.
        """
        q_pos = q_idx[:, None] + self.offset  # [tq, 1]
        k_pos = k_idx[None, :]  # [1, tk]
        parts = []
        if self.is_causal:
            parts.append(causal(q_pos, k_pos))
        if self.window is not None:
            parts.append(local_window(q_pos, k_pos, self.window))
        if self.q_length is not None or self.kv_length is not None:
            parts.append(padding(q_idx[:, None], k_pos, self.q_length, self.kv_length))
        if self.q_segment_ids is not None:
            parts.append(same_segment(self.q_segment_ids[q_idx], self.kv_segment_ids[k_idx]))
        return combine_masks(*parts)
