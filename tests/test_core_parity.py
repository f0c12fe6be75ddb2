"""jattn.dot_product_attention against jax.nn.dot_product_attention(implementation='xla').

jax.nn and jattn differ on purpose for rows that see no key (jax.nn: mean of V, jattn: 0), so
each comparison weighs outputs by "row sees some key" and checks those rows are 0 in jattn.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from reference import allowed_mask

# (B, T, S, N, K, H): odd and prime sizes, MHA / GQA / MQA, T < S, T > S.
SHAPES = [
    (1, 3, 5, 1, 1, 7),
    (2, 7, 11, 6, 2, 5),
    (3, 13, 13, 4, 1, 3),
    (2, 11, 7, 3, 3, 8),
]


def _inputs(shape, seed=0):
    B, T, S, N, K, H = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    return rng, q, k, v


def _features(name, shape, rng):
    """kwargs for both APIs, plus the same masks spelled for the NumPy reference."""
    B, T, S, N, K, H = shape
    q_len = rng.integers(1, T + 1, size=B).astype(np.int32)
    kv_len = rng.integers(1, S + 1, size=B).astype(np.int32)
    mask = rng.random((B, 1, T, S)) < 0.7
    bias = rng.standard_normal((1, N, T, S)).astype(np.float32)
    table = {
        "plain": ({}, {}),
        "causal": (dict(is_causal=True), dict(is_causal=True)),
        "window_int": (dict(local_window_size=2), dict(window=(2, 2))),
        "window_pair": (dict(local_window_size=(3, 1)), dict(window=(3, 1))),
        "causal_window": (dict(is_causal=True, local_window_size=(2, 0)), dict(is_causal=True, window=(2, 0))),
        "kv_lengths": (dict(key_value_seq_lengths=kv_len), dict(kv_lengths=kv_len)),
        "q_lengths": (dict(query_seq_lengths=q_len), dict(q_lengths=q_len)),
        "both_lengths_causal": (
            dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len, is_causal=True),
            dict(q_lengths=q_len, kv_lengths=kv_len, is_causal=True),
        ),
        "mask": (dict(mask=mask), dict(mask=mask)),
        "bias": (dict(bias=bias), {}),
        "mask_bias_causal": (dict(mask=mask, bias=bias, is_causal=True), dict(mask=mask, is_causal=True)),
        "scale": (dict(scale=0.37), {}),
    }
    return table[name]


FEATURES = ["plain", "causal", "window_int", "window_pair", "causal_window", "kv_lengths",
            "q_lengths", "both_lengths_causal", "mask", "bias", "mask_bias_causal", "scale"]


def _row_seen(shape, ref_masks):
    B, T, S, N, K, H = shape
    ok = allowed_mask(B, N, T, S, **ref_masks)  # [B, N, T, S]
    return np.transpose(ok.any(-1), (0, 2, 1))[..., None]  # [B, T, N, 1]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_forward_matches_jax_nn(shape, feature):
    rng, q, k, v = _inputs(shape)
    kwargs, ref_masks = _features(feature, shape, rng)
    seen = _row_seen(shape, ref_masks)
    ours = jattn.dot_product_attention(q, k, v, **kwargs)
    theirs = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    np.testing.assert_allclose(np.where(seen, ours, 0), np.where(seen, theirs, 0), atol=2e-6, rtol=1e-5)
    assert np.all(np.where(seen, 0, ours) == 0), "rows that see no key must be exactly 0"


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal_window", "both_lengths_causal", "mask_bias_causal"])
def test_gradients_match_jax_nn(shape, feature):
    rng, q, k, v = _inputs(shape, seed=1)
    kwargs, ref_masks = _features(feature, shape, rng)
    seen = _row_seen(shape, ref_masks)
    cot = rng.standard_normal(q.shape).astype(np.float32) * seen  # only rows that see a key
    bias = kwargs.pop("bias", None)
    if bias is None:
        bias = rng.standard_normal((1, shape[3], shape[1], shape[2])).astype(np.float32)

    def loss(fn, q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias, **kwargs) * cot)

    ours = jax.grad(lambda *a: loss(jattn.dot_product_attention, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
    theirs = jax.grad(
        lambda *a: loss(lambda *x, **kw: jax.nn.dot_product_attention(*x, implementation="xla", **kw), *a),
        argnums=(0, 1, 2, 3),
    )(q, k, v, bias)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=name)


def test_residual_matches_jax_nn():
    shape = (2, 7, 11, 6, 2, 5)
    rng, q, k, v = _inputs(shape)
    out, res = jattn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    out2, res2 = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True, implementation="xla")
    assert res.shape == res2.shape == (2, 7, 6)
    np.testing.assert_allclose(out, out2, atol=2e-6)
    np.testing.assert_allclose(res, res2, atol=1e-5)


def test_unbatched_layout_matches_jax_nn():
    rng, q, k, v = _inputs((1, 5, 7, 4, 2, 3))
    ours = jattn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    theirs = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert ours.shape == (5, 4, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
