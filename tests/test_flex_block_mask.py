"""BlockMask / create_block_mask: layout against a NumPy tile classification (random patterns
with hypothesis: empty rows, empty blocks, blocks not dividing T/S), flex_attention on those
patterns, jit with traced ids, and shape/argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jattn
from jattn.flex import mods
from flex_reference import flex_reference


def _np_classify(dense, bq, bk):
    """dense bool [B, N, T, S] -> int [B, N, nq, nk]: 0 no key visible, 1 partial, 2 full (no padding)."""
    B, N, T, S = dense.shape
    nq, nk = -(-T // bq), -(-S // bk)
    out = np.zeros((B, N, nq, nk), int)
    for b in range(B):
        for n in range(N):
            for i in range(nq):
                for j in range(nk):
                    tile = dense[b, n, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    if tile.any():
                        out[b, n, i, j] = 2 if tile.all() and (j + 1) * bk <= S else 1
    return out


def _check_layout(bm, expected):
    """Counts, sorted indices, valid padding entries and the transposed view all agree with ``expected``."""
    np.testing.assert_array_equal(bm.to_dense(), expected)
    for num, idx, code in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        num, idx = np.asarray(num), np.asarray(idx)
        np.testing.assert_array_equal(num, (expected == code).sum(-1))
        for pos in np.ndindex(num.shape):
            listed = idx[pos][: num[pos]]
            np.testing.assert_array_equal(listed, np.flatnonzero(expected[pos] == code))
            assert np.all((idx[pos] >= 0) & (idx[pos] < expected.shape[-1]))
    exp_t = np.swapaxes(expected, -1, -2)  # [B, N, nk, nq]
    for num, idx, code in ((bm.q_num_blocks, bm.q_indices, 1), (bm.full_q_num_blocks, bm.full_q_indices, 2)):
        num, idx = np.asarray(num), np.asarray(idx)
        np.testing.assert_array_equal(num, (exp_t == code).sum(-1))
        for pos in np.ndindex(num.shape):
            np.testing.assert_array_equal(idx[pos][: num[pos]], np.flatnonzero(exp_t[pos] == code))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(5, 7), (11, 6), (8, 13)]),
    blocks=st.sampled_from([(2, 3), (4, 4), (3, 5)]),
    density=st.sampled_from([0.0, 0.15, 0.6, 1.0]),
    empty_rows=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_block_patterns(shape, blocks, density, empty_rows, seed):
    T, S = shape
    B, N, K, H = 2, 2, 1, 4
    r = np.random.RandomState(seed)
    dense = r.rand(B, N, T, S) < density  # [B, N, T, S]
    if density == 0.6:
        dense[:, :, :, : blocks[1]] = True  # some full blocks
    if empty_rows:
        dense[:, :, r.randint(T)] = False
    table = jnp.asarray(dense)
    mask_mod = lambda b, h, q_idx, kv_idx: table[b, h, q_idx, kv_idx]
    bm = jattn.create_block_mask(mask_mod, B, N, T, S, block_size=blocks)
    _check_layout(bm, _np_classify(dense, *blocks))

    q = jnp.asarray(r.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(r.randn(B, S, K, H), jnp.float32)
    v = jnp.asarray(r.randn(B, S, K, H), jnp.float32)
    out = jattn.flex_attention(q, k, v, block_mask=bm)
    ref, _ = flex_reference(q, k, v, mask_fn=lambda b, h, qi, ki: dense[b, h, qi, ki])
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_causal_layout_and_broadcast_dims():
    bm = jattn.create_block_mask(mods.causal, None, None, 64, 64, block_size=16)
    assert bm.shape == (1, 1, 64, 64) and bm.block_size == (16, 16)
    np.testing.assert_array_equal(bm.kv_num_blocks[0, 0], [1, 1, 1, 1])  # the diagonal tiles
    np.testing.assert_array_equal(bm.full_kv_num_blocks[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(bm.full_q_num_blocks[0, 0], [3, 2, 1, 0])
    assert float(bm.sparsity()) == pytest.approx(6 / 16)
    bm_none = jattn.create_block_mask(None, 2, None, 10, 12, block_size=(4, 5))
    np.testing.assert_array_equal(bm_none.to_dense()[0, 0], [[2, 2, 1]] * 3)  # last key block padded


@pytest.mark.parametrize("T, S, block", [(13, 7, (4, 3)), (11, 11, 5), (5, 13, (8, 4)), (16, 16, (4, 8))])
def test_no_mask_mod_is_known_at_trace_time_and_matches_the_evaluated_one(T, S, block):
    """mask_mod=None: the arrays come from NumPy (constants even under jit, no [T, S] pass per
    call) and equal, entry by entry, those evaluated from an always-true mask_mod."""
    everywhere = jattn.create_block_mask(lambda b, h, q, kv: q >= 0, 3, None, T, S, block_size=block)
    build = lambda: jattn.create_block_mask(None, 3, None, T, S, block_size=block)  # noqa: E731
    assert jax.make_jaxpr(build)().eqns == []  # eight constants, nothing computed per call
    built = jax.jit(build)()
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        np.testing.assert_array_equal(getattr(built, name), getattr(everywhere, name), err_msg=name)
        assert getattr(built, name).dtype == jnp.int32, name
    _check_layout(built, _np_classify(np.ones((3, 1, T, S), bool), *built.block_size))


def test_jittable_with_traced_document_ids():
    ids = jnp.asarray(np.repeat(np.arange(4), [5, 9, 2, 16]))  # [32]

    def build(ids):
        return jattn.create_block_mask(mods.and_masks(mods.document(ids), mods.causal), None, None, 32, 32,
                                       block_size=4)

    traced = jax.jit(build)(ids)
    eager = build(ids)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(a, b)
    dense = np.asarray((ids[:, None] == ids[None, :]) & (jnp.arange(32)[None, :] <= jnp.arange(32)[:, None]))
    _check_layout(eager, _np_classify(dense[None, None], 4, 4))


def test_block_mask_for_other_shapes_is_a_value_error():
    q = jnp.zeros((2, 8, 4, 4))
    k = v = jnp.zeros((2, 12, 2, 4))
    for bad in (
        jattn.create_block_mask(mods.causal, None, None, 8, 10, block_size=4),  # S
        jattn.create_block_mask(mods.causal, None, None, 9, 12, block_size=4),  # T
        jattn.create_block_mask(mods.causal, 3, None, 8, 12, block_size=4),  # B
        jattn.create_block_mask(mods.causal, None, 2, 8, 12, block_size=4),  # N
    ):
        with pytest.raises(ValueError, match="block_mask: built for"):
            jattn.flex_attention(q, k, v, block_mask=bad)
    per_row = mods.lengths(jnp.array([8, 3]), jnp.array([12, 5]))  # reads b: must not be broadcast
    with pytest.raises(ValueError, match="reads 'b' but the mask was built with B=None"):
        jattn.flex_attention(q, k, v, block_mask=jattn.create_block_mask(per_row, None, None, 8, 12, block_size=4))
    ok = jattn.create_block_mask(mods.causal, 2, 4, 8, 12, block_size=4)
    with pytest.raises(ValueError, match="mask_mod, block_mask"):
        jattn.flex_attention(q, k, v, block_mask=ok, mask_mod=mods.sliding_window(2))
    with pytest.raises(TypeError, match="block_mask: expected a jattn.BlockMask"):
        jattn.flex_attention(q, k, v, block_mask=np.ones((8, 12), bool))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=(4, 4, 4)), "block_size"),
    (dict(block_size=2.5), "block_size"),
])
def test_create_block_mask_bad_block_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jattn.create_block_mask(mods.causal, None, None, 8, 8, **kwargs)


@pytest.mark.parametrize("args,match", [((0, None, 8, 8), "B:"), ((None, -1, 8, 8), "N:"),
                                        ((None, None, 0, 8), "T:"), ((None, None, 8, 2.0), "S:")])
def test_create_block_mask_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        jattn.create_block_mask(mods.causal, *args)
