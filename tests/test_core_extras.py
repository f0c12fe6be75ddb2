"""What jattn adds beyond jax.nn, checked against the naive NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jattn
from reference import naive_attention


def _qkv(B, T, S, N, K, H, Hv=None, seed=0, batch_shape=None):
    rng = np.random.default_rng(seed)
    lead = (B,) if batch_shape is None else batch_shape
    q = rng.standard_normal(lead + (T, N, H)).astype(np.float32)
    k = rng.standard_normal(lead + (S, K, H)).astype(np.float32)
    v = rng.standard_normal(lead + (S, K, Hv or H)).astype(np.float32)
    return rng, q, k, v


def test_single_head_matches_numpy_and_returns_weights():
    rng, q, k, v = _qkv(1, 5, 7, 1, 1, 3, Hv=11)
    mask = rng.random((5, 7)) < 0.6
    mask[:, 0] = True
    bias = rng.standard_normal((5, 7)).astype(np.float32)
    out, w = jattn.attention(q[0, :, 0], k[0, :, 0], v[0, :, 0], mask=mask, bias=bias, return_weights=True)
    ref_out, ref_w, _ = naive_attention(q, k, v, bias=bias[None, None], mask=mask[None, None])
    assert out.shape == (5, 11) and w.shape == (5, 7)
    np.testing.assert_allclose(out, ref_out[0, :, 0], atol=2e-6)
    np.testing.assert_allclose(w, ref_w[0, 0], atol=2e-6)


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        (dict(is_causal=True, causal_alignment="bottom_right"), dict(is_causal=True, offset=6)),
        (dict(local_window_size=(1, 2), causal_alignment="bottom_right"), dict(window=(1, 2), offset=6)),
        (dict(logits_soft_cap=2.0), dict(logits_soft_cap=2.0)),
        (dict(logits_soft_cap=1.5, is_causal=True), dict(logits_soft_cap=1.5, is_causal=True)),
    ],
    ids=["causal_bottom_right", "window_bottom_right", "soft_cap", "soft_cap_causal"],
)
def test_extras_match_numpy(kwargs, ref_kwargs):
    rng, q, k, v = _qkv(2, 5, 11, 6, 3, 7, Hv=3)  # value head dim 3 != key head dim 7
    ours, w = jattn.dot_product_attention(q, k, v, return_weights=True, **kwargs)
    ref_out, ref_w, _ = naive_attention(q, k, v, **ref_kwargs)
    assert ours.shape == (2, 5, 6, 3)
    np.testing.assert_allclose(ours, ref_out, atol=2e-6)
    np.testing.assert_allclose(w, ref_w, atol=2e-6)


def test_segment_ids_match_numpy():
    rng, q, k, v = _qkv(2, 13, 13, 4, 2, 5)
    q_seg = np.sort(rng.integers(0, 3, size=(2, 13)), axis=1).astype(np.int32)
    kv_seg = q_seg.copy()
    ours, res = jattn.dot_product_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, is_causal=True, return_residual=True
    )
    ref_out, _, ref_lse = naive_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, is_causal=True)
    np.testing.assert_allclose(ours, ref_out, atol=2e-6)
    np.testing.assert_allclose(res, ref_lse, atol=2e-5)


def test_leading_batch_dims():
    rng, q, k, v = _qkv(None, 5, 7, 4, 2, 3, batch_shape=(2, 3))
    mask = rng.random((3, 1, 5, 7)) < 0.8  # broadcasts over the first batch dim
    ours = jattn.dot_product_attention(q, k, v, mask=mask)
    flat = jattn.dot_product_attention(
        q.reshape(6, 5, 4, 3), k.reshape(6, 7, 2, 3), v.reshape(6, 7, 2, 3),
        mask=np.broadcast_to(mask, (2, 3, 1, 5, 7)).reshape(6, 1, 5, 7),
    )
    ref_out, _, _ = naive_attention(
        q.reshape(6, 5, 4, 3), k.reshape(6, 7, 2, 3), v.reshape(6, 7, 2, 3),
        mask=np.broadcast_to(mask, (2, 3, 1, 5, 7)).reshape(6, 1, 5, 7),
    )
    assert ours.shape == (2, 3, 5, 4, 3)
    np.testing.assert_allclose(ours.reshape(6, 5, 4, 3), flat, atol=1e-6)
    np.testing.assert_allclose(flat, ref_out, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mask=np.zeros((1, 1, 3, 5), bool)),
        dict(bias=np.full((1, 1, 3, 5), -np.inf, np.float32)),
        dict(key_value_seq_lengths=np.array([0, 0], np.int32)),
        dict(q_segment_ids=np.zeros((2, 3), np.int32), kv_segment_ids=np.ones((2, 5), np.int32)),
        dict(local_window_size=(0, 0), causal_alignment="bottom_right", is_causal=False,
             key_value_seq_lengths=np.array([1, 1], np.int32)),
    ],
    ids=["mask", "neg_inf_bias", "zero_lengths", "segments", "window_outside_lengths"],
)
def test_rows_that_see_nothing_are_zero_with_zero_finite_gradients(kwargs):
    rng, q, k, v = _qkv(2, 3, 5, 2, 1, 4)

    def loss(q, k, v):
        return jnp.sum(jattn.dot_product_attention(q, k, v, **kwargs) ** 2 + 1.0)

    out = jattn.dot_product_attention(q, k, v, **kwargs)
    assert np.all(np.asarray(out) == 0)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


def test_partially_neg_inf_bias_is_exact_and_finite():
    rng, q, k, v = _qkv(1, 4, 6, 2, 2, 3)
    bias = rng.standard_normal((1, 2, 4, 6)).astype(np.float32)
    bias[..., ::2] = -np.inf
    bias[:, :, 0, :] = -np.inf  # row 0 sees nothing
    ref_out, _, _ = naive_attention(q, k, v, bias=bias)
    out = jattn.dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    g = jax.grad(lambda b: jnp.sum(jattn.dot_product_attention(q, k, v, b) ** 2))(jnp.asarray(bias))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[:, :, 0], 0)  # the row that sees nothing has zero gradient
    # every other row against jax.nn (which is NaN on the empty row, so that row is left out of its loss)
    g_ref = jax.grad(lambda b: jnp.sum(jax.nn.dot_product_attention(q, k, v, b, implementation="xla")[:, 1:] ** 2))(
        jnp.asarray(bias))
    np.testing.assert_allclose(g[:, :, 1:], g_ref[:, :, 1:], atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_low_precision_runs_fp32_inside(dtype, atol):
    rng, q, k, v = _qkv(2, 7, 11, 4, 2, 8)
    q16, k16, v16 = (jnp.asarray(x, dtype) for x in (q, k, v))
    out, res = jattn.dot_product_attention(q16, k16, v16, is_causal=True, return_residual=True)
    assert out.dtype == dtype and res.dtype == jnp.float32
    ref_out, _, _ = naive_attention(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=atol)
    grads = jax.grad(lambda *a: jnp.sum(jattn.dot_product_attention(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q16, k16, v16)
    assert all(g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q16, k16, v16)]  # the same (rounded) inputs in fp32
    ref = jax.grad(lambda *a: jnp.sum(jattn.dot_product_attention(*a)), argnums=(0, 1, 2))(*f32)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=4 * atol, rtol=4 * atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_logits_stay_finite(dtype):
    rng, q, k, v = _qkv(1, 5, 7, 2, 1, 4)
    q = jnp.asarray(q * 1e4, dtype)
    k = jnp.asarray(k * 1e4, dtype)
    v = jnp.asarray(v, dtype)
    bias = np.where(rng.random((1, 2, 5, 7)) < 0.3, -np.inf, 0.0).astype(np.float32)
    out = jattn.dot_product_attention(q, k, v, bias, is_causal=True)
    grads = jax.grad(lambda *a: jnp.sum(jattn.dot_product_attention(*a, is_causal=True).astype(jnp.float32)),
                     argnums=(0, 1, 2, 3))(q, k, v, jnp.asarray(bias))
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    # the outputs in full, against float64 NumPy on the same (rounded) inputs
    ref_out, _, _ = naive_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), bias=bias, is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2 if dtype == jnp.bfloat16 else 1e-5)


def test_dropout_keeps_or_drops_each_weight_with_the_right_scale():
    # With v = identity, out[t, s] = weight[t, s] * keep[t, s], so keep can be read back.
    T = S = 13
    rate = 0.3
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, T, 3, 4)).astype(np.float32)
    k = rng.standard_normal((2, S, 3, 4)).astype(np.float32)
    v = np.broadcast_to(np.eye(S, dtype=np.float32)[None, :, None, :], (2, S, 3, S))
    key = jax.random.key(7)
    out, w = jattn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=key, return_weights=True)
    keep = np.asarray(out) / np.transpose(np.asarray(w), (0, 2, 1, 3))  # [B, T, N, S]
    dropped = np.isclose(keep, 0.0, atol=1e-5)
    kept = np.isclose(keep, 1 / (1 - rate), rtol=1e-4)
    assert np.all(dropped | kept)
    assert abs(dropped.mean() - rate) < 0.05
    again = jattn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=key)
    other = jattn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(out, again)
    assert not np.allclose(out, other)
    shared = jattn.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=key, broadcast_dropout=True)
    shared_keep = np.asarray(shared) / np.transpose(np.asarray(w), (0, 2, 1, 3))  # [B, T, N, S]
    assert np.all(np.isclose(shared_keep, 0.0, atol=1e-5) | np.isclose(shared_keep, 1 / (1 - rate), rtol=1e-4))
    np.testing.assert_allclose(shared_keep, np.broadcast_to(shared_keep[:1, :, :1], shared_keep.shape), atol=1e-4)
    assert not np.allclose(keep, np.broadcast_to(keep[:1, :, :1], keep.shape), atol=1e-4)  # default: per (b, n)
    off = jattn.dot_product_attention(q, k, v, dropout_rate=rate)  # no rng: dropout is off
    np.testing.assert_allclose(off, jattn.dot_product_attention(q, k, v), atol=0)


def test_check_grads_against_finite_differences():
    rng, q, k, v = _qkv(1, 3, 5, 2, 1, 3, Hv=2)
    bias = rng.standard_normal((1, 2, 3, 5))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x, jnp.float64) for x in (q, k, v, bias))

        def f(q, k, v, bias):
            return jattn.dot_product_attention(q, k, v, bias, is_causal=True, logits_soft_cap=3.0)

        check_grads(f, args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_composes_with_jit_vmap_grad_jvp_vjp():
    rng, q, k, v = _qkv(2, 5, 7, 2, 2, 3)
    f = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    eager = f(q, k, v)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), eager, atol=1e-6)
    # vmap over an extra leading axis equals the batched call
    stacked = jax.vmap(f)(q[:, None], k[:, None], v[:, None])[:, 0]
    np.testing.assert_allclose(stacked, eager, atol=1e-6)
    # jvp equals a directional finite difference
    tq = rng.standard_normal(q.shape).astype(np.float32)
    _, tangent = jax.jvp(lambda q: f(q, k, v), (q,), (tq,))
    eps = 1e-3
    fd = (f(q + eps * tq, k, v) - f(q - eps * tq, k, v)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, atol=2e-3)
    # vjp agrees with grad, and grad composes with jit
    cot = rng.standard_normal(eager.shape).astype(np.float32)
    _, pullback = jax.vjp(f, q, k, v)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(pullback(cot), g):
        np.testing.assert_allclose(a, b, atol=1e-5)
