"""Ulysses (all-to-all) sequence parallelism and strategy='auto': parity with single-device
attention on 8 simulated CPU devices (subprocess, tests/ring_checks.py), kv-head replication,
the collectives each strategy compiles to, the explanation, and bad input."""

import math

import jax
import numpy as np
import pytest

import jattn
from jattn.parallel import ulysses
from test_ring import _run_group


def test_ulysses_matches_single_device_and_auto_explains():
    r = _run_group("ulysses")
    parity = [
        "causal_contiguous_mha", "causal_zigzag_gqa_replicated_seg_lengths", "grid_batch_axis_mqa_window_softcap",
        "head_axis_gqa_forward", "auto_picks_ulysses", "long_chunked_kernel",
    ]
    for case in parity:
        fwd, grads = r[case]
        assert fwd < 1e-4, (case, fwd)
        assert case.endswith("forward") or (len(grads) == 3 and max(grads) < 1e-3), (case, grads)
    # Ulysses compiles to all-to-alls and no ring transfers; the ring the other way round.
    assert r["hlo_ulysses"][0] >= 2 and r["hlo_ulysses"][1] == 0, r["hlo_ulysses"]
    assert r["hlo_ring"][0] == 0 and r["hlo_ring"][1] >= 1, r["hlo_ring"]
    strategy, reason, ring_bytes, ulysses_bytes = r["explain_mha"]
    # 8 heads of 8 + 8 dims, 8 rows per device: the ring sends 3 blocks per hop (K/V forward,
    # K/V and dK/dV backward) over 7 hops; Ulysses 7/8 of q, k, v, out and as much backward.
    assert ring_bytes == 3 * 7 * 8 * 8 * 16 * 4 and ulysses_bytes == 2 * 7 * (8 * 8 * 16 + 8 * 8 * 16) * 4 // 8
    assert strategy == "ulysses" and "fewer bytes" in reason, r["explain_mha"]
    assert r["explain_heads_do_not_split"][0] == "ring" and "do not split" in r["explain_heads_do_not_split"][1]
    assert r["explain_heads_do_not_split"][3] is None
    # A causal window of 4 inside 8-row blocks: one hop; cheaper than the all-to-alls.
    assert r["explain_small_window"][0] == "ring" and r["explain_small_window"][2] == 3 * 8 * 8 * 16 * 4


@pytest.mark.parametrize("K, P", [(8, 8), (2, 8), (3, 4), (6, 4), (1, 8), (5, 5)])
def test_kv_replication_is_minimal_and_divides(K, P):
    r = ulysses.kv_replication(K, P)
    assert (K * r) % P == 0 and (K * r) == math.lcm(K, P)
    assert all((K * s) % P for s in range(1, r))


def test_zigzag_stored_order_matches_ring_layout():
    np.testing.assert_array_equal(ulysses._stored_order("zigzag", 12, 3), jattn.parallel.ring.layout_positions(12, 3, "zigzag"))
    np.testing.assert_array_equal(ulysses._stored_order("contiguous", 6, 2), np.arange(6))


Q = np.ones((1, 4, 2, 3), np.float32)


def _mesh():
    return jax.make_mesh((1,), ("s",), devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "kwargs, kind, text",
    [
        (dict(strategy="tree"), ValueError, "strategy: expected one of ('ring', 'ulysses', 'auto'), got 'tree'"),
        (dict(bias=np.zeros((1, 2, 4, 4), np.float32), strategy="ulysses"), ValueError, "bias: ring attention"),
        (dict(local_window_size=(1, 2, 3), strategy="auto"), TypeError, "local_window_size: expected an int"),
        (dict(mask_mod=lambda b, h, q, kv: q >= kv, strategy="ulysses"), ValueError,
         "strategy: mask_mod runs on the ring only"),
    ],
)
def test_bad_input(kwargs, kind, text):
    args = dict(query=Q, key=Q, value=Q, mesh=_mesh(), axis_name="s")
    args.update(kwargs)
    with pytest.raises(kind) as e:
        jattn.sequence_parallel_attention(**args)
    assert text in str(e.value)


def test_explain_on_one_device_and_heads_that_do_not_split():
    e = jattn.explain_sequence_parallel(Q, Q, Q, mesh=_mesh(), axis_name="s", strategy="auto")
    assert e.strategy == "ring" and "one device" in e.reason and e.ring_bytes == 0
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        jattn.explain_sequence_parallel(Q, Q, Q, axis_name="s")
    # One device always splits; the heads check is exercised on 8 devices (ring_checks).
    assert jattn.explain_sequence_parallel(Q, Q, Q, mesh=_mesh(), axis_name="s", strategy="ulysses").strategy == "ulysses"


def test_auto_picks_the_ring_for_a_mask_mod():
    e = jattn.explain_sequence_parallel(Q, Q, Q, mesh=_mesh(), axis_name="s", strategy="auto",
                                        mask_mod=lambda b, h, q, kv: q >= kv)
    assert e.strategy == "ring" and "mask_mod" in e.reason


def test_ulysses_on_one_device_matches_dot_product_attention():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, 4, 5), np.float32) for _ in range(3))
    out = jattn.sequence_parallel_attention(q, k, v, mesh=_mesh(), axis_name="s", strategy="ulysses", is_causal=True)
    np.testing.assert_allclose(out, jattn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
