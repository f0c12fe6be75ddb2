"""``BlockMask``: which key blocks each query block sees, and ``create_block_mask``.

Shape glossary: B batch (1 = broadcast), N heads (1 = broadcast), T query length, S key
length, bq/bk query/key block sizes, nq = ceil(T/bq) query blocks, nk = ceil(S/bk) key blocks.

Layout (the per-row counts + indices layout of FlexAttention and splash attention, so a
Pallas kernel can consume it unchanged). For every (b, h, query block i):

- ``kv_num_blocks[b, h, i]``: how many key blocks are *partly* visible (``mask_mod`` must be
  evaluated there); ``kv_indices[b, h, i, :kv_num_blocks]`` lists them in increasing order.
- ``full_kv_num_blocks`` / ``full_kv_indices``: the blocks that are *fully* visible (no
  ``mask_mod`` evaluation, no padded key).
- ``q_num_blocks``, ``q_indices``, ``full_q_num_blocks``, ``full_q_indices``: the transposed
  view, per key block, for the backward pass.

Entries past a row's count repeat its last listed block (or 0), so they are always valid
indices. A block counted nowhere is skipped entirely.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn.flex import convert


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Block-sparse visibility of a ``mask_mod`` (see the module docstring for the layout).

    ``B`` and ``N`` are 1 where the mask does not depend on them; nq = T / bq, nk = S / bk
    (rounded up).

    Attributes:
      kv_num_blocks: int32 ``[B, N, nq]``: partially visible key blocks per query block.
      kv_indices: int32 ``[B, N, nq, nk]``: their indices, first ``kv_num_blocks`` valid.
      full_kv_num_blocks: int32 ``[B, N, nq]``: fully visible key blocks (no mask evaluated).
      full_kv_indices: int32 ``[B, N, nq, nk]``.
      q_num_blocks: int32 ``[B, N, nk]``: the transpose, for the backward pass.
      q_indices: int32 ``[B, N, nk, nq]``.
      full_q_num_blocks: int32 ``[B, N, nk]``.
      full_q_indices: int32 ``[B, N, nk, nq]``.
      seq_lengths: static ``(T, S)``.
      block_size: static ``(bq, bk)``.
      mask_mod: the static ``mask_mod`` it was built from.
    """

    kv_num_blocks: jax.Array  # [B, N, nq]
    kv_indices: jax.Array  # [B, N, nq, nk]
    full_kv_num_blocks: jax.Array  # [B, N, nq]
    full_kv_indices: jax.Array  # [B, N, nq, nk]
    q_num_blocks: jax.Array  # [B, N, nk]
    q_indices: jax.Array  # [B, N, nk, nq]
    full_q_num_blocks: jax.Array  # [B, N, nk]
    full_q_indices: jax.Array  # [B, N, nk, nq]
    seq_lengths: tuple[int, int] = dataclasses.field(metadata=dict(static=True))  # (T, S)
    block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True))  # (bq, bk)
    mask_mod: Callable | None = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, N, T, S) the mask was built for (B, N = 1: broadcast)."""
        B, N = self.kv_num_blocks.shape[:2]
        return (B, N) + tuple(self.seq_lengths)

    def to_dense(self) -> jax.Array:
        """Block-level visibility ``int32 [B, N, nq, nk]``: 0 skipped, 1 partial, 2 full."""
        nk = self.kv_indices.shape[-1]
        partial = _dense_rows(self.kv_num_blocks, self.kv_indices, nk)
        full = _dense_rows(self.full_kv_num_blocks, self.full_kv_indices, nk)
        return partial.astype(jnp.int32) + 2 * full.astype(jnp.int32)

    def sparsity(self) -> jax.Array:
        """Fraction of tiles skipped (over every (b, h) of the mask)."""
        visited = self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum()
        return 1.0 - visited / self.kv_indices.size


def _dense_rows(counts, indices, n):
    """counts [..., r], indices [..., r, n] -> bool [..., r, n]: which blocks are listed."""
    listed = jnp.arange(indices.shape[-1]) < counts[..., None]  # [..., r, n]
    hot = jax.nn.one_hot(indices, n, dtype=jnp.int32) * listed[..., None]  # [..., r, n, n]
    return hot.sum(-2) > 0


def _counts_and_indices(flags):
    """bool [..., r, n] -> (counts int32 [..., r], indices int32 [..., r, n]).

    The indices of the True entries come first, in increasing order; the rest repeat the
    last of them (0 for an empty row), so every entry is a valid block index. Slot s holds the
    first index where the running count of True entries reaches s + 1 (a binary search per
    slot: cheaper on CPU than sorting each row).
    """
    n = flags.shape[-1]
    running = jnp.cumsum(flags, axis=-1, dtype=jnp.int32)  # [..., r, n]
    counts = running[..., -1]  # [..., r]
    # Slots past the count look for the last True entry again.
    want = jnp.minimum(jnp.arange(1, n + 1, dtype=jnp.int32), jnp.maximum(counts, 1)[..., None])  # [..., r, n]
    search = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side="left", method="scan"))
    found = search(running.reshape(-1, n), want.reshape(-1, n)).reshape(running.shape)  # [..., r, n]
    return counts, jnp.where(counts[..., None] > 0, found, 0).astype(jnp.int32)


def _static_counts_and_indices(flags: np.ndarray):
    """``_counts_and_indices`` in NumPy, at trace time (the arrays become constants of the program)."""
    counts = flags.sum(-1).astype(np.int32)  # [..., r]
    order = np.argsort(~flags, axis=-1, kind="stable").astype(np.int32)  # [..., r, n]: listed blocks first
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)  # [..., r, 1]
    keep = np.arange(flags.shape[-1]) < counts[..., None]  # [..., r, n]
    return counts, np.where(keep, order, np.where(counts[..., None] > 0, last, 0)).astype(np.int32)


def block_arrays(partial, full):
    """The eight ``BlockMask`` arrays from bool ``partial``/``full`` block matrices ``[B, N, nq, nk]``:
    NumPy arrays for NumPy flags (patterns known at trace time), else computed by the program."""
    counts_and_indices = _static_counts_and_indices if isinstance(partial, np.ndarray) else _counts_and_indices
    kv_num, kv_idx = counts_and_indices(partial)
    fkv_num, fkv_idx = counts_and_indices(full)
    partial_t, full_t = (x.swapaxes(-1, -2) for x in (partial, full))  # [B, N, nk, nq]
    q_num, q_idx = counts_and_indices(partial_t)
    fq_num, fq_idx = counts_and_indices(full_t)
    return kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx


def _block_size_pair(block_size) -> tuple[int, int]:
    pair = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair):
        raise ValueError(f"block_size: expected a positive int or (block_q, block_kv), got {block_size!r}")
    return pair


def _size(name: str, x, allow_none: bool) -> int:
    if x is None and allow_none:
        return 1
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {x!r}")
    return x


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _block_arrays(mod, Bm, Nm, T, S, bq, bk, consts):
    """The ``BlockMask`` arrays of a converted mask_mod, one [bq, S] strip of the mask at a time.

    Each strip is reduced in one fused pass to how many of its rows see each key (a small
    unsigned count, the cheapest reduction on CPU); a tile is visible where some key's count is
    positive and full where every key's count is the number of real rows (a padded key counts
    0, so a tile holding one is never full).
    """
    nq, nk = _ceil_div(T, bq), _ceil_div(S, bk)
    count_dtype = jnp.uint8 if bq < 256 else jnp.int32

    def one_head(b, h):
        def q_row(i):
            q_idx = i * bq + jnp.arange(bq, dtype=jnp.int32)  # [bq]
            kv_idx = jnp.arange(nk * bk, dtype=jnp.int32)  # [nk*bk]
            vis = (q_idx < T)[:, None] & (kv_idx < S)[None, :]  # [bq, nk*bk]
            vis = vis & convert.on_tile(mod, consts, b, h, jnp.minimum(q_idx, T - 1), jnp.minimum(kv_idx, S - 1))
            seen_by = vis.astype(count_dtype).sum(0, dtype=count_dtype).reshape(nk, bk)  # [nk, bk]
            real_rows = jnp.minimum(T - i * bq, bq).astype(count_dtype)
            any_ = seen_by.max(-1) > 0  # [nk]
            all_ = seen_by.min(-1) == real_rows  # [nk]
            return any_ & ~all_, all_

        return jax.lax.map(q_row, jnp.arange(nq, dtype=jnp.int32))  # [nq, nk] each

    over_h = jax.vmap(one_head, in_axes=(None, 0))
    over_b = jax.vmap(over_h, in_axes=(0, None))
    partial, full = over_b(jnp.arange(Bm, dtype=jnp.int32), jnp.arange(Nm, dtype=jnp.int32))  # [Bm, Nm, nq, nk]
    return block_arrays(partial, full)


def create_block_mask(mask_mod: Callable | None, B: int | None, N: int | None, T: int, S: int, *,
                      block_size: int | tuple[int, int] = 128) -> BlockMask:
    """Evaluate ``mask_mod`` tile by tile into a ``BlockMask``.

    Never builds the whole [T, S] mask: one row of tiles ([bq, S] booleans) at a time, reduced
    to "any visible" / "all visible" per tile. Jittable: ``mask_mod`` may close over traced
    arrays (document ids of this batch), and the result can be used inside the same trace.

    Args:
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` on scalars, or None (every key
        visible; only tiles holding padded keys are partial).
      B: batch size, or None to broadcast (the mod then sees ``b = 0``).
      N: number of query heads, or None to broadcast (``h = 0``).
      T: query length.
      S: key length.
      block_size: ``bq`` or ``(bq, bk)``; T and S need not be multiples of it.

    Returns:
      ``BlockMask`` with counts ``[B|1, N|1, nq]`` and indices ``[B|1, N|1, nq, nk]`` plus the
      transposed view.
    """
    Bm, Nm = _size("B", B, True), _size("N", N, True)
    T, S = _size("T", T, False), _size("S", S, False)
    bq, bk = _block_size_pair(block_size)
    if mask_mod is None:  # known at trace time: every tile visible, full unless it holds a padded key
        full = np.arange(_ceil_div(S, bk)) * bk + bk <= S  # [nk]
        full = np.broadcast_to(full, (Bm, Nm, _ceil_div(T, bq), full.shape[0]))  # [Bm, Nm, nq, nk]
        arrays = tuple(jnp.asarray(x) for x in block_arrays(~full, full))
    else:
        mod = convert.convert("mask_mod", mask_mod)
        arrays = _block_arrays(mod._replace(consts=()), Bm, Nm, T, S, bq, bk, mod.consts)
    return BlockMask(*arrays, (T, S), (bq, bk), mask_mod)  # [Bm, Nm, nq, ...]
