"""implementation='chunked' against 'xla' (and the NumPy reference): values, gradients, block
skipping, memory growth, fallbacks."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.kernels import chunked
from reference import naive_attention

B, N, K, H, HV = 2, 4, 2, 5, 3  # GQA: two query heads per kv head; value dim != key dim


def _inputs(T, S, seed=0, kv_heads=K):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, kv_heads, H)).astype(np.float32)
    v = rng.standard_normal((B, S, kv_heads, HV)).astype(np.float32)
    return rng, q, k, v


def _features(name, rng, T, S):
    """Array and static kwargs of one feature combination."""
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[0, 0, 1] = False  # a row that sees nothing
    bias = rng.standard_normal((1, N, T, S)).astype(np.float32)
    bias_inf = bias.copy()
    bias_inf[0, :, 2, :] = -np.inf  # a row hidden by bias alone
    bias_inf[0, :, :, S // 2] = -np.inf  # a key hidden by bias alone
    lengths = dict(query_seq_lengths=np.array([T - 2, T], np.int32),
                   key_value_seq_lengths=np.array([S, 2], np.int32))
    segments = dict(q_segment_ids=rng.integers(0, 3, (B, T)).astype(np.int32),
                    kv_segment_ids=rng.integers(0, 3, (B, S)).astype(np.int32))
    return {
        "plain": (dict(), dict()),
        "bias": (dict(bias=bias), dict()),
        "bias_inf": (dict(bias=bias_inf), dict()),
        "mask": (dict(mask=mask), dict()),
        "causal_tl": (dict(), dict(is_causal=True)),
        "causal_br": (dict(), dict(is_causal=True, causal_alignment="bottom_right")),
        "window": (dict(), dict(local_window_size=(3, 2))),
        "window_causal_br": (dict(), dict(local_window_size=(4, 0), is_causal=True,
                                          causal_alignment="bottom_right")),
        "lengths": (lengths, dict()),
        "segments_causal": (segments, dict(is_causal=True)),
        "soft_cap_bias_mask": (dict(bias=bias, mask=mask), dict(logits_soft_cap=1.5)),
        "everything": (dict(bias=bias, mask=mask, **lengths, **segments),
                       dict(is_causal=True, local_window_size=(5, 1), logits_soft_cap=2.0)),
    }[name]


@functools.partial(jax.jit, static_argnames=("impl", "static", "block_sizes"))
def _run(q, k, v, arrays, ct, *, impl, static, block_sizes):
    """out, lse and grads of sum(out * ct) for q, k, v and (if given) bias."""
    static = dict(static)

    def loss(q, k, v, bias):
        out, lse = jattn.dot_product_attention(
            q, k, v, bias=bias, **arrays, **static, implementation=impl, return_residual=True,
            block_sizes=block_sizes)
        return jnp.sum(out * ct), (out, lse)

    bias = arrays.pop("bias", None)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads, (out, lse) = jax.grad(loss, argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


def _compare(T, S, feature, block_sizes, kv_heads=K, seed=0):
    rng, q, k, v = _inputs(T, S, seed, kv_heads)
    arrays, static = _features(feature, rng, T, S)
    ct = rng.standard_normal((B, T, N, HV)).astype(np.float32)
    static = tuple(sorted(static.items()))
    ref = _run(q, k, v, dict(arrays), ct, impl="xla", static=static, block_sizes=None)
    got = _run(q, k, v, dict(arrays), ct, impl="chunked", static=static, block_sizes=block_sizes)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=1e-5, err_msg="out")
    np.testing.assert_array_equal(np.isinf(got[1]), np.isinf(ref[1]), err_msg="lse -inf rows")
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5, rtol=1e-5, err_msg="lse")
    for name, g, r in zip("qkvb", got[2], ref[2]):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    return q, k, v, arrays, dict(static), got


FEATURES = ["plain", "bias", "bias_inf", "mask", "causal_tl", "causal_br", "window",
            "window_causal_br", "lengths", "segments_causal", "soft_cap_bias_mask", "everything"]


GRID = [((13, 11), f) for f in FEATURES] + [
    ((7, 17), f) for f in ("plain", "causal_tl", "causal_br", "window_causal_br", "lengths", "everything")]


@pytest.mark.parametrize("shape,feature", GRID)
def test_matches_xla_on_feature_grid(shape, feature):
    T, S = shape
    # Blocks (4, 3) divide neither length: many blocks, padded last blocks.
    _compare(T, S, feature, (4, 3))


@pytest.mark.parametrize("T,S,block_sizes,kv_heads", [
    (16, 16, (4, 4), 1),  # MQA, blocks divide the lengths
    (11, 13, (5, 13), K),  # one key block
    (5, 3, None, K),  # default blocks larger than the sequence
    (13, 5, (2, 7), K),  # key block larger than S
])
def test_matches_xla_block_shapes(T, S, block_sizes, kv_heads):
    _compare(T, S, "everything", block_sizes, kv_heads=kv_heads, seed=1)


def test_matches_numpy_reference_and_zero_rows():
    q, k, v, arrays, static, got = _compare(13, 11, "everything", (4, 3), seed=2)
    want, _, want_lse = naive_attention(
        q, k, v, bias=arrays["bias"], logits_soft_cap=2.0, mask=arrays["mask"], is_causal=True,
        window=(5, 1), q_lengths=arrays["query_seq_lengths"], kv_lengths=arrays["key_value_seq_lengths"],
        q_segment_ids=arrays["q_segment_ids"], kv_segment_ids=arrays["kv_segment_ids"])
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    empty = np.isinf(want_lse)  # [B, T, N]
    assert empty.any() and not empty.all()
    assert np.all(np.asarray(got[0])[empty] == 0)
    assert np.all(np.asarray(got[2][0])[empty] == 0)  # dq of an empty row


def test_bfloat16_keeps_dtype_and_matches_xla():
    _, q, k, v = _inputs(9, 10)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked", block_sizes=(4, 3))
    ref = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=1e-2)


def test_composes_with_vmap_and_jit():
    _, q, k, v = _inputs(7, 9)
    qs = np.stack([q, q[::-1]])  # [2, B, T, N, H]
    f = lambda q: jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked",
                                              block_sizes=(3, 4))
    got = jax.jit(jax.vmap(f))(qs)
    for i in range(2):
        ref = jattn.dot_product_attention(qs[i], k, v, is_causal=True, implementation="xla")
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_forward_mode_is_a_clear_error():
    _, q, k, v = _inputs(5, 5)
    f = lambda q: jattn.dot_product_attention(q, k, v, implementation="chunked")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (q,), (q,))


@pytest.mark.parametrize("kwargs", [dict(return_weights=True),
                                    dict(dropout_rate=0.5, dropout_rng=jax.random.key(0))])
def test_weights_and_dropout_fall_back_to_xla_with_a_warning(kwargs):
    _, q, k, v = _inputs(5, 6)
    with pytest.warns(UserWarning, match="falls back to 'xla'"):
        got = jattn.dot_product_attention(q, k, v, implementation="chunked", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = jattn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(g, r)


def _while_conditions(jaxpr, found):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            found.append(eqn.params["cond_jaxpr"].jaxpr)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _while_conditions(inner, found)
    return found


def test_static_block_loops_stay_scalar_loops_under_vmap():
    # vmap over B, K, G must not batch the loop predicates of a static pattern (that would
    # turn skipping into select over every block): each loop keeps a scalar `lt` condition.
    _, q, k, v = _inputs(13, 11)
    f = lambda q, k: jnp.sum(jattn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(4, 1), implementation="chunked", block_sizes=(4, 3)) ** 2)
    conds = _while_conditions(jax.make_jaxpr(jax.grad(f, (0, 1)))(q, k).jaxpr, [])
    assert len(conds) == 4  # partial and full blocks, forward and backward
    for cond in conds:
        (lt,) = cond.eqns
        assert lt.primitive.name == "lt" and all(x.aval.shape == () for x in lt.invars)


def _config(**kw):
    base = dict(scale=1.0, is_causal=False, offset=0, window=None, logits_soft_cap=None, dropout_rate=0.0,
                broadcast_dropout=False, block_sizes=None)
    return jattn.multihead.Config(**{**base, **kw})


def test_data_dependent_block_counts_are_per_batch_row():
    # Lengths give each batch row its own block counts (vmap then runs the larger count, not all blocks).
    mask_mod, dynamic = chunked.builtin_mask_mod(_config(is_causal=True), 13, 11, np.array([3, 13]), None,
                                                 None, None)
    assert dynamic
    bm = jattn.create_block_mask(mask_mod, 2, None, 13, 11, block_size=(4, 3))
    visited = np.asarray(bm.kv_num_blocks + bm.full_kv_num_blocks)[:, 0]  # [B, nq]
    np.testing.assert_array_equal(visited[0], [1, 0, 0, 0])  # rows >= 3 see nothing
    np.testing.assert_array_equal(visited[1], [2, 3, 4, 4])  # causal: the lower triangle


@pytest.mark.parametrize("T,S,bq,bk,causal,offset,window", [
    (13, 11, 4, 3, True, 0, None),
    (7, 17, 2, 5, True, 10, None),
    (17, 7, 3, 2, True, -10, None),
    (16, 16, 4, 4, False, 0, (3, 2)),
    (19, 23, 5, 3, True, 4, (6, 0)),
    (12, 9, 4, 4, False, -3, (0, 5)),
])
def test_static_block_flags_are_exactly_the_needed_tiles(T, S, bq, bk, causal, offset, window):
    pos = np.arange(T)[:, None] + offset  # [T, 1]
    key = np.arange(S)[None, :]  # [1, S]
    visible = np.ones((T, S), bool)
    if causal:
        visible &= key <= pos
    if window:
        visible &= (key >= pos - window[0]) & (key <= pos + window[1])
    nq, nk = -(-T // bq), -(-S // bk)
    tiles = [[visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for j in range(nk)] for i in range(nq)]
    needed = np.array([[t.any() for t in row] for row in tiles])
    fully = np.array([[t.all() and (j + 1) * bk <= S for j, t in enumerate(row)] for row in tiles])
    partial, full = chunked.static_block_flags(T, S, bq, bk, causal, offset, window)
    np.testing.assert_array_equal(full, fully)
    np.testing.assert_array_equal(partial, needed & ~fully)
    rows = chunked.static_rows(partial, full)
    np.testing.assert_array_equal(rows.kv_num[0, 0] + rows.full_kv_num[0, 0], needed.sum(1))
    np.testing.assert_array_equal(rows.q_num[0, 0] + rows.full_q_num[0, 0], needed.sum(0))


@pytest.mark.parametrize("T,S,bq,bk,causal,offset,window", [
    (13, 11, 4, 3, True, 0, None),
    (17, 7, 3, 2, True, -10, None),
    (19, 23, 5, 3, True, 4, (6, 0)),
    (12, 9, 4, 4, False, 0, None),
    (11, 13, 5, 3, False, -3, (0, 5)),
])
def test_length_block_flags_are_exactly_the_needed_tiles(T, S, bq, bk, causal, offset, window):
    # Brute force per batch row: lengths 0, inside a block, on a block edge, past the end.
    q_len, kv_len = np.array([0, 5, T, 2 * T, 4]), np.array([S, 3, 0, S - 1, 2 * S])
    pos, key = np.arange(T)[:, None] + offset, np.arange(S)[None, :]
    pattern = np.ones((T, S), bool)
    if causal:
        pattern &= key <= pos
    if window:
        pattern &= (key >= pos - window[0]) & (key <= pos + window[1])
    nq, nk = -(-T // bq), -(-S // bk)
    for kv_lengths in (kv_len, None):
        partial, full = chunked.length_block_flags(T, S, bq, bk, causal, offset, window, q_len, kv_lengths)
        for b in range(len(q_len)):
            visible = pattern & (np.arange(T)[:, None] < q_len[b])
            if kv_lengths is not None:
                visible &= key < kv_lengths[b]
            tiles = [[visible[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for j in range(nk)] for i in range(nq)]
            needed = np.array([[t.any() for t in row] for row in tiles])
            fully = np.array([[t.all() and (j + 1) * bk <= S for j, t in enumerate(row)] for row in tiles])
            np.testing.assert_array_equal(np.asarray(full[b]), fully, err_msg=f"row {b}")
            np.testing.assert_array_equal(np.asarray(partial[b]), needed & ~fully, err_msg=f"row {b}")


def test_causal_skips_half_the_blocks():
    partial, full = chunked.static_block_flags(4096, 4096, 256, 256, True, 0, None)
    assert (partial | full).sum() == 16 * 17 // 2  # lower triangle of 16 x 16 blocks, diagonal included
    assert full.sum() == 16 * 15 // 2  # only the 16 diagonal tiles evaluate the causal mask


def _temp_bytes(T, causal, impl):
    x = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
    f = lambda q, k, v: jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl))
    grad = jax.jit(jax.grad(f, (0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_memory_grows_linearly(causal):
    small, large = _temp_bytes(4096, causal, "chunked"), _temp_bytes(8192, causal, "chunked")
    assert large <= 2.3 * small
    assert large < 0.1 * (2 * 8192 * 8192 * 4)  # far below one fp32 [N, T, S] logits array
    dense = _temp_bytes(4096, causal, "xla")
    assert dense > 2 * 4096 * 4096 * 4  # the reference does hold [N, T, S]
