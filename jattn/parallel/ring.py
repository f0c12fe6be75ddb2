"""Ring attention: exact attention over a sequence sharded across the devices of a mesh axis.

Shape glossary: B batch, P devices on the ring axis, T / S global query / key length,
Tl = T/P and Sl = S/P the local (per-device) lengths, N query heads, K key/value heads,
G = N/K query heads per kv head, H query/key head dim, Hv value head dim, c = Tl/2 (zig-zag),
bq / bk the query / key rows of a tile.

Call ``ring_attention`` inside ``jax.shard_map`` with the sequence axis of query, key and value
sharded over ``axis_name``. Device ``i`` keeps its query block and its key/value block; the
key/value blocks travel around the ring with ``lax.ppermute`` (device i sends to i+1), so at
step ``s`` device ``i`` holds the block of device ``(i - s) mod P``. Each step is the
``'chunked'`` algorithm on the pair (local queries, visiting block): a loop over [bq, bk] tiles,
each one ``jattn.flex.kernel.forward_tile`` (the tile step of jattn's one block-sparse loop,
with its NaN rule) folded into the online softmax, so per-device memory is linear in Tl: no
[Tl, Sl] array exists. Only K kv heads travel, never N. The backward pass (custom VJP)
recomputes each tile with ``jattn.flex.kernel.backward_tile`` and sends the dK/dV accumulators
with their blocks; at the end they go home in one hop.

Skipping: a tile (and a whole step) that no query can see under the causal mask, the local
window, the lengths, the segment ids (disjoint id ranges) or a ``mask_mod`` is not computed
(``lax.switch`` on an unbatched predicate); a tile entirely inside the causal/window bounds
is computed without evaluating them.

Mods (``jattn.flex``'s ``mask_mod`` / ``score_mod``) see global indices: original positions,
and the global batch row / query head when the batch / heads are sharded too (``batch_axis``,
``head_axis``). A score_mod's closed-over arrays are arguments of the custom VJP, so they get
gradients (evaluated on tiles inside ``shard_map`` by ``jattn.flex.convert.on_tile``). With a
local window the schedule itself is shortened (``_hops``):
blocks travel only as far as some query can see, in one or both directions, so a window of
W costs about W/Tl steps and transfers each way instead of P - 1.

Layouts (where global sequence rows live):

- ``'contiguous'``: device i holds rows ``[i·Tl, (i+1)·Tl)``. Under a causal mask device i
  has work at i+1 of the P steps: the last device works P times as long as the first.
- ``'zigzag'``: the sequence is cut into 2P chunks of c rows; device i holds chunk i followed
  by chunk 2P-1-i. Under a causal mask every device does the same work at every step: the
  diagonal step is a causal block, every other step is exactly half a block (all queries
  against the first key half when the key block comes from a lower device, the second query
  half against all keys otherwise); the hidden tiles are skipped.

What the caller does for ``'zigzag'``: permute every per-position array (tokens, embeddings,
targets, segment ids, position ids) with ``to_layout(x, P, 'zigzag')`` BEFORE sharding, keep
the model in that order (everything except attention is per position), and pass RoPE / learned
position embeddings the permuted positions ``layout_positions(T, P, 'zigzag')`` — the original
index of each row — instead of ``arange(T)``. ``from_layout`` restores the original order of
the output (a per-position loss can instead compare against permuted targets). Lengths
(``query_seq_lengths``, ``key_value_seq_lengths``) always count original positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core import _checks, _finite, spec
from jattn.kernels.chunked import DEFAULT_BLOCK_KV
from jattn.flex import convert, kernel
from jattn.core.masks import causal, combine_masks, local_window, padding, same_segment

LAYOUTS = ("contiguous", "zigzag")


# ----------------------------------------------------------------------------------------
# Layouts: which original position each local row holds.
# ----------------------------------------------------------------------------------------


def _local_positions(layout: str, device, local_len: int, num_devices: int) -> jax.Array:
    """[local_len] original positions of the rows that ``device`` (int or traced) holds."""
    r = jnp.arange(local_len)  # [L]
    if layout == "contiguous":
        return device * local_len + r
    c = local_len // 2
    return jnp.where(r < c, device * c + r, (2 * num_devices - 1 - device) * c + (r - c))  # [L]


def layout_positions(length: int, num_devices: int, layout: str) -> jax.Array:
    """The original position of each row of a sequence stored in ``layout``.

    Use it as the position ids (RoPE, position embeddings) of permuted inputs.

    Args:
      length: the global sequence length, divisible by ``num_devices`` (by ``2·num_devices``
        for ``'zigzag'``).
      num_devices: P, the devices of the sequence axis.
      layout: ``'contiguous'`` or ``'zigzag'``.

    Returns:
      ``[length]`` int positions.
    """
    _checks.choice("layout", layout, LAYOUTS)
    _check_divisible("length", length, num_devices, layout)
    local = length // num_devices
    return jnp.concatenate(
        [_local_positions(layout, d, local, num_devices) for d in range(num_devices)]
    )  # [length]


def _take_rows(x, rows, axis: int) -> jax.Array:
    """``x`` with its ``axis`` reindexed by ``rows``, keeping x's sharding (explicit meshes too)."""
    index = (slice(None),) * axis + (rows,)
    return x.at[index].get(out_sharding=jax.typeof(x).sharding)


def to_layout(x, num_devices: int, layout: str, *, axis: int = 1) -> jax.Array:
    """Reorder ``x`` along its sequence axis from original order into ``layout``.

    Args:
      x: an array whose ``axis`` is the sequence, e.g. ``[B, T, N, H]`` or ``[B, T]``.
      num_devices: P, the devices of the sequence axis.
      layout: ``'contiguous'`` (nothing moves) or ``'zigzag'``.
      axis: the sequence axis.

    Returns:
      ``x`` with its rows permuted (same shape and sharding).
    """
    x = jnp.asarray(x)
    return _take_rows(x, layout_positions(x.shape[axis], num_devices, layout), axis)


def from_layout(x, num_devices: int, layout: str, *, axis: int = 1) -> jax.Array:
    """Inverse of ``to_layout``: rows stored in ``layout`` back to original order.

    Args:
      x: an array whose ``axis`` is the sequence, stored in ``layout``.
      num_devices: P, the devices of the sequence axis.
      layout: ``'contiguous'`` or ``'zigzag'``.
      axis: the sequence axis.

    Returns:
      ``x`` with its rows in original order (same shape and sharding).
    """
    x = jnp.asarray(x)
    order = layout_positions(x.shape[axis], num_devices, layout)  # [L]
    return _take_rows(x, jnp.argsort(order), axis)


def _check_divisible(name: str, length: int, num_devices: int, layout: str) -> None:
    chunks = 2 * num_devices if layout == "zigzag" else num_devices
    if length % chunks:
        why = f"2 x {num_devices} zig-zag chunks" if layout == "zigzag" else f"{num_devices} devices"
        raise ValueError(
            f"{name}: expected a sequence length divisible by {chunks} ({why}), got {length}"
        )


NO_DENSE_MASKS = "ring attention supports only masks that are cheap per block (is_causal, lengths, segment ids)"


def check_arrays(query, key, value, bias, mask, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids):
    """``spec.check_arrays`` for the ring's rank-4 arrays without dense masks; returns (B, T, S, N, K)."""
    sh = spec.check_arrays(query, key, value, bias, mask, query_seq_lengths=q_lengths,
                           key_value_seq_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, any_batch=False, dense_masks=NO_DENSE_MASKS)
    return sh.B, sh.T, sh.S, sh.N, sh.K


def axis_size(name: str, axis) -> int:
    """The size of mesh axis ``axis`` of the enclosing shard_map, or a ValueError naming ``name``."""
    try:
        return jax.lax.axis_size(axis)
    except NameError as e:
        raise ValueError(f"{name}: expected a mesh axis of the enclosing shard_map, got {axis!r}") from e


def check_local_layout(layout: str, axis_name, Tl: int, Sl: int) -> int:
    """``layout`` known and, for zig-zag, even local lengths; returns P, the size of ``axis_name``."""
    _checks.choice("layout", layout, LAYOUTS)
    P = axis_size("axis_name", axis_name)
    if layout == "zigzag":
        for name, L in (("query", Tl), ("key", Sl)):
            if L % 2:
                raise ValueError(
                    f"{name}: the zig-zag layout needs an even number of rows per device "
                    f"(sequence length divisible by 2 x {P}), got {L} local rows"
                )
    return P


# ----------------------------------------------------------------------------------------
# Which blocks can see each other: static (schedule) and traced (per tile) versions.
# ----------------------------------------------------------------------------------------


class _Static(NamedTuple):
    axis_name: object
    num_devices: int
    scale: float
    cap: float | None
    is_causal: bool
    layout: str
    window: tuple[int, int] | None  # (left, right) around the diagonal
    bq: int  # query rows of a tile
    bk: int  # key rows of a tile
    hops: tuple[int, int]  # blocks fetched from lower devices, from higher devices
    mask_mod: object = None  # mask_mod(b, h, q_idx, kv_idx) -> bool on original positions, or None
    score_mod: convert.Converted | None = None  # without its consts (they are arguments of _ring)
    batch_axis: object = None  # mesh axis sharding the batch (global b = shard · B + b), or None
    head_axis: object = None  # mesh axis sharding the heads (global h = shard · N + h), or None


def _offset_bounds(is_causal: bool, window):
    """(lo, hi): key position - query position must lie in [lo, hi]; None = unbounded."""
    lo = None if window is None else -window[0]
    hi = None if window is None else window[1]
    if is_causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def _chunks(layout: str, device: int, local_len: int, num_devices: int):
    """The runs of consecutive original positions that ``device`` holds, as (first, last)."""
    if layout == "contiguous":
        return [(device * local_len, (device + 1) * local_len - 1)]
    c = local_len // 2
    return [(device * c, (device + 1) * c - 1), ((2 * num_devices - 1 - device) * c, (2 * num_devices - device) * c - 1)]


def _hops(is_causal: bool, window, layout: str, P: int, Tl: int, Sl: int) -> tuple[int, int]:
    """(forward, backward): how far blocks travel each way so that every visible pair meets.

    Block offset d (device i works on the block of device i - d) is needed when some query
    run and key run have a pair within the offset bounds. Forward hops cover offsets 1..f,
    backward hops offsets P-b..P-1; the pair (f, b) with the fewest hops wins, so a window of
    W needs about W/Tl blocks each way instead of P - 1.
    """
    lo, hi = _offset_bounds(is_causal, window)

    def may_see(me, src):
        return any(
            (hi is None or k0 - q1 <= hi) and (lo is None or k1 - q0 >= lo)
            for q0, q1 in _chunks(layout, me, Tl, P)
            for k0, k1 in _chunks(layout, src, Sl, P)
        )

    needed = [d for d in range(1, P) if any(may_see(me, (me - d) % P) for me in range(P))]
    best = (P - 1, 0)
    for f in range(P - 1):
        b = max((P - d for d in needed if d > f), default=0)
        if f + b < sum(best):
            best = (f, b)
    return best


class _Queries(NamedTuple):
    """What stays on the device: the query block, the per-example masks and the mods' inputs."""

    q: jax.Array  # [B, Tl, K, G, H] in the compute dtype
    q_len: jax.Array | None  # [B]
    kv_len: jax.Array | None  # [B]
    q_seg: jax.Array | None  # [B, Tl]
    heads: jax.Array | None = None  # [B, K, G, 2] int32: global (batch row, query head) of each local head
    consts: tuple = ()  # the arrays the score_mod closed over
    q_nan: jax.Array | None = None  # [B, Tl, K, G]: NaN where the query row was non-finite, else 0


def _global_heads(st: _Static, B: int, K: int, G: int) -> jax.Array:
    """[B, K, G, 2]: the global batch row and query head (h = k·G + g) of each local head."""
    b0 = 0 if st.batch_axis is None else jax.lax.axis_index(st.batch_axis) * B
    h0 = 0 if st.head_axis is None else jax.lax.axis_index(st.head_axis) * (K * G)
    b = jnp.broadcast_to(b0 + jnp.arange(B)[:, None, None], (B, K, G))  # [B, K, G]
    h = jnp.broadcast_to(h0 + jnp.arange(K * G).reshape(1, K, G), (B, K, G))  # [B, K, G]
    return jnp.stack([b, h], axis=-1).astype(jnp.int32)  # [B, K, G, 2]


class _Block(NamedTuple):
    """What travels around the ring."""

    k: jax.Array  # [B, Sl, K, H]
    v: jax.Array  # [B, Sl, K, Hv]
    kv_seg: jax.Array | None  # [B, Sl]


class _Tile(NamedTuple):
    """Original positions and segment ids of a tile's query rows and key rows."""

    q_pos: jax.Array  # [tq]
    k_pos: jax.Array  # [tk]
    q_seg: jax.Array | None  # [B, tq]
    kv_seg: jax.Array | None  # [B, tk]


def _tile_kind(st: _Static, qs: _Queries, t: _Tile):
    """0: nothing visible (skip), 1: compute with the causal/window mask, 2: compute, every
    pair inside the causal/window bounds. An unbatched scalar (reduced over the batch), so
    ``lax.switch`` on it really skips. Conservative: a tile kind 1/2 may still be all hidden.
    """
    lo, hi = _offset_bounds(st.is_causal, st.window)
    d_min = jnp.min(t.k_pos) - jnp.max(t.q_pos)
    d_max = jnp.max(t.k_pos) - jnp.min(t.q_pos)
    some, full = jnp.bool_(True), jnp.bool_(True)
    if hi is not None:
        some, full = some & (d_min <= hi), full & (d_max <= hi)
    if lo is not None:
        some, full = some & (d_max >= lo), full & (d_min >= lo)
    if qs.q_len is not None:
        some = some & (jnp.min(t.q_pos) < jnp.max(qs.q_len))
    if qs.kv_len is not None:
        some = some & (jnp.min(t.k_pos) < jnp.max(qs.kv_len))
    if t.q_seg is not None:  # segment id ranges that overlap in some example
        overlap = (jnp.min(t.q_seg, 1) <= jnp.max(t.kv_seg, 1)) & (jnp.max(t.q_seg, 1) >= jnp.min(t.kv_seg, 1))
        some = some & jnp.any(overlap)
    return jnp.where(some, jnp.where(full, 2, 1), 0)


def _mod_mask(mask_mod, heads, q_pos, k_pos):
    """[B, K, G, tq, tk]: ``mask_mod(b, h, q_idx, kv_idx)`` on global heads and original positions."""
    f = jax.vmap(mask_mod, in_axes=(None, None, None, 0))  # over keys
    f = jax.vmap(f, in_axes=(None, None, 0, None))  # over queries
    for _ in range(3):  # over G, K and the batch
        f = jax.vmap(f, in_axes=(0, 0, None, None))
    out = f(heads[..., 0], heads[..., 1], q_pos, k_pos)  # [B, K, G, tq, tk]
    return jnp.broadcast_to(out, heads.shape[:3] + (q_pos.shape[0], k_pos.shape[0])).astype(bool)


def _tile_mask(st: _Static, qs: _Queries, t: _Tile, structural: bool, mod=None):
    """[B, tq, tk] bool visibility of a tile ([B, K, G, tq, tk] with a mask_mod, whose values
    ``mod`` are given), or None when everything is visible."""
    mask = _shared_mask(st, qs, t, structural)
    if mod is None:
        return mask
    return mod if mask is None else mod & mask[:, None, None]


def _kind_and_mod(st: _Static, qs: _Queries, t: _Tile):
    """(``_tile_kind``, the mask_mod's values [B, K, G, tq, tk] or None): a tile that the
    mask_mod hides entirely is skipped too."""
    kind = _tile_kind(st, qs, t)
    if st.mask_mod is None:
        return kind, None
    mod = _mod_mask(st.mask_mod, qs.heads, t.q_pos, t.k_pos)  # [B, K, G, tq, tk]
    return jnp.where(jnp.any(mod), kind, 0), mod


def _step_visible(st: _Static, qs: _Queries, blk: "_Block", pos: "_Positions"):
    """[] bool: whether some tile of this step may be visible (a loop over the tiles, so that
    a mask_mod is never evaluated on the whole [Tl, Sl] block at once)."""
    some = _tile_kind(st, qs, _whole_block(qs, blk, pos)) > 0
    if st.mask_mod is None:
        return some
    nq, nk = qs.q.shape[1] // st.bq, blk.k.shape[1] // st.bk

    def tile(n, seen):
        kind, _ = _kind_and_mod(st, qs, _tile(st, qs, blk, pos, n // nk, n % nk))
        return seen | (kind > 0)

    none = qs.heads[0, 0, 0, 0] < 0  # [] False, varying like q (a loop carry must)
    return some & jax.lax.fori_loop(0, nq * nk, tile, none)


def _score(st: _Static, t: "_Tile", bh, kv_major: bool):
    """``score(s, consts)`` of one head's tile on global indices (bh [2]: its batch row and head):
    the soft cap, then the score_mod; s is [tq, tk] ([tk, tq] when ``kv_major``)."""
    zero = bh[0] * 0  # varying like q: so are the positions then

    def score(s, consts):
        if st.cap is not None:
            s = st.cap * jnp.tanh(s / st.cap)
        if st.score_mod is None:
            return s
        return convert.on_tile(st.score_mod, consts, s, bh[0], bh[1], t.q_pos + zero, t.k_pos + zero,
                               kv_major=kv_major).astype(s.dtype)

    return score


def _logits_fn(st: _Static, mask, kv_major: bool):
    """``scores -> (logits, visible | None)`` of one head's tile: ``mask [tq, tk]`` (or None) and,
    with a score_mod, its ``-inf`` scores hide entries."""

    def logits_fn(scores):
        parts = [] if mask is None else [mask.T if kv_major else mask]
        if st.score_mod is not None:
            parts.append(scores != -jnp.inf)
        return scores, combine_masks(*parts)

    return logits_fn


def _finite_rows(x, i, size: int, dtype):
    """Rows ``[i·size, (i+1)·size)`` of ``x [B, L, K, d]`` as the flex tile steps take them:
    (``[B, size, K, d]`` in ``dtype``, non-finite entries zeroed; ``[B, size, K]`` NaN where the
    row was non-finite, else 0). Per tile, so that no finite copy of a whole block is held."""
    x = _rows(x, i, size).astype(dtype)
    return _finite.zeroed(x), _finite.nan_rows(x, dtype)


def _shared_mask(st: _Static, qs: _Queries, t: _Tile, structural: bool):
    """[B, tq, tk] bool visibility shared by all heads, or None when everything is visible."""
    B = qs.q.shape[0]
    q_pos, k_pos = t.q_pos[:, None], t.k_pos[None, :]  # [tq, 1], [1, tk]
    parts = []
    if structural and st.is_causal:
        parts.append(causal(q_pos, k_pos))  # [tq, tk]
    if structural and st.window is not None:
        parts.append(local_window(q_pos, k_pos, st.window))  # [tq, tk]
    if qs.q_len is not None or qs.kv_len is not None:
        q_len = None if qs.q_len is None else qs.q_len[:, None, None]  # [B, 1, 1]
        kv_len = None if qs.kv_len is None else qs.kv_len[:, None, None]  # [B, 1, 1]
        parts.append(padding(q_pos[None], k_pos[None], q_len, kv_len))  # [B, tq, tk]
    if t.q_seg is not None:
        parts.append(jax.vmap(same_segment)(t.q_seg, t.kv_seg))  # [B, tq, tk]
    mask = combine_masks(*parts)
    return None if mask is None else jnp.broadcast_to(mask, (B,) + mask.shape[-2:])


def _switch(st: _Static, kind, compute, state):
    """Skip (kind 0) or ``compute(state, structural)`` (kind 1: masked, 2: inside the bounds)."""
    if _offset_bounds(st.is_causal, st.window) == (None, None):
        return jax.lax.cond(kind > 0, lambda s: compute(s, False), lambda s: s, state)
    branches = [lambda s: s, lambda s: compute(s, True), lambda s: compute(s, False)]
    return jax.lax.switch(kind, branches, state)


def _over_heads(fn, n_q_like: int, n_kv_like: int, grads: bool):
    """vmap ``fn(*q_like, *kv_like, mask, bh)`` over G, K and B like ``multihead._lift``.

    q_like args are [B, tq, K, G, ...], kv_like args [B, tk, K, ...], mask [B, tq, tk] |
    [B, K, G, tq, tk] | None, bh [B, K, G, 2] the global (batch row, head) of each head.
    Outputs are q_like ([B, tq, K, G, ...]); with ``grads`` fn returns (dq, dk, dv, d_consts):
    dk, dv [B, tk, K, ...] are summed over the G query heads that share a kv head and the
    tuple d_consts over every head.
    """
    q_axes, kv_axes = (1,) * n_q_like, (1,) * n_kv_like
    out_axes = (1, 1, 1, 0) if grads else 1

    def sum_heads(d_consts, axis):
        return tuple(jnp.sum(d, axis=axis) for d in d_consts)

    def lifted(*args):
        m = 0 if args[-2] is not None and args[-2].ndim == 5 else None  # per-head mask [B, K, G, tq, tk]
        over_g = jax.vmap(fn, in_axes=q_axes + (None,) * n_kv_like + (m, 0), out_axes=out_axes)

        def per_kv_head(*args):
            outs = over_g(*args)
            if not grads:
                return outs
            dq, dk, dv, dc = outs  # dk [tk, G, H], dv [tk, G, Hv], dc [G, ...] each
            return dq, jnp.sum(dk, axis=1), jnp.sum(dv, axis=1), sum_heads(dc, 0)

        over_k = jax.vmap(per_kv_head, in_axes=q_axes + kv_axes + (m, 0), out_axes=out_axes)
        outs = jax.vmap(over_k, in_axes=0, out_axes=0)(*args)
        if not grads:
            return outs
        dq, dk, dv, dc = outs  # dc [B, K, ...] each
        return dq, dk, dv, sum_heads(sum_heads(dc, 0), 0)

    return lifted


def _rows(x, i, size: int):
    """Rows ``[i·size, (i+1)·size)`` of axis 1 (the sequence) of ``x``; None stays None."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _put_rows(x, rows, i, size: int):
    return jax.lax.dynamic_update_slice_in_dim(x, rows, i * size, axis=1)


def _loop(n: int, body, carry):
    """``fori_loop(0, n, body, carry)``, a plain call when n is 1 (smaller programs)."""
    return body(0, carry) if n == 1 else jax.lax.fori_loop(0, n, body, carry)


# ----------------------------------------------------------------------------------------
# One ring step: every tile between the local queries and the key/value block that is here.
# ----------------------------------------------------------------------------------------


class _Positions(NamedTuple):
    q: jax.Array  # [Tl] original positions of the local query rows
    k: jax.Array  # [Sl] original positions of the key rows of the block that is here


def _positions(st: _Static, qs: _Queries, blk: _Block, me, src) -> _Positions:
    return _Positions(
        _local_positions(st.layout, me, qs.q.shape[1], st.num_devices),
        _local_positions(st.layout, src, blk.k.shape[1], st.num_devices),
    )


def _whole_block(qs: _Queries, blk: _Block, pos: _Positions) -> _Tile:
    return _Tile(pos.q, pos.k, qs.q_seg, blk.kv_seg)


def _tile(st: _Static, qs: _Queries, blk: _Block, pos: _Positions, i, j) -> _Tile:
    """Query tile ``i`` against key tile ``j``."""
    return _Tile(
        jax.lax.dynamic_slice_in_dim(pos.q, i * st.bq, st.bq),  # [bq]
        jax.lax.dynamic_slice_in_dim(pos.k, j * st.bk, st.bk),  # [bk]
        _rows(qs.q_seg, i, st.bq),  # [B, bq]
        _rows(blk.kv_seg, j, st.bk),  # [B, bk]
    )


def _forward_step(st: _Static, qs: _Queries, carry, blk: _Block, me, src):
    """Fold the key/value block of device ``src`` into the online-softmax state ``carry``
    (m, l [B, Tl, K, G], acc [B, Tl, K, G, Hv]), one [bq, bk] tile at a time."""
    pos = _positions(st, qs, blk, me, src)
    nq, nk = qs.q.shape[1] // st.bq, blk.k.shape[1] // st.bk

    def q_tile(i, carry):
        q = _finite.zeroed(_rows(qs.q, i, st.bq)) * st.scale  # [B, bq, K, G, H]

        def k_tile(j, state):
            t = _tile(st, qs, blk, pos, i, j)
            kind, mod = _kind_and_mod(st, qs, t)

            def one_head(m, l, acc, q, k, v, k_nan, v_nan, mask, bh):
                return kernel.forward_tile((m, l, acc), q, k.T, v, k_nan, v_nan, _score(st, t, bh, False), qs.consts,
                                           _logits_fn(st, mask, False))

            def fold(state, structural):
                mask = _tile_mask(st, qs, t, structural, mod)
                (k, k_nan), (v, v_nan) = (_finite_rows(x, j, st.bk, q.dtype) for x in (blk.k, blk.v))
                return _over_heads(one_head, 4, 4, False)(*state, q, k, v, k_nan, v_nan, mask, qs.heads)

            return _switch(st, kind, fold, state)

        state = _loop(nk, k_tile, tuple(_rows(x, i, st.bq) for x in carry))
        return tuple(_put_rows(x, s, i, st.bq) for x, s in zip(carry, state))

    if nq == nk == 1:  # one tile: its own switch skips it
        return q_tile(0, carry)
    some = _step_visible(st, qs, blk, pos)
    return jax.lax.cond(some, lambda c: jax.lax.fori_loop(0, nq, q_tile, c), lambda c: c, carry)


def _backward_step(st: _Static, qs: _Queries, res, stays, dkv, blk: _Block, me, src):
    """Add the gradients of every tile against the block of device ``src``: ``stays`` = (dq
    [B, Tl, K, G, H], d_consts: the gradients of the score_mod's floating consts) stay
    here, dkv = (dk [B, Sl, K, H], dv [B, Sl, K, Hv]) belongs to the block."""
    do, lse, delta = res  # [B, Tl, K, G, Hv], [B, Tl, K, G] (+inf where it was -inf), [B, Tl, K, G]
    pos = _positions(st, qs, blk, me, src)
    nq, nk = qs.q.shape[1] // st.bq, blk.k.shape[1] // st.bk

    def k_tile(j, grads):
        (dq, dc), (dk, dv) = grads
        k, v = (_finite.zeroed(_rows(x, j, st.bk).astype(qs.q.dtype)) for x in (blk.k, blk.v))  # [B, bk, K, H|Hv]

        def q_tile(i, inner):
            t = _tile(st, qs, blk, pos, i, j)
            kind, mod = _kind_and_mod(st, qs, t)

            def one_head(q, do, lse, delta, k, v, mask, bh):
                dk, dv, dq_t, _, dc = kernel.backward_tile(
                    jnp.zeros_like(k), jnp.zeros_like(v), q, q.T, do, do.T, lse, delta, k, k.T, v,
                    _score(st, t, bh, True), qs.consts, _logits_fn(st, mask, True), st.scale)
                return dq_t.T, dk, dv, dc  # [bq, H], [bk, H], [bk, Hv], floating consts' gradients

            def grad(inner, structural):
                dq, dc, dk_j, dv_j = inner
                mask = _tile_mask(st, qs, t, structural, mod)
                q = _finite.zeroed(_rows(qs.q, i, st.bq)) * st.scale  # [B, bq, K, G, H]
                dq_t, dk_t, dv_t, dc_t = _over_heads(one_head, 4, 2, True)(
                    q, _rows(do, i, st.bq), _rows(lse, i, st.bq), _rows(delta, i, st.bq),
                    k, v, mask, qs.heads,
                )
                dc = tuple(a + b for a, b in zip(dc, dc_t))
                return _put_rows(dq, _rows(dq, i, st.bq) + dq_t, i, st.bq), dc, dk_j + dk_t, dv_j + dv_t

            return _switch(st, kind, grad, inner)

        dq, dc, dk_j, dv_j = _loop(nq, q_tile, (dq, dc, jnp.zeros_like(k), jnp.zeros_like(v)))
        dk = _put_rows(dk, _rows(dk, j, st.bk) + dk_j, j, st.bk)
        dv = _put_rows(dv, _rows(dv, j, st.bk) + dv_j, j, st.bk)
        return (dq, dc), (dk, dv)

    if nq == nk == 1:  # one tile: its own switch skips it
        return k_tile(0, (stays, dkv))
    some = _step_visible(st, qs, blk, pos)
    return jax.lax.cond(some, lambda g: jax.lax.fori_loop(0, nk, k_tile, g), lambda g: g, (stays, dkv))


# ----------------------------------------------------------------------------------------
# The schedule: the local block, then ``hops`` blocks from each side.
# ----------------------------------------------------------------------------------------


def _ring_loop(st: _Static, blk: _Block, step, stays, travels):
    """Visit the local key/value block and the blocks the schedule needs.

    ``step(stays, travels, blk, me, src) -> (stays, travels)``: ``stays`` is the per-query state
    (softmax state, dQ), ``travels`` the per-key state (dK/dV, () in the forward pass), which
    moves with its block and is sent home at the end of each direction.
    """
    me = jax.lax.axis_index(st.axis_name)
    stays, travels = step(stays, travels, blk, me, me)
    for direction, hops in zip((1, -1), st.hops):
        if hops:
            stays, back = _relay(st, blk, step, stays, jax.tree.map(jnp.zeros_like, travels), me, direction, hops)
            travels = jax.tree.map(jnp.add, travels, back)
    return stays, travels


def _relay(st: _Static, blk: _Block, step, stays, travels, me, direction: int, hops: int):
    """``hops`` steps with blocks moving one device in ``direction`` per step; the next block
    is requested before the current one is used, so the transfer can overlap the compute."""
    P = st.num_devices

    def shift(x, by: int):
        perm = [(d, (d + by) % P) for d in range(P)]
        return jax.tree.map(lambda a: jax.lax.ppermute(a, st.axis_name, perm), x)

    def body(h, carry):
        stays, travels, blk = carry
        nxt = shift(blk, direction)
        stays, travels = step(stays, travels, blk, me, (me - direction * h) % P)
        return stays, shift(travels, direction), nxt

    stays, travels, blk = jax.lax.fori_loop(1, hops, body, (stays, travels, shift(blk, direction)))
    stays, travels = step(stays, travels, blk, me, (me - direction * hops) % P)
    return stays, shift(travels, -direction * hops)  # home


# ----------------------------------------------------------------------------------------
# Forward and backward passes over the ring.
# ----------------------------------------------------------------------------------------


def _compute_dtype(dtype):
    """fp32 for fp32 and narrower inputs, fp64 for fp64."""
    return jnp.promote_types(dtype, jnp.float32)


def _queries(st: _Static, q, q_len, kv_len, q_seg, consts) -> _Queries:
    """The per-device state; the mods' inputs vary over the mesh axes like q (a score_mod's
    jaxpr is evaluated as is, and its operations need equal variance)."""
    B, _, K, G, _ = q.shape
    zero = jnp.zeros_like(jnp.sum(q[..., :0]), dtype=jnp.int32)  # [] 0 varying like q
    consts = tuple(c + zero.astype(jnp.result_type(c)) for c in consts)
    heads = _global_heads(st, B, K, G) + zero  # [B, K, G, 2]
    q = q.astype(_compute_dtype(q.dtype))
    return _Queries(q, q_len, kv_len, q_seg, heads, consts, _finite.nan_rows(q, q.dtype))  # q_nan [B, Tl, K, G]


def _forward(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg, consts):
    """q [B, Tl, K, G, H] -> (out [B, Tl, K, G, Hv], lse [B, Tl, K, G]) in the compute dtype."""
    B, Tl, K, G, H = q.shape
    Hv = v.shape[-1]
    qs = _queries(st, q, q_len, kv_len, q_seg, consts)
    rows = B * Tl * K * G  # the state's rows, flat for the tile steps
    carry = kernel.init_carry(qs.q.reshape(rows, H), Hv)  # the empty state; varies like q
    carry = tuple(x.reshape((B, Tl, K, G) + x.shape[1:]) for x in carry)  # [B, Tl, K, G(, Hv)]

    def step(carry, travels, blk, me, src):
        return _forward_step(st, qs, carry, blk, me, src), travels

    (m, l, acc), _ = _ring_loop(st, _Block(k, v, kv_seg), step, carry, ())
    out, lse = kernel.finalize_rows((m.reshape(rows), l.reshape(rows), acc.reshape(rows, Hv)), qs.q_nan.reshape(rows))
    return out.reshape(B, Tl, K, G, Hv), lse.reshape(B, Tl, K, G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg, consts):
    out, _ = _forward(st, q, k, v, q_len, kv_len, q_seg, kv_seg, consts)
    return out.astype(q.dtype)


def _ring_fwd(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg, consts):
    out, lse = _forward(st, q, k, v, q_len, kv_len, q_seg, kv_seg, consts)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_len, kv_len, q_seg, kv_seg, consts, out, lse)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _sum_over_devices(d, like):
    """``d`` (computed from this device's shards) summed over the mesh axes over which it
    varies and ``like`` (the primal it is the gradient of) does not."""
    axes = tuple(sorted(convert.varying_axes(d) - convert.varying_axes(like), key=str))
    return jax.lax.psum(d, axes) if axes else d


def _ring_bwd(st: _Static, res, d_out):
    q, k, v, q_len, kv_len, q_seg, kv_seg, consts, out, lse = res
    cd = _compute_dtype(q.dtype)
    qs = _queries(st, q, q_len, kv_len, q_seg, consts)
    do = d_out.astype(cd)  # [B, Tl, K, G, Hv]
    delta = jnp.sum(do * out.astype(cd), axis=-1)  # [B, Tl, K, G]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # [B, Tl, K, G]; rows that saw nothing get P = 0
    dq = jnp.zeros_like(qs.q)  # [B, Tl, K, G, H]
    zero = jnp.zeros_like(jnp.sum(qs.q[..., :0]))  # [] 0 varying like q (a loop carry must)
    floats = [c for c in consts if _floating(c)]
    dc = tuple(jnp.zeros_like(c) + zero.astype(jnp.result_type(c)) for c in floats)
    dkv = (jnp.zeros_like(k, dtype=cd), jnp.zeros_like(v, dtype=cd))  # [B, Sl, K, H|Hv]

    def step(stays, dkv, blk, me, src):
        return _backward_step(st, qs, (do, lse, delta), stays, dkv, blk, me, src)

    (dq, dc), (dk, dv) = _ring_loop(st, _Block(k, v, kv_seg), step, (dq, dc), dkv)
    it = iter(_sum_over_devices(d, c).astype(jnp.result_type(c)) for d, c in zip(dc, floats))
    dc = tuple(next(it) if _floating(c) else None for c in consts)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, dc


_ring.defvjp(_ring_fwd, _ring_bwd)


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _tile_sizes(block_sizes, Tl: int, Sl: int) -> tuple[int, int]:
    """(bq, bk) dividing the local lengths: the given ones, or the largest up to 'chunked''s defaults."""
    if block_sizes is None:
        return _divisor_at_most(Tl, 256), _divisor_at_most(Sl, DEFAULT_BLOCK_KV)
    return spec.check_block_sizes(block_sizes, divide=(Tl, Sl), what="local query and key lengths")


# ----------------------------------------------------------------------------------------
# Public entry.
# ----------------------------------------------------------------------------------------


def ring_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    axis_name,
    is_causal: bool = False,
    scale: float | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    layout: str = "contiguous",
    block_sizes: tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    batch_axis=None,
    head_axis=None,
):
    """Exact multi-head attention over a sequence sharded along ``axis_name``; call inside
    ``jax.shard_map``.

    The result equals ``jattn.dot_product_attention`` on the unsharded (original-order)
    arrays with the same arguments, returned as the local shard in the same layout. Key/value
    blocks (the K kv heads only, never N) travel around the ring; a window shortens it
    (blocks travel only as far as some query can see). Gradients flow to q, k, v and to the
    floating arrays a ``score_mod`` closes over (summed over the devices).

    Args:
      query: the LOCAL ``[B, Tl, N, H]`` shard, rows in ``layout``.
      key: the local ``[B, Sl, K, H]`` shard, N a multiple of K.
      value: the local ``[B, Sl, K, Hv]`` shard.
      bias: must be None: masks must be cheap per block (ValueError otherwise).
      mask: must be None, likewise.
      axis_name: the mesh axis of the enclosing shard_map the sequence is sharded over.
      is_causal: top-left causal; needs Tl == Sl (self-attention).
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(H)``.
      query_seq_lengths: ``[B]`` GLOBAL lengths in original positions (replicated).
      key_value_seq_lengths: ``[B]`` GLOBAL lengths in original positions (replicated).
      q_segment_ids: local ``[B, Tl]``, in ``layout``; both segment ids or neither.
      kv_segment_ids: local ``[B, Sl]``, in ``layout``.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)``.
      local_window_size: ``w`` or ``(left, right)`` around the (top-left) diagonal.
      layout: ``'contiguous'`` or ``'zigzag'`` (see the module docstring for what the caller
        permutes).
      block_sizes: ``(bq, bk)`` tiles of each ring step, dividing the local lengths; by
        default the largest divisors up to (256, 256).
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (``jattn.flex``'s convention, on
        scalars), evaluated tile by tile on GLOBAL indices: original positions whatever the
        layout, and the global batch row and query head when ``batch_axis`` / ``head_axis``
        are named (otherwise ``b``/``h`` index the local shard). A tile (a whole ring step)
        it hides entirely is skipped (steps are still communicated).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` after ``scale`` and
        ``logits_soft_cap``, on the same indices; a ``-inf`` score hides the entry.
      batch_axis: the mesh axis the batch is also sharded over, if any.
      head_axis: the mesh axis the heads are also sharded over, if any.

    Returns:
      The local ``[B, Tl, N, Hv]`` shard of the output, in ``layout``.
    """
    B, Tl, Sl, N, K = check_arrays(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        q_segment_ids, kv_segment_ids,
    )
    P = check_local_layout(layout, axis_name, Tl, Sl)
    if is_causal and Tl != Sl:
        raise ValueError(
            f"key: causal ring attention needs as many key rows as query rows per device, got "
            f"{Sl} key rows and {Tl} query rows"
        )
    H = query.shape[-1]
    scale, logits_soft_cap, window = spec.options(H, scale, logits_soft_cap, local_window_size, P * (Tl + Sl))
    bq, bk = _tile_sizes(block_sizes, Tl, Sl)
    hops = _hops(bool(is_causal), window, layout, P, Tl, Sl)
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod: expected a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis)):
        if axis is not None:
            axis_size(name, axis)
    smod, consts = None, ()
    if score_mod is not None:
        smod = convert.convert("score_mod", score_mod, _compute_dtype(_checks.dtype_of("query", query)))
        smod, consts = smod._replace(consts=()), smod.consts
    st = _Static(axis_name, P, scale, logits_soft_cap, bool(is_causal), layout, window, bq, bk, hops, mask_mod,
                 smod, batch_axis, head_axis)
    q = jnp.reshape(query, (B, Tl, K, N // K, H))  # [B, Tl, K, G, H]
    out = _ring(st, q, key, value, query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids,
                consts)
    return jnp.reshape(out, (B, Tl, N, value.shape[-1]))  # [B, Tl, N, Hv]
