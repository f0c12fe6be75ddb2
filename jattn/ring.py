"""Ring attention: exact attention over a sequence sharded across the devices of a mesh axis.

Shape glossary: B batch, P devices on the ring axis, T / S global query / key length,
Tl = T/P and Sl = S/P the local (per-device) lengths, N query heads, K key/value heads,
G = N/K query heads per kv head, H query/key head dim, Hv value head dim, c = Tl/2 (zig-zag).

Call ``ring_attention`` inside ``jax.shard_map`` with the sequence axis of query, key and value
sharded over ``axis_name``. Device ``i`` keeps its query block and its key/value block; the
key/value blocks travel around the ring with ``lax.ppermute`` (device i sends to i+1), so at
step ``s`` device ``i`` holds the block of device ``(i - s) mod P`` and folds it into its
online softmax (``blockwise.forward_block``). Only K kv heads travel, never N. The backward
pass (custom VJP) recomputes each tile with ``blockwise.backward_block`` and sends the dK/dV
accumulators around the ring with their blocks; after P hops they are back with their owner.

Layouts (where global sequence rows live):

- ``'contiguous'``: device i holds rows ``[i·Tl, (i+1)·Tl)``. Under a causal mask device i
  has work at i+1 of the P steps: the last device works P times as long as the first.
- ``'zigzag'``: the sequence is cut into 2P chunks of c rows; device i holds chunk i followed
  by chunk 2P-1-i. Under a causal mask every device does the same work at every step: the
  diagonal step is a causal tile, every other step is exactly half a tile (all queries
  against the first key half when the key block comes from a lower device, the second query
  half against all keys otherwise); fully hidden tiles are skipped with ``lax.switch``.

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

from jattn import _checks, blockwise
from jattn.masks import causal, combine_masks, padding, same_segment

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
    """[length] original position of each row of a sequence stored in ``layout``.

    Use it as the position ids (RoPE, position embeddings) of permuted inputs.
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
    """Reorder ``x`` along ``axis`` (the sequence) from original order into ``layout``."""
    x = jnp.asarray(x)
    return _take_rows(x, layout_positions(x.shape[axis], num_devices, layout), axis)


def from_layout(x, num_devices: int, layout: str, *, axis: int = 1) -> jax.Array:
    """Inverse of ``to_layout``: rows stored in ``layout`` back to original order."""
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


# ----------------------------------------------------------------------------------------
# Argument checks shared with sequence_parallel_attention (global shapes there, local here).
# ----------------------------------------------------------------------------------------


def check_arrays(query, key, value, bias, mask, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids):
    """Validate the array arguments; returns (B, T, S, N, K)."""
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            raise ValueError(
                f"{name}: ring attention supports only masks that are cheap per block (is_causal, "
                f"lengths, segment ids); a dense [T, S] {name} is not supported, got an array of "
                f"shape {_checks.shape_of(name, x)}"
            )
    q_shape = _checks.rank("query", query, 4, "[B, T, N, H]")
    k_shape = _checks.rank("key", key, 4, "[B, S, K, H]")
    v_shape = _checks.rank("value", value, 4, "[B, S, K, Hv]")
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.floating(name, x)
    dts = {n: _checks.dtype_of(n, x) for n, x in (("query", query), ("key", key), ("value", value))}
    if len(set(dts.values())) != 1:
        raise TypeError(f"query, key, value: expected one dtype, got {dts}")
    B, T, N, H = q_shape
    if k_shape[0] != B or k_shape[3] != H:
        raise ValueError(f"key: expected shape ({B}, S, K, {H}) matching query {q_shape}, got {k_shape}")
    S, K = k_shape[1], k_shape[2]
    if v_shape[:3] != k_shape[:3]:
        raise ValueError(f"value: expected shape {k_shape[:3] + ('Hv',)} matching key {k_shape}, got {v_shape}")
    if K == 0 or N % K:
        raise ValueError(
            f"query, key: the number of query heads N={N} must be a multiple of the key/value heads K={K}"
        )
    for name, x in (("query_seq_lengths", q_lengths), ("key_value_seq_lengths", kv_lengths)):
        if x is not None:
            _checks.integer(name, x)
            _checks.exact_shape(name, x, (B,), "[B]")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "q_segment_ids, kv_segment_ids: expected both or neither, got "
            f"q_segment_ids={'None' if q_segment_ids is None else 'an array'}, "
            f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}"
        )
    for name, x, L in (("q_segment_ids", q_segment_ids, T), ("kv_segment_ids", kv_segment_ids, S)):
        if x is not None:
            _checks.integer(name, x)
            _checks.exact_shape(name, x, (B, L), "[B, T]" if name[0] == "q" else "[B, S]")
    return B, T, S, N, K


# ----------------------------------------------------------------------------------------
# One ring step: the tile between the local queries and the key/value block that is here.
# ----------------------------------------------------------------------------------------


class _Static(NamedTuple):
    axis_name: object
    num_devices: int
    scale: float
    cap: float | None
    is_causal: bool
    layout: str


class _Queries(NamedTuple):
    """What stays on the device: the query block and the per-example masks."""

    q: jax.Array  # [B, Tl, K, G, H]
    q_len: jax.Array | None  # [B]
    kv_len: jax.Array | None  # [B]
    q_seg: jax.Array | None  # [B, Tl]


class _Block(NamedTuple):
    """What travels around the ring."""

    k: jax.Array  # [B, Sl, K, H]
    v: jax.Array  # [B, Sl, K, Hv]
    kv_seg: jax.Array | None  # [B, Sl]


# A region of a tile: (query rows, key rows, needs the causal mask). Rows are static slices.
_ALL = slice(None)


def _regions(st: _Static, Tl: int):
    """The tile regions to compute, indexed by the step's case (see ``_case``); None = skip."""
    if not st.is_causal:
        return [(_ALL, _ALL, False)]
    if st.layout == "contiguous":
        # diagonal block, block from a lower device (all visible), from a higher one (hidden).
        return [(_ALL, _ALL, True), (_ALL, _ALL, False), None]
    c = Tl // 2
    # diagonal; lower device: its first chunk precedes both of ours, its second follows both;
    # higher device: both its chunks precede our second chunk and follow our first.
    return [(_ALL, _ALL, True), (_ALL, slice(0, c), False), (slice(c, None), _ALL, False)]


def _case(st: _Static, me, src):
    """Index into ``_regions``: 0 on the diagonal, 1 for a lower source device, 2 for higher."""
    if not st.is_causal:
        return 0
    return jnp.where(src == me, 0, jnp.where(src < me, 1, 2))


def _tile_mask(st: _Static, qs: _Queries, blk: _Block, me, src, rows, cols, use_causal):
    """[B, tq, tk] bool visibility of a region, or None when everything is visible."""
    B, Tl = qs.q.shape[:2]
    Sl = blk.k.shape[1]
    q_pos = _local_positions(st.layout, me, Tl, st.num_devices)[rows]  # [tq]
    k_pos = _local_positions(st.layout, src, Sl, st.num_devices)[cols]  # [tk]
    parts = []
    if use_causal:
        parts.append(causal(q_pos[:, None], k_pos[None, :]))  # [tq, tk]
    if qs.q_len is not None or qs.kv_len is not None:
        q_len = None if qs.q_len is None else qs.q_len[:, None, None]  # [B, 1, 1]
        kv_len = None if qs.kv_len is None else qs.kv_len[:, None, None]  # [B, 1, 1]
        parts.append(padding(q_pos[None, :, None], k_pos[None, None, :], q_len, kv_len))  # [B, tq, tk]
    if qs.q_seg is not None:
        parts.append(jax.vmap(same_segment)(qs.q_seg[:, rows], blk.kv_seg[:, cols]))  # [B, tq, tk]
    mask = combine_masks(*parts)
    return None if mask is None else jnp.broadcast_to(mask, (B, q_pos.shape[0], k_pos.shape[0]))


def _over_heads(fn, n_q_like: int, n_kv_like: int, sum_kv_outputs: bool):
    """vmap ``fn(*q_like, *kv_like, mask)`` over G, K and B like ``multihead._lift``.

    q_like args are [B, tq, K, G, ...], kv_like args [B, tk, K, ...], mask [B, tq, tk] | None.
    Outputs are q_like ([B, tq, K, G, ...]); with ``sum_kv_outputs`` the last two outputs are
    kv_like gradients, summed over the G query heads that share a kv head.
    """
    q_axes, kv_axes = (1,) * n_q_like, (1,) * n_kv_like
    over_g = jax.vmap(fn, in_axes=q_axes + (None,) * n_kv_like + (None,), out_axes=1)

    def per_kv_head(*args):
        outs = over_g(*args)
        if not sum_kv_outputs:
            return outs
        dq, dk, dv = outs  # dk [tk, G, H], dv [tk, G, Hv]
        return dq, jnp.sum(dk, axis=1), jnp.sum(dv, axis=1)

    over_k = jax.vmap(per_kv_head, in_axes=q_axes + kv_axes + (None,), out_axes=1)
    return jax.vmap(over_k, in_axes=0, out_axes=0)


def _forward_region(st: _Static, carry, qs: _Queries, blk: _Block, me, src, region):
    rows, cols, use_causal = region
    mask = _tile_mask(st, qs, blk, me, src, rows, cols, use_causal)

    def one_head(m, l, acc, q, k, v, mask):
        return blockwise.forward_block((m, l, acc), q, k, v, None, mask, None, st.scale, st.cap)

    k = blk.k[:, cols].astype(jnp.float32)  # [B, tk, K, H]
    v = blk.v[:, cols].astype(jnp.float32)  # [B, tk, K, Hv]
    part = tuple(x[:, rows] for x in carry)
    new = _over_heads(one_head, 4, 2, False)(*part, qs.q[:, rows], k, v, mask)
    return tuple(x.at[:, rows].set(n) for x, n in zip(carry, new))


def _backward_region(st: _Static, grads, qs: _Queries, do, lse, delta, blk: _Block, me, src, region):
    rows, cols, use_causal = region
    mask = _tile_mask(st, qs, blk, me, src, rows, cols, use_causal)

    def one_head(q, do, lse, delta, k, v, mask):
        dq, dk, dv, _ = blockwise.backward_block(q, k, v, do, lse, delta, None, mask, None, st.scale, st.cap)
        return dq, dk, dv

    k = blk.k[:, cols].astype(jnp.float32)  # [B, tk, K, H]
    v = blk.v[:, cols].astype(jnp.float32)  # [B, tk, K, Hv]
    dq, dk, dv = _over_heads(one_head, 4, 2, True)(
        qs.q[:, rows], do[:, rows], lse[:, rows], delta[:, rows], k, v, mask
    )
    g_dq, g_dk, g_dv = grads
    return g_dq.at[:, rows].add(dq), g_dk.at[:, cols].add(dk), g_dv.at[:, cols].add(dv)


def _dispatch(st: _Static, me, src, Tl: int, region_fn, state):
    """Run ``region_fn(state, region)`` for the step's case; skipped cases return ``state``."""
    branches = [
        (lambda s: s) if r is None else functools.partial(lambda r, s: region_fn(s, r), r)
        for r in _regions(st, Tl)
    ]
    if len(branches) == 1:
        return branches[0](state)
    return jax.lax.switch(_case(st, me, src), branches, state)


def _ring_loop(st: _Static, blk: _Block, step, state, rotate_state):
    """Visit the P key/value blocks: ``step(state, blk, me, src) -> state`` for each.

    ``rotate_state(state, send) -> state`` moves the parts of the state that travel with the
    block (the dK/dV accumulators) one hop after each step; after P hops they are home. The
    next block is requested before the current one is used, so the transfer can overlap the
    compute.
    """
    P = st.num_devices
    me = jax.lax.axis_index(st.axis_name)
    send = functools.partial(
        jax.lax.ppermute, axis_name=st.axis_name, perm=[(d, (d + 1) % P) for d in range(P)]
    )

    def body(s, carry):
        state, blk = carry
        nxt = send(blk)
        return rotate_state(step(state, blk, me, (me - s) % P), send), nxt

    state, blk = jax.lax.fori_loop(0, P - 1, body, (state, blk))
    return rotate_state(step(state, blk, me, (me - (P - 1)) % P), send)


# ----------------------------------------------------------------------------------------
# Forward and backward passes over the ring.
# ----------------------------------------------------------------------------------------


def _forward(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg):
    """q [B, Tl, K, G, H] -> (out [B, Tl, K, G, Hv] fp32, lse [B, Tl, K, G])."""
    B, Tl, K, G, _ = q.shape
    Hv = v.shape[-1]
    qs = _Queries(q.astype(jnp.float32), q_len, kv_len, q_seg)
    # The empty online-softmax state; *_like keeps the shard_map variance of q.
    m = jnp.full_like(qs.q[..., 0], -jnp.inf)  # [B, Tl, K, G]
    l = jnp.zeros_like(m)  # [B, Tl, K, G]
    acc = jnp.zeros_like(m, shape=m.shape + (Hv,))  # [B, Tl, K, G, Hv]

    def step(carry, blk, me, src):
        fold = lambda c, region: _forward_region(st, c, qs, blk, me, src, region)
        return _dispatch(st, me, src, Tl, fold, carry)

    m, l, acc = _ring_loop(st, _Block(k, v, kv_seg), step, (m, l, acc), lambda c, send: c)
    out, lse = blockwise.finalize((m.reshape(-1), l.reshape(-1), acc.reshape(-1, Hv)))  # rows flat
    return out.reshape(B, Tl, K, G, Hv), lse.reshape(B, Tl, K, G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, _ = _forward(st, q, k, v, q_len, kv_len, q_seg, kv_seg)
    return out.astype(q.dtype)


def _ring_fwd(st: _Static, q, k, v, q_len, kv_len, q_seg, kv_seg):
    out, lse = _forward(st, q, k, v, q_len, kv_len, q_seg, kv_seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse)


def _ring_bwd(st: _Static, res, d_out):
    q, k, v, q_len, kv_len, q_seg, kv_seg, out, lse = res
    qs = _Queries(q.astype(jnp.float32), q_len, kv_len, q_seg)
    do = d_out.astype(jnp.float32)  # [B, Tl, K, G, Hv]
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # [B, Tl, K, G]
    grads = (
        jnp.zeros_like(qs.q),  # dq [B, Tl, K, G, H]
        jnp.zeros_like(k, dtype=jnp.float32),  # dk [B, Sl, K, H]: travels with its block
        jnp.zeros_like(v, dtype=jnp.float32),  # dv [B, Sl, K, Hv]: travels with its block
    )

    def step(grads, blk, me, src):
        tile = lambda g, region: _backward_region(st, g, qs, do, lse, delta, blk, me, src, region)
        return _dispatch(st, me, src, q.shape[1], tile, grads)

    def rotate(grads, send):
        return grads[0], send(grads[1]), send(grads[2])

    dq, dk, dv = _ring_loop(st, _Block(k, v, kv_seg), step, grads, rotate)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


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
    layout: str = "contiguous",
):
    """Exact multi-head attention over a sequence sharded along ``axis_name``; call inside
    ``jax.shard_map``.

    Arguments are the LOCAL shards: ``query [B, Tl, N, H]``, ``key [B, Sl, K, H]``, ``value
    [B, Sl, K, Hv]`` with N a multiple of K (grouped queries: the K kv heads travel, never N),
    ``q_segment_ids [B, Tl]``, ``kv_segment_ids [B, Sl]`` (in the same layout as the rows).
    ``query_seq_lengths`` / ``key_value_seq_lengths`` ``[B]`` are GLOBAL lengths in original
    positions (replicated over the ring). Rows are stored in ``layout`` (``'contiguous'`` or
    ``'zigzag'``, see the module docstring for what the caller must permute). The result
    equals ``jattn.dot_product_attention`` on the unsharded (original-order) arrays with the
    same arguments, returned as the local ``[B, Tl, N, Hv]`` shard in the same layout.

    Masks must be cheap per block: ``bias`` and a dense ``mask`` raise ValueError. ``is_causal``
    needs equal query and key lengths (self-attention); causality is top-left.
    """
    B, Tl, Sl, N, K = check_arrays(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        q_segment_ids, kv_segment_ids,
    )
    _checks.choice("layout", layout, LAYOUTS)
    try:
        P = jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"axis_name: expected a mesh axis of the enclosing shard_map, got {axis_name!r}"
        ) from e
    if is_causal and Tl != Sl:
        raise ValueError(
            f"key: causal ring attention needs as many key rows as query rows per device, got "
            f"{Sl} key rows and {Tl} query rows"
        )
    if layout == "zigzag":
        for name, L in (("query", Tl), ("key", Sl)):
            if L % 2:
                raise ValueError(
                    f"{name}: the zig-zag layout needs an even number of rows per device "
                    f"(sequence length divisible by 2 x {P}), got {L} local rows"
                )
    H = query.shape[-1]
    scale = 1.0 / H**0.5 if scale is None else _checks.concrete_number("scale", scale)
    if logits_soft_cap is not None:
        logits_soft_cap = _checks.concrete_number("logits_soft_cap", logits_soft_cap, low=0, low_open=True)
    st = _Static(axis_name, P, scale, logits_soft_cap, bool(is_causal), layout)
    q = jnp.reshape(query, (B, Tl, K, N // K, H))  # [B, Tl, K, G, H]
    out = _ring(st, q, key, value, query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids)
    return jnp.reshape(out, (B, Tl, N, value.shape[-1]))  # [B, Tl, N, Hv]
