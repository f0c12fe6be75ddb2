"""Multi-device checks of ring attention, run by tests/test_ring.py in a subprocess.

Usage: ``python tests/ring_checks.py GROUP`` with GROUP in {gradients, forward, windows, memory, errors, ulysses, decode, mask_mod, score_mod}; prints one
JSON object (check name -> measured values). XLA_FLAGS must give 8 host devices before jax
is imported, which is why this is a separate process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from jattn import flex  # noqa: E402
from jattn.parallel import ring  # noqa: E402

PARITY_DEFAULTS = dict(B=2, T=16, N=2, K=2, H=5, Hv=3)


def _inputs(seed, B, T, N, K, H, Hv):
    """NumPy inputs (no eager jax ops: each would compile on its own)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k = rng.standard_normal((B, T, K, H), np.float32)
    v = rng.standard_normal((B, T, K, Hv), np.float32)
    w = rng.standard_normal((B, T, N, Hv), np.float32)  # output cotangent
    return q, k, v, w


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _segments(B, T):
    """[B, T] packed-sequence ids with boundaries at odd places."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        ids[b, (3 + 2 * b) % T:] = 1
        ids[b, (T - 5 + b) % T:] = 2
    return ids


def _compare(mesh, seed=0, *, layout="contiguous", grads=True, dtype=jnp.float32, seg=False,
             kv_lengths=None, q_lengths=None, wrap=(None, None), strategy="ring", ring_only=None, ref_only=None,
             **kwargs):
    """(forward error, [dq, dk, dv errors]) of the ring against single-device attention.

    The ring sees the inputs permuted into ``layout`` and its output is permuted back;
    ``wrap`` = (batch_axis, head_axis) shards those too. One jit computes both sides.
    """
    shape = dict(PARITY_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs) if k in PARITY_DEFAULTS})
    q, k, v, w = _inputs(seed, **shape)
    P_seq = mesh.shape["s"]
    extra = {}
    if seg:
        ids = _segments(shape["B"], shape["T"])
        extra.update(q_segment_ids=ids, kv_segment_ids=ids)
    if kv_lengths is not None:
        extra["key_value_seq_lengths"] = np.asarray(kv_lengths, np.int32)
    if q_lengths is not None:
        extra["query_seq_lengths"] = np.asarray(q_lengths, np.int32)
    batch_axis, head_axis = wrap

    def ring_fn(q, k, v):
        to = lambda x: ring.to_layout(x, P_seq, layout)
        seg_ids = {n: to(x) for n, x in extra.items() if n.endswith("segment_ids")}
        lengths = {n: x for n, x in extra.items() if n.endswith("lengths")}
        out = jattn.sequence_parallel_attention(
            to(q), to(k), to(v), mesh=mesh, axis_name="s", batch_axis=batch_axis,
            head_axis=head_axis, layout=layout, strategy=strategy, **seg_ids, **lengths, **kwargs, **(ring_only or {}),
        )
        return out

    def ref_fn(q, k, v):
        return jattn.dot_product_attention(q, k, v, **extra, **kwargs, **(ref_only or {}))

    def both(q, k, v):
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        out = ring_fn(q, k, v)
        res = {"out": ring.from_layout(out, P_seq, layout), "ref": ref_fn(q, k, v)}
        if grads:
            loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w))
            unpermuted = lambda *a: ring.from_layout(ring_fn(*a), P_seq, layout)
            res["g_ring"] = jax.grad(loss(unpermuted), argnums=(0, 1, 2))(q, k, v)
            res["g_ref"] = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
        return res, out

    with jax.set_mesh(mesh):
        res, out = jax.jit(both)(q, k, v)
    assert out.dtype == dtype and res["out"].dtype == res["ref"].dtype == dtype, (out.dtype, dtype)
    spec = tuple(out.sharding.spec) + (None,) * 3
    assert spec[:3] == (batch_axis, "s", head_axis), out.sharding  # sharded along the sequence
    errs = [_max_err(a, b) for a, b in zip(res["g_ring"], res["g_ref"])] if grads else []
    return _max_err(res["out"], res["ref"]), errs


def gradients():
    """Forward and gradient parity, one jit per case."""
    seq8 = jax.make_mesh((8,), ("s",))
    auto8 = jax.make_mesh((8,), ("s",), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ("d", "s"))
    r = {}
    # Each case mixes features; all use 8 devices on the ring unless on the 2 x 4 grid.
    r["full_zigzag_kv_lengths_empty_rows"] = _compare(seq8, 1, layout="zigzag", kv_lengths=[0, 7], H=7)
    r["causal_contiguous_gqa_seg"] = _compare(seq8, 2, is_causal=True, seg=True, N=6, K=2, T=24)
    r["causal_zigzag_gqa_seg_lengths"] = _compare(
        seq8, 3, layout="zigzag", is_causal=True, seg=True, kv_lengths=[16, 11], q_lengths=[13, 16], N=6, K=3
    )
    r["auto_mesh_causal_zigzag_softcap_scale"] = _compare(
        auto8, 4, layout="zigzag", is_causal=True, logits_soft_cap=2.0, scale=0.7
    )
    r["grid_batch_axis_causal_zigzag_gqa"] = _compare(
        grid, 5, layout="zigzag", is_causal=True, B=4, N=4, K=2, wrap=("d", None)
    )
    return r


def forward():
    """Forward-only parity: head sharding, bf16, jax.nn, pre-sharded inputs, a user's shard_map."""
    seq8 = jax.make_mesh((8,), ("s",))
    auto8 = jax.make_mesh((8,), ("s",), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ("d", "s"))
    r = {}
    r["grid_head_axis_gqa"] = _compare(grid, 6, is_causal=True, N=6, K=2, T=12, wrap=(None, "d"), grads=False)
    r["bf16_causal_zigzag"] = _compare(seq8, 7, layout="zigzag", is_causal=True, dtype=jnp.bfloat16, grads=False)

    # Against jax.nn too (no empty rows): causal zig-zag with grouped queries.
    q, k, v, _ = _inputs(8, 2, 16, 4, 2, 8, 8)
    to = lambda x: ring.to_layout(x, 8, "zigzag")
    with jax.set_mesh(seq8):
        out = jax.jit(lambda q, k, v: ring.from_layout(jattn.sequence_parallel_attention(
            to(q), to(k), to(v), mesh=seq8, axis_name="s", layout="zigzag", is_causal=True), 8, "zigzag"))(q, k, v)
    r["vs_jax_nn"] = (_max_err(out, jax.nn.dot_product_attention(q, k, v, is_causal=True)), [])

    # Already-sharded inputs (sequence on 'd' x heads on 's', the "wrong" way), eager call.
    q, k, v, _ = _inputs(9, 2, 16, 4, 4, 8, 8)
    wrong = NamedSharding(grid, P(None, "d", "s"))
    qs, ks, vs = (jax.device_put(x, wrong) for x in (q, k, v))
    out = jattn.sequence_parallel_attention(qs, ks, vs, mesh=grid, axis_name="s", is_causal=True)
    assert tuple(out.sharding.spec)[:2] == (None, "s"), out.sharding.spec
    r["presharded_inputs"] = (_max_err(out, jattn.dot_product_attention(q, k, v, is_causal=True)), [])

    # ring_attention inside the user's own shard_map (check_vma on), under jit.
    q, k, v, _ = _inputs(10, 1, 16, 2, 1, 4, 4)
    sm = jax.shard_map(
        lambda q, k, v: jattn.ring_attention(q, k, v, axis_name="s", is_causal=True),
        mesh=auto8, in_specs=P(None, "s"), out_specs=P(None, "s"),
    )
    r["user_shard_map"] = (_max_err(jax.jit(sm)(q, k, v), jattn.dot_product_attention(q, k, v, is_causal=True)), [])
    return r


def ulysses():
    """Ulysses (all-to-all) parity, kv-head replication, 'auto', and the collectives in its HLO."""
    seq8 = jax.make_mesh((8,), ("s",))
    grid = jax.make_mesh((2, 4), ("d", "s"))
    heads = jax.make_mesh((4, 2), ("s", "h"))
    u = dict(strategy="ulysses")
    r = {}
    r["causal_contiguous_mha"] = _compare(seq8, 21, is_causal=True, N=8, K=8, **u)
    # K=2 on 8 devices: each kv head sent 4 times; zig-zag, segments, lengths.
    r["causal_zigzag_gqa_replicated_seg_lengths"] = _compare(
        seq8, 22, layout="zigzag", is_causal=True, seg=True, kv_lengths=[16, 11], q_lengths=[13, 16], N=8, K=2, **u
    )
    r["grid_batch_axis_mqa_window_softcap"] = _compare(
        grid, 23, layout="zigzag", is_causal=True, local_window_size=(3, 0), logits_soft_cap=2.0, B=4, N=4, K=1,
        wrap=("d", None), **u
    )
    r["head_axis_gqa_forward"] = _compare(heads, 24, is_causal=True, N=8, K=2, wrap=(None, "h"), grads=False, **u)
    r["auto_picks_ulysses"] = _compare(seq8, 25, is_causal=True, N=8, K=8, strategy="auto")
    # Long enough (T*S >= 512*1024) that the single-device kernel is 'chunked', inside shard_map.
    r["long_chunked_kernel"] = _compare(seq8, 26, is_causal=True, T=1024, N=8, K=2, H=8, Hv=8, **u)

    def collectives(strategy, N):
        q = jax.ShapeDtypeStruct((1, 64, N, 8), jnp.float32)
        f = jax.jit(lambda q: jattn.sequence_parallel_attention(q, q, q, mesh=seq8, axis_name="s", strategy=strategy))
        with jax.set_mesh(seq8):
            hlo = f.lower(q).compile().as_text()
        return [hlo.count(" all-to-all("), hlo.count(" collective-permute(")]

    def explain(N, K, **kw):
        q = jax.ShapeDtypeStruct((1, 64, N, 8), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, 64, K, 8), jnp.float32)
        e = jattn.explain_sequence_parallel(q, kv, kv, mesh=seq8, axis_name="s", strategy="auto", **kw)
        return [e.strategy, e.reason, e.ring_bytes, e.ulysses_bytes]

    r["hlo_ulysses"] = collectives("ulysses", 8)
    r["hlo_ring"] = collectives("ring", 8)
    r["explain_mha"] = explain(8, 8)
    r["explain_heads_do_not_split"] = explain(6, 6)
    r["explain_small_window"] = explain(8, 8, is_causal=True, local_window_size=(4, 0))
    return r


def decode():
    """Context-parallel decoding over a cache sharded on 8 devices vs one device."""
    from jattn.parallel.context_parallel import context_parallel_decode

    r = {}
    rng = np.random.default_rng(30)
    for name, mesh, Tq, lengths in (
        ("one_token_explicit", jax.make_mesh((8,), ("s",)), 1, [37, 5]),  # devices with no valid row
        ("three_tokens_auto_softcap", jax.make_mesh((8,), ("s",), axis_types=(AxisType.Auto,)), 3, [64, 1]),
        ("grid_two_by_four", jax.make_mesh((2, 4), ("d", "s")), 2, [0, 30]),  # a row with no key: 0
    ):
        q = rng.standard_normal((2, Tq, 6, 8), np.float32)
        k = rng.standard_normal((2, 64, 2, 8), np.float32)
        v = rng.standard_normal((2, 64, 2, 5), np.float32)
        kw = dict(logits_soft_cap=3.0, scale=0.4) if "softcap" in name else {}
        lengths = np.asarray(lengths, np.int32)
        with jax.set_mesh(mesh):
            out = context_parallel_decode(q, k, v, mesh=mesh, axis_name="s", key_value_seq_lengths=lengths, **kw)
        ref = jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, **kw)
        r[name] = [_max_err(out, ref), list(out.shape)]
    # What travels: [B, Tq, N(, Hv)] partials only, never the cache.
    mesh = jax.make_mesh((8,), ("s",))
    q, k = jax.ShapeDtypeStruct((2, 1, 6, 8), jnp.float32), jax.ShapeDtypeStruct((2, 4096, 2, 8), jnp.float32)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda q, k: context_parallel_decode(q, k, k, mesh=mesh, axis_name="s")).lower(q, k).compile().as_text()
    r["hlo"] = {op: hlo.count(f" {op}(") for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all")}
    return r


def _mod(b, h, q, kv):
    """A head- and batch-dependent mask on global positions (jnp or NumPy scalars/arrays)."""
    return ((q + 2 * kv + h) % 3 != 0) | (kv == q) | ((b == 1) & (kv < 4))


def mask_mod():
    """Ring attention with a mask_mod on global positions vs a dense [B, N, T, S] mask."""
    seq8 = jax.make_mesh((8,), ("s",))
    B, T, N = 2, 32, 4
    b, h, q, kv = np.ogrid[:B, :N, :T, :T]
    dense = _mod(b, h, q, kv)  # [B, N, T, S]
    r = {}
    r["causal_zigzag_gqa_tiles"] = _compare(
        seq8, 41, layout="zigzag", is_causal=True, N=N, K=2, T=T, block_sizes=(2, 2), ring_only=dict(mask_mod=_mod),
        ref_only=dict(mask=dense))
    r["window_contiguous_seg"] = _compare(
        seq8, 42, local_window_size=(6, 2), seg=True, N=N, K=4, T=T, ring_only=dict(mask_mod=_mod),
        ref_only=dict(mask=dense), strategy="auto")  # 'auto' picks the ring for a mask_mod
    return r


def _bias_mod(table):
    """A score_mod reading the global batch row, head and positions, closing over ``table [B, N]``."""
    def score_mod(score, b, h, q, kv):
        return score + table[b, h] + 0.05 * (q - kv) - 0.5 * ((q + kv + b) % 4 == 0)
    return score_mod


def _flex_compare(mesh, seed, *, axes=(None, None), layout="zigzag", is_causal=False, mask_mod=None,
                  table_shape=None, B=2, T=32, N=4, K=2, H=8, **ring_kwargs):
    """(forward error, [dq, dk, dv, d_table errors]) of sequence_parallel_attention with a
    score_mod (and optional mask_mod) against ``jattn.flex.flex_attention`` on one device."""
    q, k, v, w = _inputs(seed, B, T, N, K, H, H)
    table = np.random.default_rng(seed + 1).standard_normal(table_shape or (B, N)).astype(np.float32)
    P_seq = mesh.shape["s"]
    batch_axis, head_axis = axes
    ref_mask = mask_mod
    if is_causal:
        causal = lambda b, h, qi, ki: qi >= ki
        ref_mask = causal if mask_mod is None else flex.mods.and_masks(causal, mask_mod)

    def ring_loss(q, k, v, table):
        to = lambda x: ring.to_layout(x, P_seq, layout)
        out = jattn.sequence_parallel_attention(
            to(q), to(k), to(v), mesh=mesh, axis_name="s", batch_axis=batch_axis, head_axis=head_axis,
            layout=layout, is_causal=is_causal, score_mod=_bias_mod(table), mask_mod=mask_mod, **ring_kwargs)
        out = ring.from_layout(out, P_seq, layout)
        return jnp.sum(out * w), out

    def ref_loss(q, k, v, table):
        out = flex.flex_attention(q, k, v, score_mod=_bias_mod(table), mask_mod=ref_mask)
        return jnp.sum(out * w), out

    def both(q, k, v, table):
        g = lambda f: jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, table)
        return g(ring_loss), g(ref_loss)

    with jax.set_mesh(mesh):
        (g_ring, out_ring), (g_ref, out_ref) = jax.jit(both)(q, k, v, table)
    return _max_err(out_ring, out_ref), [_max_err(a, b) for a, b in zip(g_ring, g_ref)]


def score_mod():
    """Ring attention with a score_mod (and mask_mod) on global batch rows, heads and positions
    vs flex_attention on one device, forward and gradients (q, k, v and the closed-over table)."""
    seq8 = jax.make_mesh((8,), ("s",))
    cube = jax.make_mesh((2, 2, 2), ("d", "s", "h"))  # batch, sequence and heads all sharded
    r = {}
    r["batch_and_head_axes_causal_zigzag_gqa_mask_mod_tiles"] = _flex_compare(
        cube, 52, axes=("d", "h"), is_causal=True, mask_mod=_mod, block_sizes=(4, 2))
    r["skipped"] = _evaluated_tiles(seq8)
    return r


def _evaluated_tiles(mesh):
    """The (query tile, key tile) pairs on which the ring evaluates a score_mod (forward and
    backward), with a mask_mod of documents of one 4-row tile each: rows of 8 per device in
    tiles of 4, so other devices' steps and the other tile of a step are all hidden."""
    seen = set()

    def record(q, kv):
        q, kv = np.broadcast_arrays(np.asarray(q), np.asarray(kv))
        seen.update(zip((q.reshape(-1) // 4).tolist(), (kv.reshape(-1) // 4).tolist()))

    def score_mod(s, b, h, q, kv):
        jax.debug.callback(record, q, kv)
        return s

    x = _inputs(54, 1, 64, 2, 2, 4, 4)[0]
    attend = lambda x: jattn.sequence_parallel_attention(
        x, x, x, mesh=mesh, axis_name="s", score_mod=score_mod, mask_mod=lambda b, h, q, kv: q // 4 == kv // 4,
        block_sizes=(4, 4))
    with jax.set_mesh(mesh):
        jax.block_until_ready(jax.jit(jax.grad(lambda x: jnp.sum(attend(x))))(x))
    return sorted(seen)


def windows():
    """Local windows (shortened schedules) and steps cut into several tiles, forward and grads."""
    seq8 = jax.make_mesh((8,), ("s",))
    r = {}
    # T=32: 4 rows per device in 2 x 2 tiles; a causal window of 5 needs 2 lower neighbours.
    r["window_causal_contiguous"] = _compare(seq8, 11, is_causal=True, local_window_size=(5, 0), T=32,
                                             block_sizes=(2, 2))
    # Zig-zag: a window inside one chunk needs one neighbour each way.
    r["window_causal_zigzag_gqa_seg"] = _compare(seq8, 12, layout="zigzag", is_causal=True, local_window_size=3,
                                                 seg=True, N=6, K=3, T=32, block_sizes=(2, 1))
    r["window_two_sided_lengths"] = _compare(seq8, 13, local_window_size=(3, 6), kv_lengths=[30, 9], T=32,
                                             block_sizes=(1, 2))
    # Steps of 3 x 2 tiles, every mask at once.
    r["tiles_causal_zigzag_seg_lengths"] = _compare(
        seq8, 14, layout="zigzag", is_causal=True, seg=True, kv_lengths=[40, 29], q_lengths=[37, 48], T=48,
        N=4, K=2, block_sizes=(2, 3),
    )
    return r


def memory():
    """Per-device compiled temp bytes of forward+backward (causal, zig-zag): the ring on 1 device
    and 'chunked' at the same T, the ring on 8 devices at 8x that T, and on 2 devices at 8x T."""
    B, T, N, H = 1, 2048, 4, 64
    r = {}
    for n, length in ((1, T), (2, 8 * T), (8, 8 * T)):
        mesh = jax.make_mesh((n,), ("s",), devices=jax.devices()[:n])
        q = jax.ShapeDtypeStruct((B, length, N, H), jnp.float32)

        def loss(q, k, v):
            out = jattn.sequence_parallel_attention(q, k, v, mesh=mesh, axis_name="s", layout="zigzag", is_causal=True)
            return jnp.sum(out)

        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            r[f"ring_P{n}_T{length}"] = int(step.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes)
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    one = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")),
        argnums=(0, 1, 2),
    ))
    r[f"chunked_T{T}"] = int(one.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes)
    return r


def _error(fn):
    try:
        fn()
    except Exception as e:  # recorded and asserted by the test
        return [type(e).__name__, str(e)]
    return ["no error", ""]


def errors():
    mesh = jax.make_mesh((8,), ("s",))
    q = jnp.ones((2, 16, 2, 4))
    spa = jattn.sequence_parallel_attention
    jit_spa = jax.jit(lambda q, T: spa(q[:, :T], q[:, :T], q[:, :T], mesh=mesh, axis_name="s"), static_argnums=1)
    return {
        "length_not_divisible": _error(lambda: spa(q[:, :12], q[:, :12], q[:, :12], mesh=mesh, axis_name="s")),
        "length_not_divisible_jit": _error(lambda: jit_spa(q, 12)),
        "zigzag_needs_2P": _error(lambda: spa(q[:, :8], q[:, :8], q[:, :8], mesh=mesh, axis_name="s", layout="zigzag")),
        "key_length_not_divisible": _error(lambda: spa(q, q[:, :12], q[:, :12], mesh=mesh, axis_name="s")),
        "batch_not_divisible": _error(lambda: spa(
            q[:1], q[:1], q[:1], mesh=jax.make_mesh((2, 4), ("d", "s")), axis_name="s", batch_axis="d")),
        "heads_not_divisible": _error(lambda: spa(
            jnp.ones((2, 16, 3, 4)), jnp.ones((2, 16, 3, 4)), jnp.ones((2, 16, 3, 4)),
            mesh=jax.make_mesh((4, 2), ("s", "h")), axis_name="s", head_axis="h")),
        "causal_cross_lengths": _error(lambda: spa(q, q[:, :8], q[:, :8], mesh=mesh, axis_name="s", is_causal=True)),
    }


if __name__ == "__main__":
    group = sys.argv[1]
    groups = {
        "gradients": gradients, "forward": forward, "windows": windows, "memory": memory, "errors": errors,
        "ulysses": ulysses, "decode": decode, "mask_mod": mask_mod, "score_mod": score_mod,
    }
    print(json.dumps(groups[group]()))
