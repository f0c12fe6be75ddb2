"""Ring (sequence-parallel) attention: parity with single-device attention on 8 simulated CPU
devices (windows, tiles), per-device memory, layouts, schedules, skipped tiles, and bad input.

The multi-device checks run in subprocesses (tests/ring_checks.py) because the device count
must be set before jax is imported.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.parallel import ring

HERE = os.path.dirname(__file__)


def _run_group(group: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "ring_checks.py"), group],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# One test per subprocess, so that pytest-xdist runs each group once, on one worker.


def test_ring_forward_and_gradients_match_single_device():
    r = _run_group("gradients")
    assert sorted(r) == sorted([
        "full_zigzag_kv_lengths_empty_rows", "causal_contiguous_gqa_seg", "causal_zigzag_gqa_seg_lengths",
        "auto_mesh_causal_zigzag_softcap_scale", "grid_batch_axis_causal_zigzag_gqa",
    ])
    for case, (fwd, grads) in r.items():
        assert fwd < 1e-4, (case, fwd)
        assert len(grads) == 3 and max(grads) < 1e-3, (case, grads)


def test_ring_forward_matches_single_device():
    r = _run_group("forward")
    assert sorted(r) == sorted([
        "grid_head_axis_gqa", "bf16_causal_zigzag", "vs_jax_nn", "presharded_inputs", "user_shard_map",
    ])
    for case, (fwd, _) in r.items():
        assert fwd < (2e-2 if case.startswith("bf16") else 1e-4), (case, fwd)


def test_ring_windows_and_tiles_match_single_device():
    r = _run_group("windows")
    assert sorted(r) == sorted([
        "window_causal_contiguous", "window_causal_zigzag_gqa_seg", "window_two_sided_lengths",
        "tiles_causal_zigzag_seg_lengths",
    ])
    for case, (fwd, grads) in r.items():
        assert fwd < 1e-4, (case, fwd)
        assert len(grads) == 3 and max(grads) < 1e-3, (case, grads)


def test_ring_mask_mod_on_global_positions_matches_dense_mask():
    r = _run_group("mask_mod")
    assert sorted(r) == ["causal_zigzag_gqa_tiles", "window_contiguous_seg"]
    for case, (fwd, grads) in r.items():
        assert fwd < 1e-4, (case, fwd)
        assert len(grads) == 3 and max(grads) < 1e-3, (case, grads)


def test_ring_score_mod_on_global_indices_matches_flex_attention():
    r = _run_group("score_mod")
    skipped = r.pop("skipped")
    assert sorted(r) == ["batch_and_head_axes_causal_zigzag_gqa_mask_mod_tiles"]
    for case, (fwd, grads) in r.items():
        assert fwd < 1e-4, (case, fwd)
        assert len(grads) == 4 and max(grads) < 1e-3, (case, grads)  # q, k, v and the closed-over table
    # Tiles (and whole ring steps) that the mask_mod hides are never computed: the score_mod
    # was evaluated on the 16 diagonal tiles only, never on another device's block.
    assert skipped == [[i, i] for i in range(16)], skipped


def test_ring_score_mod_after_soft_cap_hides_with_minus_inf_on_one_device():
    """One device (no simulated devices needed): the score_mod sees the soft-capped score, a
    ``-inf`` score hides the entry (a row hiding everything gives 0), and the gradients reach
    q, k, v and the closed-over slopes; reference: flex_attention with the cap in its score_mod."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 12, 2, 5)).astype(np.float32) for _ in range(3))
    slopes = np.asarray([0.3, -0.7], np.float32)

    def mod(slopes):
        def score_mod(s, b, h, qi, ki):
            return jnp.where((qi == 3) | (ki == qi + 1), -jnp.inf, s - slopes[h] * jnp.abs(qi - ki))
        return score_mod

    def capped(slopes):
        return lambda s, b, h, qi, ki: mod(slopes)(3.0 * jnp.tanh(s / 3.0), b, h, qi, ki)

    def ring_loss(q, k, v, slopes):
        out = jattn.sequence_parallel_attention(q, k, v, mesh=_one_device_mesh(), axis_name="s", logits_soft_cap=3.0,
                                                score_mod=mod(slopes), block_sizes=(4, 3))
        return jnp.sum(out * np.arange(5)), out

    def ref_loss(q, k, v, slopes):
        out = jattn.flex_attention(q, k, v, score_mod=capped(slopes))
        return jnp.sum(out * np.arange(5)), out

    ring_fn, ref_fn = (jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)) for f in (ring_loss, ref_loss))
    (g_ring, out), (g_ref, ref) = ring_fn(q, k, v, slopes), ref_fn(q, k, v, slopes)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[0, 3], 0.0)  # row 3 sees nothing
    for a, b in zip(g_ring, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(np.asarray(g_ring[3])).min() > 0  # the slopes do get gradients
    # A NaN key row reaches exactly the rows that see it, after the score_mod (as in flex_attention).
    k[0, 6, 0, 2] = np.nan
    (_, out), (_, ref) = ring_fn(q, k, v, slopes), ref_fn(q, k, v, slopes)
    np.testing.assert_allclose(out, ref, atol=1e-5)  # NaN where ref is NaN, equal elsewhere
    nan = np.isnan(np.asarray(out))[0, :, :, 0]  # [T, N]: key 6 of kv head 0 is bad
    assert not nan[:, 1].any() and np.flatnonzero(~nan[:, 0]).tolist() == [3, 5]  # 3, 5: hidden by the mod


def test_memory_per_device_is_linear_in_the_local_length():
    m = _run_group("memory")
    print(json.dumps(m))
    # One device: no more than 'chunked' at the same T.
    assert m["ring_P1_T2048"] <= m["chunked_T2048"], m
    # 8 devices at 8x the length: the same local length, within 2x of 'chunked' on it.
    assert m["ring_P8_T16384"] <= 2 * m["chunked_T2048"], m
    # Fixed length: 4x the devices, over 2x less memory each (the per-tile scratch is constant).
    assert m["ring_P8_T16384"] < m["ring_P2_T16384"] / 2.2, m


ERROR_CASES = {
    "length_not_divisible": ("ValueError", "query: expected a sequence length divisible by 8"),
    "length_not_divisible_jit": ("ValueError", "query: expected a sequence length divisible by 8"),
    "zigzag_needs_2P": ("ValueError", "divisible by 16 (2 x 8 zig-zag chunks), got 8"),
    "key_length_not_divisible": ("ValueError", "key: expected a sequence length divisible by 8"),
    "batch_not_divisible": ("ValueError", "query: expected a batch size divisible by the size 2 of mesh axis 'd'"),
    "heads_not_divisible": ("ValueError", "number of heads divisible by the size 2 of mesh axis 'h', got 3"),
    "causal_cross_lengths": ("ValueError", "key: causal ring attention needs as many key rows"),
}


def test_multi_device_errors():
    errors = _run_group("errors")
    assert sorted(errors) == sorted(ERROR_CASES)
    for case, (kind, text) in ERROR_CASES.items():
        assert errors[case][0] == kind, (case, errors[case])
        assert text in errors[case][1], (case, errors[case])


# ----------------------------------------------------------------------------------------
# In-process: layouts, load balance, and errors that need no second device.
# ----------------------------------------------------------------------------------------


def test_zigzag_positions_by_hand():
    # 2 devices, 4 chunks of 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
    np.testing.assert_array_equal(ring.layout_positions(8, 2, "zigzag"), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(ring.layout_positions(6, 3, "contiguous"), np.arange(6))


@pytest.mark.parametrize("layout", ring.LAYOUTS)
def test_layout_round_trip(layout):
    x = np.arange(2 * 12 * 3).reshape(2, 12, 3)
    y = ring.to_layout(x, 3, layout)
    np.testing.assert_array_equal(ring.from_layout(y, 3, layout), x)
    np.testing.assert_array_equal(y[0, :, 0], x[0, np.asarray(ring.layout_positions(12, 3, layout)), 0])


def _computed_tiles(layout: str, P: int, Tl: int, b: int, window=None):
    """Per device, the tiles it computes over all steps (``_tile_kind > 0``), checking that no
    skipped tile holds a visible pair and that the schedule's hops reach every visible block."""
    f, bwd = ring._hops(True, window, layout, P, Tl, Tl)
    st = ring._Static("s", P, 1.0, None, True, layout, window, b, b, (f, bwd))
    qs = ring._Queries(jnp.zeros((1, Tl, 1, 1, 1)), None, None, None)
    lo, _ = ring._offset_bounds(True, window)
    computed = np.zeros(P, int)
    for me in range(P):
        q_pos = np.asarray(ring._local_positions(layout, me, Tl, P))
        for d in range(P):
            src = (me - d) % P
            k_pos = np.asarray(ring._local_positions(layout, src, Tl, P))
            reached = d <= f or d >= P - bwd
            for i in range(Tl // b):
                for j in range(Tl // b):
                    qp, kp = q_pos[i * b:(i + 1) * b], k_pos[j * b:(j + 1) * b]
                    needed = (kp[None, :] <= qp[:, None]) & (lo is None or kp[None, :] >= qp[:, None] + (lo or 0))
                    kind = int(ring._tile_kind(st, qs, ring._Tile(jnp.asarray(qp), jnp.asarray(kp), None, None)))
                    assert not (needed.any() and (kind == 0 or not reached)), (layout, me, src, i, j)
                    computed[me] += kind > 0 and reached
    return computed


def test_zigzag_balances_causal_work_and_skips_hidden_tiles():
    P, Tl, b = 4, 8, 2  # 4 x 4 tiles per step, each inside one zig-zag chunk
    zigzag = _computed_tiles("zigzag", P, Tl, b)
    assert len(set(zigzag.tolist())) == 1, zigzag  # every device does the same work
    # Diagonal step: 2 causal chunk blocks (3 tiles each) + 1 full chunk block (4): 10 tiles;
    # every other step is half a block: 8 tiles.
    assert zigzag[0] == 10 + (P - 1) * 8, zigzag
    contiguous = _computed_tiles("contiguous", P, Tl, b)
    assert contiguous.tolist() == [10 + 16 * d for d in range(P)], contiguous  # last device P-fold
    assert zigzag.max() < 0.6 * contiguous.max()


def test_window_shortens_the_schedule():
    P, Tl = 8, 16
    assert ring._hops(True, None, "zigzag", P, Tl, Tl) == (P - 1, 0)  # full ring
    assert ring._hops(False, None, "contiguous", P, Tl, Tl) == (P - 1, 0)
    assert ring._hops(True, (16, 0), "contiguous", P, Tl, Tl) == (1, 0)  # one lower neighbour
    assert ring._hops(True, (17, 0), "contiguous", P, Tl, Tl) == (2, 0)
    assert ring._hops(False, (20, 3), "contiguous", P, Tl, Tl) == (2, 1)  # both sides
    assert ring._hops(True, (8, 0), "zigzag", P, Tl, Tl) == (1, 1)  # chunk neighbours on both sides
    assert ring._hops(False, (100, 100), "contiguous", P, Tl, Tl) == (P - 1, 0)  # everything: the ring
    # Every visible tile of a windowed zig-zag schedule is reached and computed; few are.
    windowed = _computed_tiles("zigzag", 4, 8, 2, window=(3, 0))
    assert windowed.max() < _computed_tiles("zigzag", 4, 8, 2).min() / 2, windowed


def _one_device_mesh():
    return jax.make_mesh((1,), ("s",), devices=jax.devices()[:1])


Q = np.ones((1, 4, 2, 3), np.float32)


@pytest.mark.parametrize(
    "kwargs, kind, text",
    [
        (dict(bias=np.zeros((1, 2, 4, 4), np.float32)), ValueError, "bias: ring attention supports only"),
        (dict(mask=np.ones((4, 4), bool)), ValueError, "mask: ring attention supports only"),
        (dict(axis_name="nope"), ValueError, "axis_name: expected one of the mesh axes ('s',), got 'nope'"),
        (dict(axis_name=None), ValueError, "axis_name: expected one of the mesh axes"),
        (dict(batch_axis="s"), ValueError, "axis_name, batch_axis, head_axis: expected distinct"),
        (dict(head_axis="x"), ValueError, "head_axis: expected one of the mesh axes"),
        (dict(mesh="mesh"), TypeError, "mesh: expected a jax.sharding.Mesh"),
        (dict(layout="striped"), ValueError, "layout: expected one of ('contiguous', 'zigzag')"),
        (dict(local_window_size=-1), ValueError, "local_window_size: expected non-negative window sizes"),
        (dict(local_window_size="big"), TypeError, "local_window_size: expected an int or a (left, right)"),
        (dict(mask_mod="causal"), TypeError, "mask_mod: expected a function (b, h, q_idx, kv_idx) -> bool, got str"),
        (dict(score_mod="alibi"), TypeError, "score_mod: expected a function score_mod(score, b, h, q_idx, kv_idx)"),
        (dict(score_mod=lambda s, b, h, q, kv: s, strategy="ulysses"), ValueError,
         "strategy: score_mod runs on the ring only"),
        (dict(block_sizes=(3, 2)), ValueError, "block_sizes: expected (block_q, block_kv) of positive ints dividing"),
        (dict(q_segment_ids=np.zeros((1, 4), np.int32)), ValueError, "q_segment_ids, kv_segment_ids: expected both"),
        (dict(key_value_seq_lengths=np.zeros((2,), np.int32)), ValueError, "key_value_seq_lengths: expected shape (1,)"),
        (dict(key_value_seq_lengths=np.zeros((1,), np.float32)), TypeError, "key_value_seq_lengths: expected an integer"),
        (dict(query=Q.astype(np.int32)), TypeError, "query: expected a floating dtype"),
        (dict(query=Q[0]), ValueError, "query: expected rank 4 ([B, T, N, H])"),
        (dict(key=np.ones((1, 4, 3, 3), np.float32), value=np.ones((1, 4, 3, 3), np.float32)),
         ValueError, "N=2 must be a multiple of the kv heads K=3"),
        (dict(value=np.ones((1, 5, 2, 3), np.float32)), ValueError, "value: expected shape (1, 4, 2, 'Hv')"),
        (dict(scale="big"), TypeError, "scale: expected a number"),
        (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap: expected a value in (0"),
    ],
)
def test_bad_input(kwargs, kind, text):
    args = dict(query=Q, key=Q, value=Q, mesh=_one_device_mesh(), axis_name="s")
    args.update(kwargs)
    with pytest.raises(kind) as e:
        jattn.sequence_parallel_attention(**args)
    assert text in str(e.value)


def test_ring_attention_unknown_axis_inside_shard_map():
    mesh = jax.make_mesh((1,), ("s",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    sm = jax.shard_map(
        lambda q: jattn.ring_attention(q, q, q, axis_name="seq"),
        mesh=mesh, in_specs=jax.sharding.PartitionSpec(None, "s"), out_specs=jax.sharding.PartitionSpec(None, "s"),
    )
    with pytest.raises(ValueError, match="axis_name: expected a mesh axis of the enclosing shard_map, got 'seq'"):
        jax.jit(sm)(jnp.ones((1, 4, 2, 3)))


def test_ring_attention_unknown_batch_axis_inside_shard_map():
    mesh = jax.make_mesh((1,), ("s",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    sm = jax.shard_map(
        lambda q: jattn.ring_attention(q, q, q, axis_name="s", batch_axis="data"),
        mesh=mesh, in_specs=jax.sharding.PartitionSpec(None, "s"), out_specs=jax.sharding.PartitionSpec(None, "s"),
    )
    with pytest.raises(ValueError, match="batch_axis: expected a mesh axis of the enclosing shard_map, got 'data'"):
        jax.jit(sm)(jnp.ones((1, 4, 2, 3)))


def test_layout_positions_bad_length():
    with pytest.raises(ValueError, match="length: expected a sequence length divisible by 8"):
        ring.layout_positions(12, 4, "zigzag")
