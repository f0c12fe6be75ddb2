"""flex_attention: ready-made mods and combinations against the float64 NumPy reference and the
dense 'xla' path; gradients (q, k, v, closed-over arrays); jit/vmap/grad; semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.flex import mods
from flex_reference import flex_reference, t5_bucket_np

B, T, S, N, K, H, HV = 2, 13, 19, 4, 2, 8, 6
BLOCK = (4, 8)  # divides neither T nor S
rng = np.random.RandomState(0)
Q_DOC = np.sort(rng.randint(0, 3, (B, T)), axis=1)
KV_DOC = np.sort(rng.randint(0, 3, (B, S)), axis=1)
PREFIX = np.array([5, 0])
Q_LEN, KV_LEN = np.array([9, 13]), np.array([0, 12])  # batch row 0 sees no key at all
SLOPES = np.asarray(mods.alibi_slopes(N))
TABLE = rng.randn(N, T + S - 1).astype(np.float32)
T5_TABLE = rng.randn(N, 8).astype(np.float32)


def _np_causal(b, h, q, kv):
    return kv <= q


def _np_window(b, h, q, kv):
    return (kv >= q - 3) & (kv <= q + 2)


def _np_doc(b, h, q, kv):
    return Q_DOC[b, q] == KV_DOC[b, kv]


def _np_softcap(s, b, h, q, kv):
    return 2.0 * np.tanh(s / 2.0)


def _np_alibi(s, b, h, q, kv):
    return s + SLOPES[h] * (kv - q)


def _np_hide_far(s, b, h, q, kv):
    return np.where(np.abs(kv - q) > 6, -np.inf, s)


# name: (mask_mod, score_mod, NumPy mask, NumPy score)
CASES = {
    "none": (None, None, None, None),
    "causal": (mods.causal, None, _np_causal, None),
    "causal_bottom_right": (mods.causal_bottom_right(T, S), None, lambda b, h, q, kv: kv <= q + S - T, None),
    "sliding_window": (mods.sliding_window(3, 2), None, _np_window, None),
    "document": (mods.document(Q_DOC, KV_DOC), None, _np_doc, None),
    "document_causal": (mods.and_masks(mods.document(Q_DOC, KV_DOC), mods.causal), None,
                        lambda *a: _np_doc(*a) & _np_causal(*a), None),
    "prefix_lm": (mods.prefix_lm(PREFIX), None, lambda b, h, q, kv: (kv <= q) | (kv < PREFIX[b]), None),
    "lengths": (mods.lengths(Q_LEN, KV_LEN), None, lambda b, h, q, kv: (q < Q_LEN[b]) & (kv < KV_LEN[b]), None),
    "chunked_local": (mods.chunked_local(4), None, lambda b, h, q, kv: q // 4 == kv // 4, None),
    "window_or_sinks": (mods.or_masks(mods.sliding_window(2, 0), mods.sinks(2)), None,
                        lambda b, h, q, kv: ((kv >= q - 2) & (kv <= q)) | (kv < 2), None),
    "per_head": (lambda b, h, q, kv: kv <= q + h - 2, None, lambda b, h, q, kv: kv <= q + h - 2, None),
    "alibi": (None, mods.alibi(SLOPES), None, _np_alibi),
    "soft_cap": (None, mods.soft_cap(2.0), None, _np_softcap),
    "relative_bias": (None, mods.relative_bias(TABLE, T), None,
                      lambda s, b, h, q, kv: s + TABLE[h, kv - q + T - 1]),
    "t5_bias": (None, mods.t5_bias(T5_TABLE, max_distance=16), None,
                lambda s, b, h, q, kv: s + T5_TABLE[h, t5_bucket_np(kv - q + 0 * h, 8, 16)]),
    "score_hides": (None, lambda s, b, h, q, kv: jnp.where(jnp.abs(kv - q) > 6, -jnp.inf, s), None, _np_hide_far),
    "alibi_softcap_doc_causal": (
        mods.and_masks(mods.document(Q_DOC, KV_DOC), mods.causal),
        mods.chain_scores(mods.alibi(SLOPES), mods.soft_cap(2.0)), lambda *a: _np_doc(*a) & _np_causal(*a),
        lambda s, *a: _np_softcap(_np_alibi(s, *a), *a),
    ),
}


def _inputs(dtype=jnp.float32, seed=1):
    r = np.random.RandomState(seed)  # NumPy: no PRNG kernel to compile per shape
    return tuple(jnp.asarray(r.randn(*shape), dtype) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, HV)))


@pytest.mark.parametrize("name", list(CASES))
def test_mods_match_numpy_and_dense(name):
    mask_mod, score_mod, np_mask, np_score = CASES[name]
    q, k, v = _inputs()
    ref_out, ref_lse = flex_reference(q, k, v, score_fn=np_score, mask_fn=np_mask)
    bm = jattn.create_block_mask(mask_mod, B, N, T, S, block_size=BLOCK)
    out, lse = jax.jit(lambda q, k, v: jattn.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=bm, return_residual=True))(q, k, v)
    dense, dense_lse = jattn.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                            implementation="xla", return_residual=True)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dense, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(dense_lse, ref_lse, atol=2e-5, rtol=2e-5)


def _grads(impl, score_mod_of, mask_mod, consts, block_size=BLOCK):
    q, k, v = _inputs(seed=2)
    w = jnp.asarray(np.random.RandomState(3).randn(B, T, N, HV), jnp.float32)

    def loss(q, k, v, consts):
        kw = dict(implementation=impl, score_mod=score_mod_of(*consts), mask_mod=mask_mod)
        if impl == "chunked":
            kw.pop("mask_mod")
            kw["block_mask"] = jattn.create_block_mask(mask_mod, B, N, T, S, block_size=block_size)
        return jnp.sum(jattn.flex_attention(q, k, v, **kw) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, consts)


@pytest.mark.parametrize("name,score_mod_of,mask_mod,consts", [
    ("alibi_doc_causal", mods.alibi, mods.and_masks(mods.document(Q_DOC, KV_DOC), mods.causal), (SLOPES,)),
    ("relative_bias_lengths", lambda t: mods.relative_bias(t, T), mods.lengths(Q_LEN, KV_LEN), (TABLE,)),
    ("softcap_and_scale_consts", lambda c, t: mods.chain_scores(mods.soft_cap(3.0), mods.relative_bias(t * c, T)),
     mods.prefix_lm(PREFIX), (jnp.float32(0.5), TABLE)),
])
def test_gradients_match_dense(name, score_mod_of, mask_mod, consts):
    chunked = _grads("chunked", score_mod_of, mask_mod, consts)
    dense = _grads("xla", score_mod_of, mask_mod, consts)
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(dense)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
        assert np.all(np.isfinite(got))


def test_gradients_match_finite_differences_float64():
    """Directional central differences in float64 for q, k, v and a closed-over bias table."""
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in _inputs())
        table = jnp.asarray(TABLE, jnp.float64)
        w = jnp.asarray(np.random.RandomState(4).randn(B, T, N, HV), jnp.float64)
        args = (q, k, v, table)
        dirs = [jnp.asarray(np.random.RandomState(10 + i).randn(*x.shape), jnp.float64) for i, x in enumerate(args)]

        @jax.jit
        def f(q, k, v, table):
            out = jattn.flex_attention(q, k, v, score_mod=mods.relative_bias(table, T),
                                       mask_mod=mods.sliding_window(4, 1))
            return jnp.sum(out * w)

        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)
        eps = 1e-6
        for i in range(4):
            plus = [x + eps * d if j == i else x for j, (x, d) in enumerate(zip(args, dirs))]
            minus = [x - eps * d if j == i else x for j, (x, d) in enumerate(zip(args, dirs))]
            numeric = (f(*plus) - f(*minus)) / (2 * eps)
            np.testing.assert_allclose(jnp.vdot(grads[i], dirs[i]), numeric, rtol=1e-7, atol=1e-9)


def test_float64_accumulates_in_float64():
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in _inputs())
        mask_mod, score_mod, np_mask, np_score = CASES["alibi_softcap_doc_causal"]
        out = jattn.flex_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
        ref, _ = flex_reference(q, k, v, score_fn=np_score, mask_fn=np_mask)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref, atol=1e-12, rtol=1e-12)


def test_fully_masked_rows_give_zero_with_zero_grads():
    q, k, v = _inputs()
    mask_mod = mods.lengths(Q_LEN, KV_LEN)  # batch row 0: no key; row 1: queries >= 13 none
    f = lambda q, k, v: jattn.flex_attention(q, k, v, mask_mod=mask_mod, score_mod=mods.alibi(SLOPES))
    out = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(out[0]) == 0)
    gq, gk, gv = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(gq[0]) == 0) and np.all(np.asarray(gk[0]) == 0) and np.all(np.asarray(gv[0]) == 0)
    assert np.all(np.asarray(gk[1, 12:]) == 0)  # keys past kv_length get nothing


def test_nan_propagates_only_to_rows_that_see_it():
    q, k, v = _inputs()
    q = q.at[0, 5, 1].set(jnp.nan)  # one query row of one head
    k = k.at[1, 10, 0].set(jnp.nan)  # one key row of kv head 0 in batch 1
    for impl in ("chunked", "xla"):
        out = np.asarray(jattn.flex_attention(q, k, v, mask_mod=mods.causal, implementation=impl))
        nan = np.isnan(out).any(-1)  # [B, T, N]
        expected = np.zeros((B, T, N), bool)
        expected[0, 5, 1] = True
        expected[1, 10:, :2] = True  # heads 0, 1 share kv head 0; rows >= 10 see key 10
        np.testing.assert_array_equal(nan, expected, err_msg=impl)


def test_nan_score_is_not_masked():
    q, k, v = _inputs()
    bias = jnp.zeros((T, S)).at[3, 4].set(jnp.nan).at[6, 2].set(-jnp.inf)
    score_mod = lambda s, b, h, qi, ki: s + bias[qi, ki]
    for impl in ("chunked", "xla"):
        out = np.asarray(jattn.flex_attention(q, k, v, score_mod=score_mod, implementation=impl))
        rows_nan = np.isnan(out).any(axis=(0, 2, 3))  # [T]
        np.testing.assert_array_equal(rows_nan, np.arange(T) == 3, err_msg=impl)
    ref, _ = flex_reference(q, k, v, score_fn=lambda s, b, h, qi, ki: s + np.asarray(bias)[qi, ki])
    out = jattn.flex_attention(q, k, v, score_mod=score_mod)
    np.testing.assert_allclose(np.asarray(out)[:, 6], ref[:, 6], atol=2e-5)  # -inf hid one key


def test_skipped_blocks_are_never_read():
    """NaN values in key blocks a query block cannot see must not reach it (per-batch documents,
    so the loop counts differ across the vmapped batch)."""
    q, k, v = _inputs()
    ids = np.stack([np.repeat(np.arange(4), [4, 4, 4, 7]), np.repeat(np.arange(2), [8, 11])])  # [B, S=T+6]
    q_ids, kv_ids = ids[:, :T], ids
    v = v.at[0, 16:].set(jnp.nan).at[1, 12:].set(jnp.nan)  # hidden from every query with a smaller id
    # (a NaN value in a visited tile would poison masked rows too: 0 * NaN; skipped tiles are never read)
    mask_mod = mods.document(q_ids, kv_ids)
    bm = jattn.create_block_mask(mask_mod, B, None, T, S, block_size=4)
    out = np.asarray(jattn.flex_attention(q, k, v, block_mask=bm))
    sees_nan = np.array([[q_ids[b, t] == kv_ids[b, -1] for t in range(T)] for b in range(B)])
    np.testing.assert_array_equal(np.isnan(out).any(axis=(2, 3)), sees_nan)


def test_gqa_unbatched_and_extra_batch_dims():
    q, k, v = _inputs()
    mask_mod = mods.sliding_window(3, 2)
    full = jattn.flex_attention(q, k, v, mask_mod=mask_mod)
    single = jattn.flex_attention(q[1], k[1], v[1], mask_mod=mask_mod)  # [T, N, Hv]
    np.testing.assert_allclose(single, full[1], atol=1e-6)
    stacked = jattn.flex_attention(q[None], k[None], v[None], mask_mod=mask_mod)  # [1, B, T, N, Hv]
    np.testing.assert_allclose(stacked[0], full, atol=1e-6)
    mqa = jattn.flex_attention(q, k[:, :, :1], v[:, :, :1], mask_mod=mask_mod)
    ref, _ = flex_reference(q, k[:, :, :1], v[:, :, :1], mask_fn=_np_window)
    np.testing.assert_allclose(mqa, ref, atol=2e-5)


def test_bfloat16_inputs_softmax_in_fp32():
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs())
    out = jattn.flex_attention(q, k, v, mask_mod=mods.causal, score_mod=mods.alibi(SLOPES))
    assert out.dtype == jnp.bfloat16
    ref, _ = flex_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                            score_fn=_np_alibi, mask_fn=_np_causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_traced_document_ids_under_jit_and_vmap():
    q, k, v = _inputs()
    doc = jnp.asarray(np.sort(np.random.RandomState(5).randint(0, 3, (3, T)), axis=1))  # [3, T]

    def step(q, k, v, ids):  # ids [T] traced: a block mask built inside the step
        mask_mod = mods.and_masks(mods.document(ids), mods.causal)
        bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=4)
        return jattn.flex_attention(q, k[:, :T], v[:, :T], block_mask=bm)

    outs = jax.jit(jax.vmap(step, in_axes=(None, None, None, 0)))(q, k, v, doc)  # [3, B, T, N, Hv]
    for i in range(3):
        ids = np.asarray(doc[i])
        ref, _ = flex_reference(q, k[:, :T], v[:, :T],
                                mask_fn=lambda b, h, qi, ki: (ids[qi] == ids[ki]) & (ki <= qi))
        np.testing.assert_allclose(outs[i], ref, atol=2e-5)
    g = jax.jit(jax.grad(lambda q, ids: step(q, k, v, ids).sum()))(q, doc[0])
    g_ref = jax.grad(lambda q: jattn.flex_attention(
        q, k[:, :T], v[:, :T], mask_mod=mods.and_masks(mods.document(doc[0]), mods.causal),
        implementation="xla").sum())(q)
    np.testing.assert_allclose(g, g_ref, atol=5e-5)


def test_grad_of_traced_bias_table_under_jit_and_vmap_over_heads_batch():
    q, k, v = _inputs()
    tables = jnp.asarray(rng.randn(2, N, T + S - 1), jnp.float32)  # two tables, vmapped

    def loss(table, impl):
        out = jattn.flex_attention(q, k, v, score_mod=mods.relative_bias(table, T),
                                   mask_mod=mods.causal_bottom_right(T, S), implementation=impl)
        return jnp.sum(out ** 2)

    got = jax.jit(jax.vmap(jax.grad(lambda t: loss(t, "chunked"))))(tables)
    want = jax.vmap(jax.grad(lambda t: loss(t, "xla")))(tables)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
    assert np.abs(np.asarray(got)).max() > 0


def test_scale_and_default_block_mask_match_given_one():
    q, k, v = _inputs()
    mask_mod = mods.and_masks(mods.document(Q_DOC, KV_DOC), mods.causal)
    a = jattn.flex_attention(q, k, v, mask_mod=mask_mod, scale=0.3)
    bm = jattn.create_block_mask(mask_mod, B, None, T, S, block_size=(8, 4))
    b = jattn.flex_attention(q, k, v, block_mask=bm, scale=0.3)
    ref, _ = flex_reference(q, k, v, mask_fn=CASES["document_causal"][2], scale=0.3)
    np.testing.assert_allclose(a, ref, atol=2e-5)
    np.testing.assert_allclose(b, ref, atol=2e-5)


def _few_tiles(bm):
    from jattn.flex.kernel import Rows, few_tiles

    return few_tiles(Rows.of(bm))


def test_backward_transposes_per_step_only_for_few_known_tiles_and_both_match_dense():
    """A block mask known at trace time whose backward visits few tiles per query block makes
    the backward transpose q and dO per step; a traced or denser one, once per call. Both layouts
    give the dense path's gradients (q, k, v and ALiBi's slopes)."""
    mask_mod = mods.and_masks(mods.document(Q_DOC, KV_DOC), mods.causal)
    sparse = jattn.create_block_mask(mask_mod, B, N, T, S, block_size=BLOCK)
    assert _few_tiles(sparse)
    assert not _few_tiles(jattn.create_block_mask(None, None, None, T, S, block_size=(4, 2)))  # 40 tiles > 8 * 4
    seen = []
    jax.jit(lambda: seen.append(_few_tiles(jattn.create_block_mask(mask_mod, B, N, T, S, block_size=BLOCK))))()
    assert seen == [False]  # traced counts: once per call

    q, k, v = _inputs(seed=5)
    w = jnp.asarray(np.random.RandomState(6).randn(B, T, N, HV), jnp.float32)

    def grads(**kw):
        def loss(q, k, v, slopes):
            bm = kw.get("block_mask") or (jattn.create_block_mask(mask_mod, B, N, T, S, block_size=BLOCK)
                                          if kw["implementation"] == "chunked" else None)
            out = jattn.flex_attention(q, k, v, score_mod=mods.alibi(slopes), implementation=kw["implementation"],
                                       mask_mod=None if bm is not None else mask_mod, block_mask=bm)
            return jnp.sum(out * w)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, jnp.asarray(SLOPES))

    per_step = grads(implementation="chunked", block_mask=sparse)
    per_call = grads(implementation="chunked")  # block mask built inside the jitted step
    dense = grads(implementation="xla")
    for a, b, c in zip(per_step, per_call, dense):
        np.testing.assert_allclose(a, c, atol=5e-5, rtol=5e-5)
        np.testing.assert_allclose(b, c, atol=5e-5, rtol=5e-5)
        assert np.abs(np.asarray(a)).max() > 0
