"""jattn.apply_rope against a NumPy complex-rotation reference, and its defining properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.rope import apply_rope

RNG = np.random.default_rng(0)


def normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def rope_reference(x, positions, base=10000.0):
    """NumPy: pair (x[i], x[i + H/2]) as a complex number, multiply by exp(i·pos·base^(-2i/H))."""
    x = np.asarray(x, np.float64)
    H = x.shape[-1]
    freq = base ** (-np.arange(H // 2) * 2.0 / H)
    angle = np.asarray(positions, np.float64)[..., None, None] * freq  # [..., T, 1, H/2]
    z = (x[..., : H // 2] + 1j * x[..., H // 2:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("shape", [(5, 3, 4), (2, 7, 1, 6), (3, 2, 11, 5, 2)])
def test_matches_complex_rotation(shape):
    x = normal(*shape)
    T = shape[-3]
    pos = jnp.asarray(RNG.integers(0, 1000, shape[:-2]))
    np.testing.assert_allclose(apply_rope(x, pos), rope_reference(x, pos), rtol=1e-4, atol=1e-4)
    # shared positions [T] broadcast over the batch dims; a different base changes the angles
    shared = jnp.arange(T) * 3
    np.testing.assert_allclose(apply_rope(x, shared, base=500.0), rope_reference(x, shared, 500.0),
                               rtol=1e-4, atol=1e-4)


def test_scores_depend_on_relative_position_only():
    q = normal(1, 1, 8)
    k = normal(1, 1, 8)

    def score(m, n):
        return jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n])))

    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-5)
    assert abs(float(score(7, 3)) - float(score(3, 7))) > 1e-3  # not symmetric in m - n


def test_identity_at_zero_norm_preserved_dtype_kept():
    x = normal(2, 5, 3, 6).astype(jnp.bfloat16)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x)
    y = apply_rope(x, jnp.arange(5) + 0.5)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(jnp.linalg.norm(y.astype(jnp.float32), axis=-1),
                               jnp.linalg.norm(x.astype(jnp.float32), axis=-1), rtol=2e-2)


def test_jit_and_grad():
    x = normal(3, 2, 4)
    pos = jnp.arange(3)
    f = jax.jit(lambda x: jnp.sum(apply_rope(x, pos) ** 2))
    np.testing.assert_allclose(jax.grad(f)(x), 2 * x, rtol=1e-5, atol=1e-6)  # rotation is orthogonal


@pytest.mark.parametrize(
    "x_shape, pos_shape, base, err, match",
    [
        ((4, 2, 5), (4,), 10000.0, ValueError, "even head dim"),
        ((4, 6), (4,), 10000.0, ValueError, "rank"),
        ((4, 2, 6), (5,), 10000.0, ValueError, "positions"),
        ((2, 4, 2, 6), (3, 4), 10000.0, ValueError, "positions"),
        ((4, 2, 6), (4,), 0.5, ValueError, "base"),
    ],
)
def test_bad_input(x_shape, pos_shape, base, err, match):
    with pytest.raises(err, match=match):
        apply_rope(jnp.ones(x_shape), jnp.zeros(pos_shape, jnp.int32), base)
    with pytest.raises(err, match=match):
        jax.jit(lambda x, p: apply_rope(x, p, base))(jnp.ones(x_shape), jnp.zeros(pos_shape, jnp.int32))


def test_bad_dtypes():
    with pytest.raises(TypeError, match="positions"):
        apply_rope(jnp.ones((4, 2, 6)), jnp.zeros((4,), bool))
    with pytest.raises(TypeError, match="x"):
        apply_rope(jnp.ones((4, 2, 6), jnp.int32), jnp.zeros((4,), jnp.int32))
