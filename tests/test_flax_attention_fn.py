"""jattn.flax_attention_fn inside Flax's own modules, and against Flax's dot_product_attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn

RNG = np.random.default_rng(2)
TOL = dict(rtol=1e-5, atol=1e-5)


def normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def full_mask(shape, seed):
    m = np.random.default_rng(seed).random(shape) < 0.6
    m[..., 0] = True  # every query row sees a key (Flax gives mean(V) otherwise, jattn 0)
    return jnp.asarray(m)


@pytest.mark.parametrize("batch, T, S, N, K, H", [((2,), 5, 7, 4, 4, 3), ((2, 3), 3, 5, 6, 2, 4), ((), 7, 7, 3, 1, 5)])
def test_matches_flax_dot_product_attention(batch, T, S, N, K, H):
    q, k, v = normal(*batch, T, N, H), normal(*batch, S, K, H), normal(*batch, S, K, H)
    bias = normal(*batch, N, T, S)
    mask = full_mask(batch + (1, T, S), seed=T)
    want = nnx.dot_product_attention(q, k, v, bias, mask)
    np.testing.assert_allclose(jattn.flax_attention_fn(q, k, v, bias, mask), want, **TOL)
    np.testing.assert_allclose(  # Flax's float 0/1 masks
        jattn.flax_attention_fn(q, k, v, bias, mask.astype(jnp.float32)), want, **TOL)
    if K == N:  # Linen's function has no GQA
        np.testing.assert_allclose(jattn.flax_attention_fn(q, k, v, mask=mask), nn.dot_product_attention(q, k, v, mask=mask), **TOL)


@pytest.mark.parametrize("K", [None, 2])
def test_nnx_module_swap(K):
    def make(**kw):
        return nnx.jit(lambda: nnx.MultiHeadAttention(
            4, 6, 8, num_kv_heads=K, decode=False, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(0.5), **kw))()

    theirs, ours = make(), make(attention_fn=jattn.flax_attention_fn)
    x, y = normal(2, 5, 6), normal(2, 7, 6)
    mask = full_mask((2, 4, 5, 7), seed=1)
    fwd = nnx.jit(lambda m, x, y, mask: m(x, y, mask=mask))
    np.testing.assert_allclose(fwd(ours, x, y, mask), fwd(theirs, x, y, mask), **TOL)
    causal = nnx.jit(lambda m, x: m(x, is_causal=True))
    np.testing.assert_allclose(causal(ours, x), causal(theirs, x), **TOL)
    ours(x, y, mask=mask, sow_weights=True)  # weights sown as nnx.Intermediate, like Flax's
    theirs(x, y, mask=mask, sow_weights=True)
    np.testing.assert_allclose(ours.attention_weights.get_value()[0], theirs.attention_weights.get_value()[0], **TOL)


def test_linen_module_swap_with_sow():
    theirs = nn.MultiHeadDotProductAttention(3, qkv_features=9)
    ours = nn.MultiHeadDotProductAttention(3, qkv_features=9, attention_fn=jattn.flax_attention_fn)
    x, y = normal(2, 4, 6), normal(2, 5, 6)
    params = jax.jit(theirs.init)(jax.random.key(0), x, y)
    mask = full_mask((2, 3, 4, 5), seed=3)
    a, a_i = ours.apply(params, x, y, mask=mask, sow_weights=True, mutable=["intermediates"])
    b, b_i = theirs.apply(params, x, y, mask=mask, sow_weights=True, mutable=["intermediates"])
    np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(a_i["intermediates"]["attention_weights"][0],
                               b_i["intermediates"]["attention_weights"][0], **TOL)


def test_dropout_is_honoured():
    q, k, v = normal(2, 4, 3, 5), normal(2, 6, 3, 5), normal(2, 6, 3, 5)
    plain = jattn.flax_attention_fn(q, k, v)
    key = jax.random.key(7)
    np.testing.assert_array_equal(  # deterministic: no dropout even with a rate and a key
        jattn.flax_attention_fn(q, k, v, dropout_rng=key, dropout_rate=0.5, deterministic=True), plain)
    a = jattn.flax_attention_fn(q, k, v, dropout_rng=key, dropout_rate=0.5)
    np.testing.assert_array_equal(a, jattn.flax_attention_fn(q, k, v, dropout_rng=key, dropout_rate=0.5))
    assert np.abs(a - plain).max() > 1e-3
    many = jax.vmap(lambda r: jattn.flax_attention_fn(q, k, v, dropout_rng=r, dropout_rate=0.3))(
        jax.random.split(key, 400))
    np.testing.assert_allclose(many.mean(0), plain, atol=0.15)  # inverted dropout: unbiased
    with pytest.raises(ValueError, match="dropout_rng"):
        jattn.flax_attention_fn(q, k, v, dropout_rate=0.5)


def test_dropout_inside_flax_modules_is_reproducible():
    def make():
        return nnx.MultiHeadAttention(2, 6, 8, dropout_rate=0.5, decode=False, rngs=nnx.Rngs(0, dropout=1),
                                      attention_fn=jattn.flax_attention_fn)

    x = normal(2, 5, 6)
    a = make()(x, deterministic=False)
    np.testing.assert_array_equal(a, make()(x, deterministic=False))
    assert np.abs(a - make()(x, deterministic=True)).max() > 1e-4
    lin = nn.MultiHeadDotProductAttention(2, qkv_features=8, dropout_rate=0.5, attention_fn=jattn.flax_attention_fn)
    p = lin.init(jax.random.key(0), x, deterministic=True)
    b = lin.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(b, lin.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
    assert np.abs(b - lin.apply(p, x, deterministic=True)).max() > 1e-4


def test_bad_input_names_the_argument():
    q, k = normal(2, 4, 3, 5), normal(2, 6, 2, 5)
    with pytest.raises(ValueError, match="heads"):
        jattn.flax_attention_fn(q, k, k)  # 3 query heads, 2 kv heads
    with pytest.raises(ValueError, match="mask"):
        jattn.flax_attention_fn(q, q, q, mask=jnp.ones((2, 3, 4, 5), bool))
